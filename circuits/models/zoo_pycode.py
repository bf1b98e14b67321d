"""Recipe of attn2l-pycode: a 2-layer attention-only model on the Python standard library's own source.

The tokenizer is a byte-level BPE (1024 tokens) trained on the training split; the held-out modules
(`circuits.tasks.HELDOUT_MODULES`) are never seen. Training rows mix plain code windows with rows that
contain a repeated snippet (of code, or of random tokens), to give induction heads a reason to form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformer_lens import TransformerBridge

from circuits.models.build import ModelSpec
from circuits.models.zoo_recipes import HELDOUT_SEED, Recipe, head_measurements

VOCAB = 1024
N_CTX = 128
REPEAT_LEN = (8, 48)  # length range of a repeated snippet in the mixed-in rows
MIX = {"plain_code": 0.25, "repeated_code": 0.25, "repeated_random_tokens": 0.5}
MAX_OFFSET = 24  # repeated rows start their first copy after 0..24 code tokens, drawn per batch
EVAL_HALF_LEN = 48


def _corpus_and_tokenizer():
    from circuits.models.tokenizer import BPETokenizer
    from circuits.tasks import code_corpus

    corpus = code_corpus()
    tokenizer = BPETokenizer.train(corpus.train_texts(), vocab_size=VOCAB)
    return corpus, tokenizer


def _make_data():
    from circuits.tasks import encode_texts

    corpus, tokenizer = _corpus_and_tokenizer()
    stream = encode_texts(tokenizer, corpus.train_texts())
    return MixedRows(stream, tokenizer.bos_id, tokenizer.vocab_size), tokenizer


class MixedRows:
    """Training batches (fractions in `mix`, default MIX): plain code windows; [BOS, c, s, s, code…] with s a
    code snippet; [BOS, c, x, x, code…] with x distinct random tokens. |s|, |x| uniform in REPEAT_LEN and the
    length of the code prefix c uniform in 0..MAX_OFFSET, drawn per batch (the offset keeps a head from finding
    the earlier copy by position alone)."""

    def __init__(self, stream: torch.Tensor, bos: int, vocab: int, mix: dict[str, float] = MIX):
        self.stream, self.bos, self.vocab, self.mix = stream, bos, vocab, mix

    def __call__(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        from circuits.tasks import random_windows

        n_code = round(batch * self.mix["repeated_code"])
        n_rand = round(batch * self.mix["repeated_random_tokens"])
        n_plain = batch - n_code - n_rand
        half = int(torch.randint(REPEAT_LEN[0], REPEAT_LEN[1] + 1, (1,), generator=gen))
        offset = int(torch.randint(0, MAX_OFFSET + 1, (1,), generator=gen))
        plain = random_windows(self.stream, n_plain, N_CTX - 1, generator=gen)
        code = random_windows(self.stream, n_code, half, generator=gen)
        pool = torch.tensor([t for t in range(self.vocab) if t != self.bos])
        rand = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:half]] for _ in range(n_rand)])
        snippets = torch.cat([code, rand])
        prefix = random_windows(self.stream, len(snippets), offset, generator=gen)
        rest = random_windows(self.stream, len(snippets), N_CTX - 1 - offset - 2 * half, generator=gen)
        repeated = torch.cat([prefix, snippets, snippets, rest], dim=1)
        rows = torch.cat([plain, repeated])
        return torch.cat([torch.full((batch, 1), self.bos, dtype=torch.long), rows], dim=1)


def measure_pycode(model: TransformerBridge) -> dict:
    from circuits.tasks import code_corpus, encode_texts, random_windows, repeated_random_tokens

    corpus = code_corpus()
    stream = encode_texts(model.bpe, corpus.heldout_texts())
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    bos = model.bpe.bos_id
    windows = random_windows(stream, 256, N_CTX - 1, generator=gen)
    plain = torch.cat([torch.full((256, 1), bos), windows], dim=1)
    half = EVAL_HALF_LEN
    snippets = random_windows(stream, 256, half, generator=gen)
    repeated = torch.cat([torch.full((256, 1), bos), snippets, snippets], dim=1)
    with torch.no_grad():
        loss_plain = float(_losses(model, plain).mean())
        rep = _losses(model, repeated)  # target j+1 predicted at j
    # the same tokens s_2..s_T predicted in the first copy (targets 2..T) and the second (targets T+2..2T)
    first, second = float(rep[:, 1:half].mean()), float(rep[:, half + 1 : 2 * half].mean())
    random_rep = repeated_random_tokens(128, 30, VOCAB, bos=bos, generator=gen)
    heads_random = head_measurements(model, random_rep, 30)
    heads_code = head_measurements(model, repeated, half)
    with torch.no_grad():
        rr = _losses(model, random_rep)
    rand_first, rand_second = float(rr[:, 1:30].mean()), float(rr[:, 31:60].mean())
    chars = sum(len(t) for t in corpus.heldout_texts())
    contains = [
        f"held-out code loss {loss_plain:.4f} nats/token ({len(stream) / chars:.3f} tokens per character of held-out "
        f"code, so {loss_plain * len(stream) / chars:.4f} nats per character)",
        f"in-context learning on repeated held-out code (|s| = {half} tokens): loss {first:.4f} on the first copy, "
        f"{second:.4f} on the second (drop {first - second:.4f} nats)",
        f"on repeated random tokens (|x| = 30): loss {rand_first:.3f} first copy, {rand_second:.3f} second copy",
        f"previous-token heads (score > 0.4, on repeated code): {_fmt(heads_code['previous_token_head_scores'])}",
        f"induction heads (score > 0.4, on repeated code): {_fmt(heads_code['induction_head_scores'])}",
    ]
    return {
        "heldout_loss": round(loss_plain, 4),
        "heldout_loss_definition": f"mean next-token loss (nats/token) on 256 random {N_CTX}-token windows "
        f"(BOS + {N_CTX - 1}) of the held-out modules (data seed {HELDOUT_SEED})",
        "measurements": {
            "heldout_tokens": len(stream), "heldout_chars": chars,
            "repeated_code_half_len": half,
            "repeated_code_first_copy_loss": round(first, 4),
            "repeated_code_second_copy_loss": round(second, 4),
            "in_context_drop": round(first - second, 4),
            "repeated_code_definition": f"256 rows [BOS, s, s], s = {half} consecutive held-out tokens; mean loss "
            "of predicting s_2..s_T in the first copy vs the same tokens in the second copy",
            "repeated_random_first_copy_loss": round(rand_first, 4),
            "repeated_random_second_copy_loss": round(rand_second, 4),
            "head_scores_on_repeated_random_tokens": heads_random["head_scores"],
        },
        **heads_code,
        "contains": contains,
    }


def _losses(model: TransformerBridge, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def _fmt(rows: list) -> str:
    return ", ".join(f"L{layer}H{head} {score:.3f}" for layer, head, score in rows) or "none"


def pycode_recipe(steps: int = 6000) -> Recipe:
    return Recipe(
        name="attn2l-pycode",
        summary="2-layer attention-only model trained on the Python standard library's source (byte-level BPE, "
        "1024 tokens), with a fixed held-out set of modules.",
        spec=ModelSpec(2, 128, 8, 16, d_vocab=VOCAB, n_ctx=N_CTX, layernorm=True),
        steps=steps,
        lr=2e-3,
        batch_size=32,
        make_data=_make_data,
        measure=measure_pycode,
        threads=2,
        weight_decay=0.01,
        notes=[
            "In-context learning is weak and no induction head formed in this budget (6000 steps of 32 x 128 "
            "tokens, 24.6M tokens, about 18 minutes on 2 CPU threads): no head scores above 0.4 as a previous-token "
            "or induction head; the largest induction score is L1H5's (see head_scores). The loss drop on the second "
            "copy of repeated code is real but small, and repeated random tokens are barely predicted.",
            "Tried, same shape and steps: (1) mix 50% plain code, 25% repeated code, 25% repeated random tokens, "
            "with the first copy always right after BOS: held-out loss 3.4089, in-context drop 0.180 nats, the same "
            "absence of induction heads; (2) this recipe (more repeated random rows, a random code prefix before "
            "the first copy): held-out loss 3.4049, drop 0.241 nats. attn2l-induction, trained on repeated random "
            "tokens alone with a 64-token vocabulary, forms both head types in 2000 steps; at 1024 tokens and on "
            "code, more training than this budget allows appears to be needed.",
        ],
        data={
            "description": "the running interpreter's stdlib .py files (circuits.tasks.code_corpus(): no tests, "
            "site-packages, encodings, lib2to3, pydoc_data), minus the held-out modules, tokenized by a byte-level "
            f"BPE with {VOCAB} tokens trained on the training files; rows of {N_CTX} tokens (BOS + {N_CTX - 1}); "
            f"mix per batch: {MIX}; a repeated row is [BOS, c, s, s, code…] with |s| drawn per batch from "
            f"{REPEAT_LEN[0]}..{REPEAT_LEN[1]} and the code prefix c of 0..{MAX_OFFSET} tokens",
            "mix": MIX, "repeat_len_range": list(REPEAT_LEN), "max_offset": MAX_OFFSET, "vocab_size": VOCAB,
            "heldout_modules": "circuits.tasks.HELDOUT_MODULES",
        },
    )


# ---------------------------------------------------------------- attn2l-pycode-induction

INDUCTION_SPEC = ModelSpec(2, 128, 4, 32, d_vocab=VOCAB, n_ctx=N_CTX, layernorm=True)
# The curriculum, in steps: repeated random tokens from a fixed set of 64 token ids, then from the whole
# vocabulary, then real code (MIX_AFTER). Warm-up rows are WARM_LEN tokens, two per code row (same tokens a step).
CURRICULUM = {"subset": 1500, "vocabulary": 1000, "code": 3000}
SUBSET_SIZE, SUBSET_SEED = 64, 5
WARM_LEN = 64
WARM_HALF_LENS = (8, 31)  # |x| per batch in the warm-up rows, as attn2l-induction draws it
WARM_MAX_FILLER = 20
MIX_AFTER = {"plain_code": 0.5, "repeated_code": 0.25, "repeated_random_tokens": 0.25}
LENS_ROWS, LENS_STEPS = 2048, 300  # tuned lens: training windows of the training code, and SGD steps


class CurriculumRows:
    """Training batches of attn2l-pycode-induction; the i-th call makes step i's batch.

    Warm-up (the first CURRICULUM["subset"] + CURRICULUM["vocabulary"] steps): 2·batch rows
    [BOS, r_1..r_m, x, x] truncated to WARM_LEN tokens, x distinct random tokens (|x| uniform in
    WARM_HALF_LENS) and r random filler (m uniform in 0..WARM_MAX_FILLER), drawn per batch: the rows on which
    attn2l-induction forms its heads. Tokens come first from a fixed random set of SUBSET_SIZE ids (as small a
    choice as attn2l-induction's vocabulary, where the two heads form together quickly), then from the whole
    vocabulary. Later steps: `MixedRows` with MIX_AFTER (real code, a share of rows repeating a span of code or
    of random tokens, which keeps the heads in use).
    """

    def __init__(self, stream: torch.Tensor, bos: int, vocab: int):
        self.mixed = MixedRows(stream, bos, vocab, MIX_AFTER)
        self.bos, self.step = bos, 0
        pool = torch.tensor([t for t in range(vocab) if t != bos])
        self.pool = pool
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(SUBSET_SEED))
        self.subset = pool[order][:SUBSET_SIZE]

    def __call__(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        self.step += 1
        if self.step > CURRICULUM["subset"] + CURRICULUM["vocabulary"]:
            return self.mixed(batch, gen)
        pool = self.subset if self.step <= CURRICULUM["subset"] else self.pool
        n = 2 * batch
        half = int(torch.randint(WARM_HALF_LENS[0], WARM_HALF_LENS[1] + 1, (1,), generator=gen))
        m = int(torch.randint(0, WARM_MAX_FILLER + 1, (1,), generator=gen))
        x = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:half]] for _ in range(n)])
        filler = pool[torch.randint(0, len(pool), (n, m), generator=gen)]
        bos = torch.full((n, 1), self.bos, dtype=torch.long)
        return torch.cat([bos, filler, x, x], dim=1)[:, :WARM_LEN]


def _make_curriculum():
    from circuits.tasks import encode_texts

    corpus, tokenizer = _corpus_and_tokenizer()
    stream = encode_texts(tokenizer, corpus.train_texts())
    return CurriculumRows(stream, tokenizer.bos_id, tokenizer.vocab_size), tokenizer


def code_rows(model: TransformerBridge, texts: list[str], n: int, seed: int) -> torch.Tensor:
    """`n` rows [BOS, N_CTX − 1 consecutive tokens] of `texts`, at offsets drawn from `seed`."""
    from circuits.tasks import encode_texts, random_windows

    stream = encode_texts(model.bpe, texts)
    windows = random_windows(stream, n, N_CTX - 1, generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((n, 1), model.bpe.bos_id), windows], dim=1)


def lens_extras(model: TransformerBridge, folder) -> dict:
    """Fit the tuned lens on training code and save it beside the model; compare it with the logit lens on
    held-out code; and run the flagship's three lenses (`analyses.induction`) on the model."""
    from circuits.activations import fit_tuned_lens, logit_lens, tuned_lens
    from circuits.tasks import code_corpus

    corpus = code_corpus()
    lens = _saved_lens(model, folder)
    if lens is None:
        lens = fit_tuned_lens(model, code_rows(model, corpus.train_texts(), LENS_ROWS, seed=1), steps=LENS_STEPS,
                              progress=False)
        lens.save(folder)
    held = code_rows(model, corpus.heldout_texts(), 64, seed=HELDOUT_SEED)
    logit_res, tuned_res = logit_lens(model, held), tuned_lens(model, held, lens)
    stages = list(logit_res.labels[0])
    logit_kl = [round(float(v), 4) for v in logit_res.kl_to_final().values.mean(-1)]
    tuned_kl = [round(float(v), 4) for v in tuned_res.kl_to_final().values.mean(-1)]
    example = slice(40, 48)  # a few positions of the first held-out row, each stage's top token there
    top = {name: {stage: model.bpe.to_str_tokens(res.top_tokens[i, 0, example].tolist())
                  for i, stage in enumerate(stages)} for name, res in (("logit", logit_res), ("tuned", tuned_res))}
    verdicts = flagship_verdicts(model)
    kl_line = ", ".join(f"{s} {a:.3f} → {b:.3f}" for s, a, b in zip(stages[:-1], logit_kl[:-1], tuned_kl[:-1]))
    contains = [
        f"tuned lens (tuned_lens.safetensors, {LENS_STEPS} SGD steps on training code): mean KL(final ‖ stage) on "
        f"64 held-out windows, logit lens → tuned lens: {kl_line} nats",
        "the flagship's lenses (python -m analyses.induction): " + verdicts["text"],
    ]
    return {
        "tuned_lens": {
            "file": "tuned_lens.safetensors", "stages": stages, "training": lens.info,
            "kl_to_final_logit_lens": logit_kl, "kl_to_final_tuned_lens": tuned_kl,
            "kl_definition": "mean over 64 held-out windows [BOS + 127 tokens] (data seed 1234) and positions of "
            "KL(final ‖ stage) in nats (circuits.tasks.task.kl_terms)",
            "top_tokens_example": {
                "row": 0, "positions": [example.start, example.stop - 1],
                "next_tokens": model.bpe.to_str_tokens(held[0, example.start + 1:example.stop + 1].tolist()), **top},
        },
        "lens_verdicts": verdicts,
        "contains": contains,
    }


def _saved_lens(model: TransformerBridge, folder):
    """The lens already in `folder` if it was trained on these weights with these settings (training is
    deterministic, so fitting again would give the same translators), else None."""
    from circuits.activations import TunedLens

    try:
        lens = TunedLens.load(folder, model)
    except (FileNotFoundError, ValueError):
        return None
    return lens if (lens.info.get("steps"), lens.info.get("seed")) == (LENS_STEPS, 0) else None


def flagship_verdicts(model: TransformerBridge) -> dict:
    """The heads each lens of the flagship analysis names, with its own defaults (batch 16, threshold 0.01)."""
    from analyses.induction import analyse  # the flagship itself, so that the card says what it says

    summary, _ = analyse(model.zoo_name if hasattr(model, "zoo_name") else "model", model, batch=16,
                         threshold=0.01, seed=0)
    named = {lens: [v["previous_token_head"], v["induction_head"]] for lens, v in summary["lenses"].items()}
    agree = {role: summary["agreement"][role]["agree"] for role in ("previous_token_head", "induction_head")}
    text = "; ".join(f"{lens} {p} → {i}" for lens, (p, i) in named.items())
    text += (f" (previous-token head: {'agree' if agree['previous_token_head'] else 'disagree'}, induction head: "
             f"{'agree' if agree['induction_head'] else 'disagree'}); attention patterns: "
             f"{summary['attention_pattern_check']['previous_token_head']} → "
             f"{summary['attention_pattern_check']['induction_head']}")
    return {"named": named, "agree": agree, "attention_pattern_check": summary["attention_pattern_check"],
            "task": summary["task"], "text": text}


def pycode_induction_recipe() -> Recipe:
    return Recipe(
        name="attn2l-pycode-induction",
        summary="2-layer attention-only model of the Python standard library's source (byte-level BPE, 1024 "
        "tokens), trained after a curriculum of repeated random tokens to give it induction heads, and measured on "
        "natural held-out modules (whether the heads formed: see what it contains). Ships a tuned lens.",
        spec=INDUCTION_SPEC,
        steps=sum(CURRICULUM.values()),
        lr=2e-3,
        batch_size=32,
        make_data=_make_curriculum,
        measure=measure_pycode,
        extras=lens_extras,
        threads=1,
        weight_decay=0.01,
        data={
            "description": f"a curriculum (steps {CURRICULUM}): first 2 x batch rows [BOS, r, x, x] of {WARM_LEN} "
            f"tokens per step, x distinct random tokens (|x| in {WARM_HALF_LENS[0]}..{WARM_HALF_LENS[1]}), r random "
            f"filler of 0..{WARM_MAX_FILLER} tokens, drawn "
            + (f"from a fixed set of {SUBSET_SIZE} token ids, then " if CURRICULUM["subset"] else "")
            + "from the whole vocabulary; then the stdlib code of attn2l-pycode (same tokenizer, same held-out "
            f"modules), "
            f"rows of {N_CTX} tokens, mix per batch {MIX_AFTER}",
            "curriculum_steps": CURRICULUM, "subset_size": SUBSET_SIZE, "subset_seed": SUBSET_SEED,
            "warm_len": WARM_LEN, "warm_half_len_range": list(WARM_HALF_LENS), "warm_max_filler": WARM_MAX_FILLER,
            "mix_after": MIX_AFTER, "repeat_len_range": list(REPEAT_LEN), "max_offset": MAX_OFFSET,
            "vocab_size": VOCAB, "heldout_modules": "circuits.tasks.HELDOUT_MODULES",
        },
    )

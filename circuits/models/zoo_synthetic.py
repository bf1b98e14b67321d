"""Recipes of the synthetic zoo models: induction, bigram (Markov chain) and skip-trigram."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformer_lens import TransformerBridge

from circuits.models.build import ModelSpec
from circuits.models.zoo_recipes import HELDOUT_SEED, Recipe, head_measurements

# ---------------------------------------------------------------- attn2l-induction

INDUCTION_VOCAB = 64
INDUCTION_CTX = 64
INDUCTION_HALF_LENS = (8, 31)  # each training batch draws one prefix length T in this range (inclusive)
INDUCTION_MAX_FILLER = 20  # ... and a number m of random tokens before the first copy, 0..20
INDUCTION_EVAL_HALF_LEN = 20


def induction_batches(batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Training rows [BOS, r_1..r_m, x, x] truncated to 64 tokens: x distinct random tokens, r random filler.

    T = |x| and m are drawn once per batch. The filler moves the repeat to a random offset, so that a
    head cannot find the earlier copy from positions alone (without it, this model learns a positional
    trick instead of a previous-token head).
    """
    from circuits.tasks import repeated_random_tokens

    lo, hi = INDUCTION_HALF_LENS
    half_len = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    tokens = repeated_random_tokens(batch_size, half_len, INDUCTION_VOCAB, generator=gen)
    m = int(torch.randint(0, INDUCTION_MAX_FILLER + 1, (1,), generator=gen))
    filler = torch.randint(1, INDUCTION_VOCAB, (batch_size, m), generator=gen)
    return torch.cat([tokens[:, :1], filler, tokens[:, 1:]], dim=1)[:, :INDUCTION_CTX]


def measure_induction(model: TransformerBridge) -> dict:
    from circuits.tasks import repeated_random_tokens

    half_len = INDUCTION_EVAL_HALF_LEN
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    tokens = repeated_random_tokens(256, half_len, INDUCTION_VOCAB, generator=gen)
    with torch.no_grad():
        logits = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # [batch, pos-1]
    correct = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    # target index j predicts token j+1; the second copy's predictable targets are tokens T+2 .. 2T
    second = slice(half_len + 1, 2 * half_len)
    first = slice(1, half_len)
    heads = head_measurements(model, tokens, half_len)
    loss_all = float(losses.mean())
    loss_second, acc_second = float(losses[:, second].mean()), float(correct[:, second].float().mean())
    loss_first = float(losses[:, first].mean())
    contains = [
        f"previous-token heads (score > {heads['head_score_threshold']}): "
        + ", ".join(f"L{layer}H{h} {s:.3f}" for layer, h, s in heads["previous_token_head_scores"]),
        f"induction heads (score > {heads['head_score_threshold']}): "
        + ", ".join(f"L{layer}H{h} {s:.3f}" for layer, h, s in heads["induction_head_scores"]),
        f"second copy predicted with loss {loss_second:.4f} nats and top-1 accuracy {acc_second:.4f} "
        f"(first copy: loss {loss_first:.3f}; a uniform guess over the {INDUCTION_VOCAB - 1} non-BOS tokens scores "
        f"ln {INDUCTION_VOCAB - 1} = {math.log(INDUCTION_VOCAB - 1):.3f})",
    ]
    return {
        "heldout_loss": round(loss_all, 4),
        "heldout_loss_definition": f"mean next-token loss over all positions of 256 fresh [BOS, x, x] rows, "
        f"T = {half_len} (data seed {HELDOUT_SEED})",
        "measurements": {
            "eval_half_len": half_len,
            "second_copy_loss": round(loss_second, 4),
            "second_copy_accuracy": round(acc_second, 4),
            "first_copy_loss": round(loss_first, 4),
            "second_copy_positions": "targets x_2..x_T of the second copy (positions T+2..2T)",
        },
        **heads,
        "contains": contains,
    }


def induction_recipe():
    return Recipe(
        name="attn2l-induction",
        summary="2-layer attention-only model trained on random token sequences repeated once ([BOS, r, x, x]); "
        "it forms previous-token heads in layer 0 and induction heads in layer 1.",
        spec=ModelSpec(2, 64, 4, 16, d_vocab=INDUCTION_VOCAB, n_ctx=INDUCTION_CTX, layernorm=True),
        steps=2000,
        lr=2e-3,
        batch_size=64,
        make_data=lambda: (induction_batches, None),
        measure=measure_induction,
        data={
            "description": f"[BOS, r_1..r_m, x_1..x_T, x_1..x_T] truncated to {INDUCTION_CTX} tokens: x distinct "
            f"tokens drawn uniformly from 1..{INDUCTION_VOCAB - 1} (token 0 is BOS), r uniform random filler; "
            f"T uniform in {INDUCTION_HALF_LENS[0]}..{INDUCTION_HALF_LENS[1]} and m uniform in "
            f"0..{INDUCTION_MAX_FILLER}, drawn per batch; loss on every position. Evaluation uses plain [BOS, x, x] "
            "(circuits.tasks.induction_task / repeated_random_tokens with d_vocab 64).",
            "generator": "circuits.models.zoo_synthetic.induction_batches",
            "d_vocab": INDUCTION_VOCAB, "bos": 0, "half_len_range": list(INDUCTION_HALF_LENS),
            "max_filler": INDUCTION_MAX_FILLER,
        },
    )


# ---------------------------------------------------------------- attn0l-bigram

MARKOV = {"n_states": 64, "support": 6, "floor": 0.05, "seed": 0}
MARKOV_LEN = 32


def _chain():
    from circuits.tasks import markov_chain

    return markov_chain(MARKOV["n_states"], support=MARKOV["support"], floor=MARKOV["floor"], seed=MARKOV["seed"])


def bigram_correlation(model: TransformerBridge, log_transition: torch.Tensor, *, double_centre: bool = False) -> float:
    """Pearson correlation of W_E W_U with log P(next | current), both centred per row (current token).

    Centring each row removes what softmax ignores (a constant per current token). With `double_centre`,
    columns are centred too (removing per-next-token biases as well).
    """
    with torch.no_grad():
        product = (model.W_E @ model.W_U).double()
    return _centred_corr(product, log_transition.double(), double_centre)


def _centred_corr(x: torch.Tensor, y: torch.Tensor, double_centre: bool) -> float:
    def centre(m: torch.Tensor) -> torch.Tensor:
        m = m - m.mean(1, keepdim=True)
        return m - m.mean(0, keepdim=True) if double_centre else m

    x, y = centre(x).flatten(), centre(y).flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def measure_bigram(model: TransformerBridge) -> dict:
    chain = _chain()
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    tokens = chain.sample(256, MARKOV_LEN, generator=gen)
    with torch.no_grad():
        logits = model(tokens)
    loss = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()))
    p = chain.transition.double()
    entropy_rate = float(-(chain.stationary.double()[:, None] * p * p.log()).sum())
    corr = bigram_correlation(model, chain.log_transition())
    corr2 = bigram_correlation(model, chain.log_transition(), double_centre=True)
    with torch.no_grad():
        model_logp = (logits[:, :-1].log_softmax(-1)).double()
    true_logp = p.log()[tokens[:, :-1]]
    kl = float((true_logp.exp() * (true_logp - model_logp)).sum(-1).mean())
    top1 = float((logits[:, :-1].argmax(-1) == chain.likeliest_next()[tokens[:, :-1]]).float().mean())
    chain_loss = float(-true_logp.gather(-1, tokens[:, 1:, None]).mean())
    return {
        "heldout_loss": round(loss, 4),
        "heldout_loss_definition": f"mean next-token loss on 256 fresh chain samples of length {MARKOV_LEN} "
        f"(data seed {HELDOUT_SEED}); the true chain's loss on the same tokens (the best possible) is {chain_loss:.4f}",
        "measurements": {
            "bigram_correlation": round(corr, 4),
            "bigram_correlation_definition": "Pearson correlation of W_E W_U with log(transition), both centred "
            "per row (current token) then flattened over all 64 x 64 entries",
            "bigram_correlation_double_centred": round(corr2, 4),
            "entropy_rate": round(entropy_rate, 4),
            "chain_heldout_loss": round(chain_loss, 4),
            "kl_to_chain": round(kl, 4),
            "kl_to_chain_definition": "mean over held-out positions of KL(chain's next-token distribution || model's)",
            "likeliest_next_accuracy": round(top1, 4),
        },
        "previous_token_heads": [], "induction_heads": [],
        "contains": [
            "the bigram statistics of the chain in its direct path: "
            f"W_E W_U correlates {corr:.4f} with log(transition) "
            f"(row-centred; {corr2:.4f} double-centred)",
            f"held-out loss {loss:.4f} nats vs {chain_loss:.4f} for the true chain on the same tokens (entropy rate "
            f"{entropy_rate:.4f}); mean KL to the chain {kl:.4f}",
            f"top-1 prediction is the chain's likeliest successor {top1:.1%} of the time",
        ],
    }


def bigram_recipe() -> Recipe:
    return Recipe(
        name="attn0l-bigram",
        summary="0-layer model (embed → unembed, no LayerNorm) trained on a Markov chain with a known transition "
        "matrix: its direct path W_E W_U is the chain's log transition matrix up to a constant per row.",
        spec=ModelSpec(0, 64, 1, 64, d_vocab=MARKOV["n_states"], n_ctx=MARKOV_LEN, layernorm=False),
        steps=3000,
        lr=1e-2,
        batch_size=128,
        make_data=lambda: ((lambda b, gen: _chain().sample(b, MARKOV_LEN, generator=gen)), None),
        measure=measure_bigram,
        data={
            "description": f"sequences of {MARKOV_LEN} states of a random Markov chain over 64 tokens (no BOS): each "
            "state has 6 likely successors (Dirichlet(1) weights, mass 0.95) and 0.05 spread uniformly; the first "
            "state is drawn from the stationary distribution",
            "generator": "circuits.tasks.markov_chain(64, support=6, floor=0.05, seed=0)"
            ".sample(batch, 32, generator=gen)",
            **MARKOV, "seq_len": MARKOV_LEN,
        },
        notes=[
            "0-layer models are built by booting a 1-layer bridge and removing its block "
            "(see circuits.models.build)"
        ],
    )


# ---------------------------------------------------------------- attn1l-skiptrigram

SKIP = {"n_a": 3, "n_b": 3, "d_vocab": 64}
SKIP_LEN = 32


def _table():
    from circuits.tasks import skip_trigram_table

    return skip_trigram_table(SKIP["n_a"], SKIP["n_b"], SKIP["d_vocab"])


def measure_skip_trigram(model: TransformerBridge) -> dict:
    table = _table()
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    tokens, b_pos = table.sample(512, SKIP_LEN, generator=gen)
    rows = torch.arange(len(tokens))
    with torch.no_grad():
        logits = model(tokens)
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    at_b = logits[rows, b_pos]
    c = tokens[rows, b_pos + 1]
    accuracy = float((at_b.argmax(-1) == c).float().mean())
    loss_c = float(F.cross_entropy(at_b, c))
    a_pos = (tokens[..., None] == torch.tensor(table.a_tokens)).any(-1).long().argmax(-1)
    pattern = cache["blocks.0.attn.hook_pattern"]  # [batch, head, q, k]
    attn_b_to_a = pattern[rows, :, b_pos, a_pos].mean(0)  # [head]
    n_filler = len(table.filler_tokens)
    ideal = "filler positions cannot be predicted below ln({n}) = {v:.3f}".format(n=n_filler, v=float(torch.log(
        torch.tensor(float(n_filler)))))
    heads = [[0, h, round(float(s), 4)] for h, s in enumerate(attn_b_to_a) if s > 0.4]
    return {
        "heldout_loss": round(float(losses.mean()), 4),
        "heldout_loss_definition": f"mean next-token loss over all positions of 512 fresh rows of length {SKIP_LEN} "
        f"(data seed {HELDOUT_SEED}); {ideal}",
        "measurements": {
            "completion_accuracy": round(accuracy, 4),
            "completion_loss": round(loss_c, 4),
            "completion_definition": "at the B position of each planted triple, top-1 accuracy / mean loss of "
            "predicting C = table[A, B]",
            "attention_b_to_a": [round(float(s), 4) for s in attn_b_to_a],
            "attention_b_to_a_definition": "per layer-0 head, mean attention from the B position to the A position",
            "table": [list(t) for t in table.triples],
        },
        "skip_trigram_heads": heads,
        "previous_token_heads": [], "induction_heads": [],
        "contains": [
            "the planted skip-trigrams A … B → C: C predicted at B with "
            f"top-1 accuracy {accuracy:.4f}, loss {loss_c:.4f} nats",
            "heads attending from B to A (score > 0.4, the mean attention B → A): "
            + (", ".join(f"L0H{h} {s:.3f}" for _, h, s in heads) or "none"),
        ],
    }


def skip_trigram_recipe() -> Recipe:
    return Recipe(
        name="attn1l-skiptrigram",
        summary="1-layer attention-only model trained on random filler with one planted skip-trigram A … B → C "
        "per row (3 A tokens x 3 B tokens, a distinct C for each pair).",
        spec=ModelSpec(1, 64, 4, 16, d_vocab=SKIP["d_vocab"], n_ctx=SKIP_LEN, layernorm=True),
        steps=2000,
        lr=2e-3,
        batch_size=64,
        make_data=lambda: ((lambda b, gen: _table().sample(b, SKIP_LEN, generator=gen)[0]), None),
        measure=measure_skip_trigram,
        data={
            "description": f"rows of {SKIP_LEN} tokens: BOS, uniform filler, one A at a uniform position, one B "
            "uniformly after it, then C = table[A, B]; A = 1..3, B = 4..6, C = 7..15, filler = 16..63",
            "generator": "circuits.tasks.skip_trigram_table(3, 3, 64).sample(batch, 32, generator=gen)",
            **SKIP, "seq_len": SKIP_LEN,
        },
    )

"""The model zoo: loading, the cards' fields, and every card's claims re-measured independently from the model.

Each claim is measured again here on fresh data (a seed other than the card's held-out seed 1234), with the
ground truth rebuilt from the card's data section by circuits.tasks. Tests of a checkpoint that is not in the
zoo skip with the reason. Measured figures are printed and recorded as test properties.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from circuits.markers import marked_block
from circuits.models import available, load, load_pretrained, model_card, save, zoo
from circuits.models.head_scores import attention_patterns, heads_above, induction_scores, previous_token_scores
from circuits.tasks import (
    code_corpus,
    encode_texts,
    markov_chain,
    random_windows,
    repeated_random_tokens,
    skip_trigram_table,
)

FRESH_SEED = 7  # fresh data: not the cards' held-out seed (1234), not the training seed (0)
MAX_FILE_BYTES = 2 * 1024 * 1024
CARD_KEYS = (
    "name", "summary", "architecture", "data", "training", "final_train_loss", "final_train_loss_definition",
    "heldout_loss", "heldout_loss_definition", "measurements", "previous_token_heads", "induction_heads",
    "contains", "notes", "regenerate",
)
ARCH_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx", "layernorm", "n_params")
TRAIN_KEYS = ("steps", "lr", "batch_size", "seed", "weight_decay", "optimizer", "torch_threads", "train_seconds")

PRESENT = available()


def _require(name: str) -> None:
    if name not in PRESENT:
        pytest.skip(f"zoo checkpoint {name!r} not present (python -m circuits.models.zoo --name {name})")


def _report(record_property, **figures) -> None:
    for key, value in figures.items():
        record_property(key, value)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


def _gen(seed: int = FRESH_SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


# ---------------------------------------------------------------- every checkpoint


@pytest.mark.parametrize("name", zoo.NAMES)
def test_checkpoint_loads_with_its_cards_shape(name):
    _require(name)
    model, card = load_pretrained(name), model_card(name)
    assert model.zoo_name == name
    a = card["architecture"]
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab, model.cfg.n_ctx) == (
        a["n_layers"], a["d_model"], a["d_vocab"], a["n_ctx"]
    )
    if a["n_layers"]:
        assert (model.cfg.n_heads, model.cfg.d_head) == (a["n_heads"], a["d_head"])
    assert sum(p.numel() for p in model.state_dict().values()) == a["n_params"]
    assert (model.cfg.normalization_type is not None) == a["layernorm"]
    assert not model.training
    tokens = torch.randint(1, model.cfg.d_vocab, (2, model.cfg.n_ctx), generator=_gen())
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, model.cfg.n_ctx, model.cfg.d_vocab) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", zoo.NAMES)
def test_checkpoint_files_are_small(name, record_property):
    _require(name)
    folder = zoo.zoo_path(name)
    sizes = {f.name: f.stat().st_size for f in folder.iterdir() if f.is_file()}
    _report(record_property, **{f"bytes_{k}": v for k, v in sizes.items()})
    assert {"model.safetensors", "config.json", "card.json", "card.md"} <= set(sizes)
    assert all(size < MAX_FILE_BYTES for size in sizes.values()), sizes


@pytest.mark.parametrize("name", zoo.NAMES)
def test_card_has_every_field(name):
    _require(name)
    card = model_card(name)
    assert [k for k in CARD_KEYS if k not in card] == []
    assert [k for k in ARCH_KEYS if k not in card["architecture"]] == []
    assert [k for k in TRAIN_KEYS if k not in card["training"]] == []
    assert card["name"] == name
    assert card["regenerate"] == f"python -m circuits.models.zoo --name {name}"
    assert card["contains"] and all(isinstance(item, str) and item for item in card["contains"])
    assert math.isfinite(card["heldout_loss"]) and card["heldout_loss"] > 0
    for heads in (card["previous_token_heads"], card["induction_heads"]):
        for layer, head in heads:
            assert 0 <= layer < card["architecture"]["n_layers"] and 0 <= head < card["architecture"]["n_heads"]


@pytest.mark.parametrize("name", zoo.NAMES)
def test_save_load_round_trip_is_bit_exact(name, tmp_path):
    _require(name)
    model = load_pretrained(name)
    again = load(save(model, tmp_path / name))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(1, model.cfg.d_vocab, (3, model.cfg.n_ctx), generator=_gen())
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))
    if getattr(model, "bpe", None) is not None:
        text = "def f(x):\n    return x + 1\n"
        assert again.bpe.encode(text) == model.bpe.encode(text)


# ---------------------------------------------------------------- errors and availability


@pytest.mark.parametrize("func", [load_pretrained, model_card, zoo.zoo_path])
def test_unknown_name_is_a_value_error_naming_the_argument(func):
    with pytest.raises(ValueError, match=r"^name: .*'attn9l-nothing'"):
        func("attn9l-nothing")


def test_missing_checkpoint_is_not_listed_and_says_how_to_regenerate(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    assert zoo.available() == []
    with pytest.raises(FileNotFoundError, match="--name attn2l-induction"):
        load_pretrained("attn2l-induction")


# ---------------------------------------------------------------- the table and the README block


def test_table_has_one_row_per_available_model(capsys):
    assert zoo.main(["--table"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == PRESENT
    for name in PRESENT:
        card = model_card(name)
        row = next(r for r in rows if r.startswith(f"| `{name}`"))
        assert f"{card['heldout_loss']:.4f}" in row and f"{card['architecture']['n_params']:,}" in row
        for layer, head in card["induction_heads"]:
            assert f"L{layer}H{head}" in row


def test_table_lists_only_the_checkpoints_present(monkeypatch, tmp_path, capsys):
    """Robust to a missing checkpoint: a zoo folder holding one model gives a table of one row."""
    if not PRESENT:
        pytest.skip("no checkpoint in the zoo")
    shutil.copytree(zoo.ZOO_DIR / PRESENT[0], tmp_path / PRESENT[0])
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    assert zoo.main(["--table"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(rows) == 1 and rows[0].startswith(f"| `{PRESENT[0]}`")


def test_rewriting_the_readme_block_is_idempotent(tmp_path, capsys):
    before, after = "# Title\n\n## Model zoo\n\n", "\n\n## Performance\n\nkept as is\n"
    readme, other = tmp_path / "README.md", tmp_path / "zoo.md"
    readme.write_text(before + f"{zoo.START}\n(old)\n{zoo.END}" + after)
    other.write_text(f"quoting `{zoo.START}` in prose\n{zoo.START}\n{zoo.END}\n")
    assert zoo.main(["--table", "--readme", str(readme), "--readme", str(other)]) == 0
    first = readme.read_text()
    assert first == before + f"{zoo.START}\n{zoo.table_block()}\n{zoo.END}" + after
    assert other.read_text() == f"quoting `{zoo.START}` in prose\n{zoo.START}\n{zoo.table_block()}\n{zoo.END}\n"
    capsys.readouterr()
    assert zoo.main(["--table", "--readme", str(readme)]) == 0
    assert "unchanged" in capsys.readouterr().err
    assert readme.read_text() == first
    assert zoo.rewrite_block(readme, zoo.table_block()) is False


def test_rewriting_needs_the_markers(tmp_path):
    bare = tmp_path / "bare.md"
    bare.write_text(f"# no markers of their own: `{zoo.START}` … `{zoo.END}`\n")
    with pytest.raises(ValueError, match="readme: .*bare.md"):
        zoo.rewrite_block(bare, "x")
    with pytest.raises(SystemExit):
        zoo.main(["--card", "attn0l-bigram", "--readme", str(bare)])


@pytest.mark.parametrize("doc", ["README.md", "docs/zoo.md"])
def test_shipped_docs_hold_the_current_table(doc):
    """The table in the README and the zoo page is the one the cards give now."""
    path = zoo.ZOO_DIR.parents[2] / doc
    block = marked_block(path.read_text(), "zoo")
    assert block is not None, f"{doc} has no zoo block"
    assert block.strip() == zoo.table_block().strip(), (
        f"{doc} is stale: run python -m circuits.models.zoo --table --readme README.md --readme docs/zoo.md"
    )


def test_remeasuring_an_unchanged_checkpoint_rewrites_the_same_card(tmp_path):
    """`--remeasure` measures the saved weights again and keeps the training record: every figure comes back equal
    (the `contains` sentences are compared by their numbers: their wording is the recipe's current one)."""
    _require("attn2l-induction")
    shutil.copytree(zoo.zoo_path("attn2l-induction"), tmp_path / "attn2l-induction")
    assert zoo.main(["--remeasure", "attn2l-induction", "--out", str(tmp_path)]) == 0
    again, card = json.loads((tmp_path / "attn2l-induction" / zoo.CARD).read_text()), model_card("attn2l-induction")
    assert {k: v for k, v in again.items() if k != "contains"} == {k: v for k, v in card.items() if k != "contains"}
    assert len(again["contains"]) == len(card["contains"])


def test_the_recipe_modules_do_not_import_the_registry():
    """No import circle: zoo_recipes knows no recipe; the recipe modules import zoo_recipes; zoo.recipe finds them."""
    import ast
    import inspect

    from circuits.models import zoo_recipes

    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(zoo_recipes)))
                if isinstance(node, ast.ImportFrom)}
    assert not imported & {"circuits.models.zoo", "circuits.models.zoo_synthetic", "circuits.models.zoo_pycode"}
    assert {zoo.recipe(name).name for name in zoo.NAMES} == set(zoo.NAMES)
    with pytest.raises(ValueError, match="name: no recipe"):
        zoo.recipe("attn9l-nothing")


# ---------------------------------------------------------------- attn2l-induction


def test_attn2l_induction_heads_are_the_ones_the_card_names(record_property):
    _require("attn2l-induction")
    model, card = load_pretrained("attn2l-induction"), model_card("attn2l-induction")
    half = card["measurements"]["eval_half_len"]
    tokens = repeated_random_tokens(256, half, card["data"]["d_vocab"], bos=card["data"]["bos"], generator=_gen())
    prev, ind = previous_token_scores(model, tokens).values, induction_scores(model, tokens, half).values
    threshold = card["head_score_threshold"]
    found_prev = [row[:2] for row in heads_above(prev, threshold)]
    found_ind = [row[:2] for row in heads_above(ind, threshold)]
    diff = max(
        float((prev - torch.tensor(card["head_scores"]["previous_token"])).abs().max()),
        float((ind - torch.tensor(card["head_scores"]["induction"])).abs().max()),
    )
    _report(record_property, previous_token_heads=found_prev, induction_heads=found_ind,
            max_score_difference_to_card=round(diff, 4))
    assert sorted(found_prev) == sorted(card["previous_token_heads"]) and found_prev
    assert sorted(found_ind) == sorted(card["induction_heads"]) and found_ind
    assert all(layer == 0 for layer, _ in found_prev) and all(layer == 1 for layer, _ in found_ind)
    assert diff < 0.05


# ---------------------------------------------------------------- attn0l-bigram


def _direct_path_logits(model) -> torch.Tensor:
    """embed → final LayerNorm (if any; applied to each W_E row, as bigram_table does) → unembed (+ b_U)."""
    x = model.W_E.detach().double()
    if model.cfg.normalization_type is not None:
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        sd = model.state_dict()
        x = x * sd["ln_final.weight"].double() + sd["ln_final.bias"].double()
    logits = x @ model.W_U.detach().double()
    b_U = getattr(model, "b_U", None)
    return logits if b_U is None else logits + b_U.detach().double()


def test_attn0l_bigram_direct_path_is_the_cards_log_transition_matrix(record_property):
    _require("attn0l-bigram")
    model, card = load_pretrained("attn0l-bigram"), model_card("attn0l-bigram")
    d = card["data"]
    chain = markov_chain(d["n_states"], support=d["support"], floor=d["floor"], seed=d["seed"])
    log_p = chain.log_transition().double()
    table = _direct_path_logits(model)
    # the table is the model: a 0-layer model's logits at position p are the table's row plus W_pos[p]'s reading
    tokens = chain.sample(8, d["seq_len"], generator=_gen())
    with torch.no_grad():
        logits = model(tokens).double()
    pos_part = model.W_pos.detach().double()[: d["seq_len"]] @ model.W_U.detach().double()
    assert torch.allclose(logits, table[tokens] + pos_part, atol=1e-4)
    log_softmax = table.log_softmax(-1)
    row_centred = _pearson(log_softmax - log_softmax.mean(1, keepdim=True), log_p - log_p.mean(1, keepdim=True))
    plain = _pearson(log_softmax, log_p)
    top1 = float((table.argmax(-1) == chain.likeliest_next()).double().mean())
    _report(record_property, row_centred_correlation=round(row_centred, 4), log_softmax_correlation=round(plain, 4),
            card_correlation=card["measurements"]["bigram_correlation"], likeliest_successor_per_state=top1)
    assert abs(row_centred - card["measurements"]["bigram_correlation"]) < 1e-4
    assert plain > 0.9


def test_attn0l_bigram_predicts_like_the_chain_on_fresh_samples(record_property):
    _require("attn0l-bigram")
    model, card = load_pretrained("attn0l-bigram"), model_card("attn0l-bigram")
    d = card["data"]
    chain = markov_chain(d["n_states"], support=d["support"], floor=d["floor"], seed=d["seed"])
    tokens = chain.sample(256, d["seq_len"], generator=_gen())
    with torch.no_grad():
        model_logp = model(tokens)[:, :-1].log_softmax(-1).double()
    true_logp = chain.log_transition().double()[tokens[:, :-1]]
    kl = float((true_logp.exp() * (true_logp - model_logp)).sum(-1).mean())
    _report(record_property, kl_to_chain=round(kl, 4), card_kl=card["measurements"]["kl_to_chain"])
    # KL is an average of per-state terms: fresh samples weight the states differently, so within a factor 2
    assert card["measurements"]["kl_to_chain"] / 2 < kl < 2 * card["measurements"]["kl_to_chain"]


# ---------------------------------------------------------------- attn1l-skiptrigram


def test_attn1l_skiptrigram_predicts_c_at_b_with_the_cards_accuracy(record_property):
    _require("attn1l-skiptrigram")
    model, card = load_pretrained("attn1l-skiptrigram"), model_card("attn1l-skiptrigram")
    d = card["data"]
    table = skip_trigram_table(d["n_a"], d["n_b"], d["d_vocab"])
    assert [list(t) for t in table.triples] == card["measurements"]["table"]
    n = 1024
    tokens, b_pos = table.sample(n, d["seq_len"], generator=_gen())
    rows = torch.arange(n)
    with torch.no_grad():
        at_b = model(tokens)[rows, b_pos]
    a_tok = tokens[(tokens[..., None] == torch.tensor(table.a_tokens)).any(-1)]
    expected = torch.tensor([table.completion(int(a), int(b)) for a, b in zip(a_tok, tokens[rows, b_pos])])
    assert torch.equal(expected, tokens[rows, b_pos + 1])  # the sampler planted C = table[A, B] after B
    accuracy = float((at_b.argmax(-1) == expected).double().mean())
    p = card["measurements"]["completion_accuracy"]
    # three binomial standard errors, and at least three errors in n
    tolerance = 3 * math.sqrt(max(p * (1 - p), 1 / n) / n)
    _report(record_property, completion_accuracy=accuracy, card_accuracy=p, samples=n, tolerance=round(tolerance, 4))
    assert abs(accuracy - p) <= tolerance


def test_attn1l_skiptrigram_b_to_a_heads_are_the_ones_the_card_names(record_property):
    _require("attn1l-skiptrigram")
    model, card = load_pretrained("attn1l-skiptrigram"), model_card("attn1l-skiptrigram")
    d = card["data"]
    table = skip_trigram_table(d["n_a"], d["n_b"], d["d_vocab"])
    tokens, b_pos = table.sample(512, d["seq_len"], generator=_gen())
    rows = torch.arange(len(tokens))
    a_pos = (tokens[..., None] == torch.tensor(table.a_tokens)).any(-1).long().argmax(-1)
    b_to_a = attention_patterns(model, tokens)[0][rows, :, b_pos, a_pos].mean(0)
    found = [[0, h] for h in range(len(b_to_a)) if b_to_a[h] > 0.4]
    _report(record_property, attention_b_to_a=[round(float(x), 4) for x in b_to_a])
    assert found == [row[:2] for row in sorted(card["skip_trigram_heads"], key=lambda r: r[1])]


# ---------------------------------------------------------------- attn2l-pycode


@pytest.fixture(scope="module")
def pycode():
    _require("attn2l-pycode")
    corpus = code_corpus()
    model = load_pretrained("attn2l-pycode")
    return model, model_card("attn2l-pycode"), corpus.heldout_texts()


def test_attn2l_pycode_tokenizer_round_trips_held_out_code(pycode):
    model, _, texts = pycode
    assert model.bpe.vocab_size == model.cfg.d_vocab
    for text in texts:
        ids = model.bpe.encode(text)
        assert model.bpe.bos_id not in ids
        assert model.bpe.to_string(ids) == text


def test_attn2l_pycode_heldout_loss_matches_the_card(pycode, record_property):
    model, card, texts = pycode
    stream = encode_texts(model.bpe, texts)
    n_ctx, n = model.cfg.n_ctx, 256
    windows = random_windows(stream, n, n_ctx - 1, generator=_gen())
    tokens = torch.cat([torch.full((n, 1), model.bpe.bos_id), windows], dim=1)
    with torch.no_grad():
        logits = model(tokens)
    per_row = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(1).double()
    loss = float(per_row.mean())
    # the card's figure and this one are two independent means of n rows: four standard errors of a difference
    tolerance = 4 * math.sqrt(2) * float(per_row.std()) / math.sqrt(n)
    _report(record_property, heldout_loss=round(loss, 4), card_heldout_loss=card["heldout_loss"],
            tolerance=round(tolerance, 4))
    assert abs(loss - card["heldout_loss"]) < tolerance


def test_card_json_is_plain_json():
    """Every card parses with the json module alone (no NaN / Infinity)."""
    for name in PRESENT:
        json.loads((zoo.zoo_path(name) / zoo.CARD).read_text(), parse_constant=lambda c: pytest.fail(c))


# ---------------------------------------------------------------- attn2l-pycode-induction


@pytest.fixture(scope="module")
def pycode_induction():
    _require("attn2l-pycode-induction")
    model = load_pretrained("attn2l-pycode-induction")
    return model, model_card("attn2l-pycode-induction"), code_corpus().heldout_texts()


def test_attn2l_pycode_induction_heads_and_in_context_drop_on_fresh_held_out_code(pycode_induction, record_property):
    """Re-measured on fresh rows: the heads the card names by Olsson et al.'s test (repeated random tokens) pass
    the threshold, the shifted-induction scores the card reports hold, and the second copy of a repeated snippet
    of held-out code is predicted better than the first, as the card says."""
    from circuits.models.zoo_pycode import head_shapes

    model, card, texts = pycode_induction
    shapes = card["measurements"]["attention_shapes"]
    rand_half = shapes["repeated_random_tokens"]["half_len"]
    rand = repeated_random_tokens(256, rand_half, model.cfg.d_vocab, bos=model.bpe.bos_id, generator=_gen())
    prev, ind = previous_token_scores(model, rand).values, induction_scores(model, rand, rand_half).values
    threshold = card["head_score_threshold"]
    found_prev = [row[:2] for row in heads_above(prev, threshold)]
    found_ind = [row[:2] for row in heads_above(ind, threshold)]
    fresh = head_shapes(model, rand, rand_half)["heads"]
    shifted = {name: (h["best_lag"], h["best_lag_score"], fresh[name]["best_lag"], fresh[name]["best_lag_score"])
               for name, h in shapes["repeated_random_tokens"]["heads"].items() if name.startswith("L1")}
    half = card["measurements"]["repeated_code_half_len"]
    snippets = random_windows(encode_texts(model.bpe, texts), 256, half, generator=_gen())
    tokens = torch.cat([torch.full((256, 1), model.bpe.bos_id), snippets, snippets], dim=1)
    with torch.no_grad():
        logits = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    first, second = float(losses[:, 1:half].mean()), float(losses[:, half + 1:2 * half].mean())
    _report(record_property, previous_token_heads=found_prev, induction_heads=found_ind, shifted=shifted,
            in_context_drop=round(first - second, 4), card_drop=card["measurements"]["in_context_drop"])
    assert sorted(found_ind) == sorted(card["induction_heads"])
    assert sorted(found_prev) == sorted(card["previous_token_heads"])
    for lag, score, fresh_lag, fresh_score in shifted.values():
        assert fresh_lag == lag and abs(fresh_score - score) < 0.05, shifted
    assert first - second > 0.5 * card["measurements"]["in_context_drop"] > 0


def test_attn2l_pycode_induction_tuned_lens_beats_the_logit_lens_on_fresh_held_out_code(pycode_induction,
                                                                                        record_property):
    from circuits.activations import TunedLens, logit_lens, tuned_lens
    from circuits.models.zoo_pycode import code_rows

    model, card, texts = pycode_induction
    lens = TunedLens.load(zoo.zoo_path("attn2l-pycode-induction"), model)
    held = code_rows(model, texts, 32, seed=FRESH_SEED)
    plain = logit_lens(model, held).kl_to_final().values.mean(-1)
    tuned = tuned_lens(model, held, lens).kl_to_final().values.mean(-1)
    _report(record_property, logit_lens_kl=[round(float(v), 4) for v in plain],
            tuned_lens_kl=[round(float(v), 4) for v in tuned])
    assert (tuned[:-1] <= plain[:-1]).all()
    assert float(tuned[-1]) == pytest.approx(0.0, abs=1e-5)
    d = model.cfg.d_model
    assert float((lens.weight[-1] - torch.eye(d)).abs().max()) < 1e-4


def test_the_warm_start_sets_a_previous_token_head_and_an_induction_head_and_nothing_else():
    """Before any training, the warm start alone gives L0H0 a previous-token score and L1H0 an induction score
    near 1 on repeated random tokens (Olsson et al.'s tests), while the other heads stay at chance; the weights it
    leaves alone are bit-identical to the plain build's."""
    from circuits.models.build import build
    from circuits.models.zoo_pycode import INDUCTION_SPEC, warm_start_induction_circuit

    plain, model = build(INDUCTION_SPEC, seed=0), build(INDUCTION_SPEC, seed=0)
    warm_start_induction_circuit(model)
    rand = repeated_random_tokens(32, 30, INDUCTION_SPEC.d_vocab - 1, bos=INDUCTION_SPEC.d_vocab - 1,
                                  generator=_gen())
    prev, ind = previous_token_scores(model, rand).values, induction_scores(model, rand, 30).values
    assert float(prev[0, 0]) > 0.9 and float(ind[1, 0]) > 0.9
    others = torch.ones(2, 4, dtype=torch.bool)
    others[0, 0] = others[1, 0] = False
    assert float(prev[others].max()) < 0.2 and float(ind[others].max()) < 0.2
    before, after = plain.state_dict(), model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    warm = {"embed.weight", "pos_embed.weight", "blocks.1.attn.q.weight", "blocks.1.attn.k.weight"}
    warm |= {f"blocks.0.attn.{p}.weight" for p in "qkvo"}
    assert changed == warm
    d_head = INDUCTION_SPEC.d_head  # the other heads' rows (q, k, v: [head · d_head, d_model]) and columns (o)
    for name in warm - {"embed.weight", "pos_embed.weight", "blocks.0.attn.o.weight"}:
        assert torch.equal(before[name][d_head:], after[name][d_head:]), name
    assert torch.equal(before["blocks.0.attn.o.weight"][:, d_head:], after["blocks.0.attn.o.weight"][:, d_head:])


def test_regenerate_runs_the_recipes_init_on_the_built_model_before_training(tmp_path):
    from circuits.models.build import ModelSpec
    from circuits.models.zoo_recipes import Recipe, regenerate

    seen = []

    def init(model):
        seen.append(float(model.original_model.pos.weight.detach().abs().sum()))
        with torch.no_grad():
            model.original_model.pos.weight.zero_()

    r = Recipe(name="tiny", summary="s", spec=ModelSpec(1, 16, 2, 8, d_vocab=10, n_ctx=8), steps=1, lr=1e-9,
               batch_size=2, make_data=lambda: (torch.randint(0, 10, (4, 8), generator=_gen()), None),
               measure=lambda m: {"heldout_loss": 0.0, "heldout_loss_definition": "d", "contains": []},
               data={"description": "d"}, init=init)
    regenerate(r, tmp_path, progress=False)
    trained = load(tmp_path / "tiny").original_model.pos.weight
    assert len(seen) == 1 and seen[0] > 0
    assert float(trained.detach().abs().max()) < 1e-6  # zeroed by init, then one step of lr 1e-9

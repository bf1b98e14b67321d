"""The foundation: building, the 0-layer model, save/load, training, the tokenizer, the planted model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from circuits.models import (
    BPETokenizer,
    ModelSpec,
    attn_only,
    build,
    load,
    planted_induction,
    save,
    train,
)
from circuits.tasks import induction_task


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_attn_only_shapes_and_hooks():
    model = attn_only(2, 32, 4, 8, d_vocab=24, n_ctx=20)
    assert model.W_Q.shape == (2, 4, 32, 8)
    assert model.W_O.shape == (2, 4, 8, 32)
    assert model.W_U.shape == (32, 24)
    logits, cache = model.run_with_cache(torch.randint(0, 24, (3, 7)))
    assert logits.shape == (3, 7, 24)
    assert "blocks.1.attn.hook_z" in cache and "ln_final.hook_scale" in cache


def test_zero_layer_model_is_embed_ln_unembed():
    model = attn_only(0, 16, 2, 8, d_vocab=20, n_ctx=10, seed=3)
    tokens = torch.randint(0, 20, (4, 6))
    logits, cache = model.run_with_cache(tokens)
    assert model.cfg.n_layers == 0
    assert not any(name.startswith("blocks.") for name in cache.keys())
    resid = model.W_E[tokens] + model.W_pos[:6]
    ln = model.ln_final
    expected = F.layer_norm(resid, (16,), ln.weight, ln.bias, eps=model.cfg.eps) @ model.W_U + model.b_U
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_zero_layer_without_layernorm_is_exactly_linear():
    model = attn_only(0, 16, 2, 8, d_vocab=20, n_ctx=10, layernorm=False)
    tokens = torch.randint(0, 20, (2, 5))
    expected = (model.W_E[tokens] + model.W_pos[:5]) @ model.W_U + model.b_U
    torch.testing.assert_close(model(tokens), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_layers", [0, 1, 2])
def test_save_load_round_trip_is_bit_exact(tmp_path, n_layers):
    model = attn_only(n_layers, 32, 4, 8, d_vocab=24, n_ctx=20, seed=5)
    loaded = load(save(model, tmp_path / "m"))
    assert _states_equal(model, loaded)
    tokens = torch.randint(0, 24, (2, 9))
    assert torch.equal(model(tokens), loaded(tokens))


def test_save_load_keeps_the_tokenizer(tmp_path):
    model = attn_only(1, 16, 2, 8, d_vocab=300, n_ctx=16)
    model.bpe = BPETokenizer.train(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    loaded = load(save(model, tmp_path / "m"))
    text = "def g(y):\n    return y\n"
    assert torch.equal(loaded.bpe.to_tokens(text), model.bpe.to_tokens(text))


def test_save_load_model_with_mlps(tmp_path):
    model = build(ModelSpec(1, 32, 4, 8, 24, 16, d_mlp=64, act_fn="gelu"), seed=2)
    loaded = load(save(model, tmp_path / "m"))
    assert _states_equal(model, loaded)


def test_load_errors_name_the_file(tmp_path):
    folder = save(attn_only(1, 16, 2, 8, d_vocab=20, n_ctx=10), tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load(tmp_path / "does-not-exist")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*SHA-256"):
        load(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load(folder)


def test_load_rejects_weights_that_do_not_match_the_config(tmp_path):
    folder = save(attn_only(1, 16, 2, 8, d_vocab=20, n_ctx=10), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["spec"]["d_vocab"] = 21
    config["bridge_config"].update(d_vocab=21, d_vocab_out=21)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"embed\.weight.*shape"):
        load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        load(folder)


def test_build_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_layers"):
        attn_only(-1, 16, 2, 8, d_vocab=20, n_ctx=10)
    with pytest.raises(ValueError, match="d_head"):
        attn_only(1, 16, 2, 0, d_vocab=20, n_ctx=10)


def test_training_is_deterministic_for_a_seed_and_learns():
    data = torch.randint(0, 20, (64, 12))
    data[:, 6:] = data[:, :6]
    runs = []
    for seed in (0, 0, 1):
        model = attn_only(2, 32, 4, 8, d_vocab=20, n_ctx=12, seed=7)
        log = train(model, data, steps=30, lr=3e-3, batch_size=16, seed=seed, progress=False)
        runs.append((model, log))
    assert _states_equal(runs[0][0], runs[1][0])
    assert runs[0][1].losses == runs[1][1].losses
    assert not _states_equal(runs[0][0], runs[2][0])
    assert runs[0][1].losses[-1] < runs[0][1].losses[0]


def test_training_progress_bar_can_be_silenced(capsys):
    model = attn_only(1, 16, 2, 8, d_vocab=20, n_ctx=8)
    train(model, torch.randint(0, 20, (8, 8)), steps=3, batch_size=4, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_training_rejects_bad_arguments():
    model = attn_only(1, 16, 2, 8, d_vocab=20, n_ctx=8)
    with pytest.raises(ValueError, match="steps"):
        train(model, torch.randint(0, 20, (8, 8)), steps=0, progress=False)
    with pytest.raises(ValueError, match="data"):
        train(model, torch.randint(0, 20, (8,)), steps=1, progress=False)


def test_tokenizer_round_trips_text():
    corpus = ["import os\nprint(os.getcwd())\n", "for i in range(10):\n    x = i * 2\n"] * 10
    tok = BPETokenizer.train(corpus, vocab_size=300)
    text = "for j in range(3):\n    print(j, 'ü')\n"
    tokens = tok.to_tokens(text)
    assert tokens[0, 0].item() == tok.bos_id
    assert tok.to_string(tokens) == text
    ascii_text = "for j in range(3):\n    print(j)\n"  # a token may hold half of a multi-byte character
    assert "".join(tok.to_str_tokens(tok.to_tokens(ascii_text)[0])[1:]) == ascii_text


def test_planted_model_solves_induction(planted):
    heads = planted.planted
    assert heads.previous_token == (0, 2) and heads.induction == (1, 1)
    assert len(heads.inert) == 4
    task = induction_task(128, 15, planted.cfg.d_vocab, seed=11)
    logits = planted(task.clean)[:, task.positions]
    accuracy = (logits.argmax(-1) == task.answers).float().mean().item()
    loss = -logits.log_softmax(-1).gather(-1, task.answers[..., None]).mean().item()
    assert accuracy > 0.99
    assert loss < 0.05


def test_planted_heads_attend_as_constructed(planted):
    task = induction_task(16, 15, planted.cfg.d_vocab, seed=12)
    _, cache = planted.run_with_cache(task.clean)
    (l0, h0), (l1, h1) = planted.planted.previous_token, planted.planted.induction
    prev = cache[f"blocks.{l0}.attn.hook_pattern"][:, h0]
    assert prev.diagonal(offset=-1, dim1=-2, dim2=-1).mean() > 0.99
    ind = cache[f"blocks.{l1}.attn.hook_pattern"][:, h1]
    T = 15
    dest = torch.arange(T + 1, 2 * T + 1)
    assert ind[:, dest, dest - T + 1].mean() > 0.99


def test_planted_rejects_bad_head_index():
    with pytest.raises(ValueError, match="induction_head"):
        planted_induction(n_heads=2, previous_token_head=0, induction_head=2)

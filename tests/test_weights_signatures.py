"""Head signatures and skip-trigrams: brute-force eigenvalues, a brute-force trigram cube, planted answers."""

from __future__ import annotations

import copy

import einops
import pytest
import torch
from helpers import perturb_norms_and_biases

from circuits.models import attn_only
from circuits.models.build import ModelSpec, build
from circuits.weights import (
    classify_heads,
    copying_scores,
    full_ov_circuit,
    offset_profile,
    positional_attention,
    positional_input,
    previous_token_scores,
    skip_trigram_scores,
    skip_trigrams,
    uniform_previous_attention,
)


def test_copying_scores_equal_brute_force_eigenvalues(tiny2):
    """Eigenvalues through the d_head × d_head product == eigenvalues of the materialised d_vocab² circuit."""
    scores = copying_scores(tiny2).values
    for layer in range(2):
        for head in range(4):
            lam = torch.linalg.eigvals(full_ov_circuit(tiny2, layer, head).AB.double())
            expected = float(lam.sum().real / lam.abs().sum())
            assert float(scores[layer, head]) == pytest.approx(expected, abs=1e-4)
    assert (scores.abs() <= 1 + 1e-6).all()


@pytest.mark.parametrize("layernorm", [True, False])
def test_positional_attention_is_the_pattern_when_every_token_embeds_alike(layernorm):
    """Oracle: with every row of W_E equal, the average token is the token and the σ over the vocabulary is
    the σ of the input, so the weight-only positional pattern is the model's layer-0 pattern exactly
    (LayerNorm weights/biases and q/k biases perturbed)."""
    m = attn_only(1, 24, 3, 8, d_vocab=20, n_ctx=12, layernorm=layernorm, seed=11)
    perturb_norms_and_biases(m)
    with torch.no_grad():
        m.embed.weight.copy_(torch.randn(24).expand(20, 24))
    _, cache = m.run_with_cache(torch.randint(0, 20, (1, 12)))
    pattern = cache["blocks.0.attn.hook_pattern"][0]
    for h in range(3):
        torch.testing.assert_close(positional_attention(m, 0, h), pattern[h], rtol=1e-5, atol=1e-6)


def test_positional_input_sigma_is_the_rms_over_the_vocabulary(tiny2):
    """The closed-form σ equals the RMS of LayerNorm's σ over every (token, position) pair."""
    m = tiny2
    W_E, W_pos = m.W_E.detach(), m.W_pos.detach()
    x = W_E[None] + W_pos[:, None]  # [pos, token, d_model]
    x = x - x.mean(-1, keepdim=True)
    sigma = (x.pow(2).mean(-1) + m.cfg.eps).mean(1).sqrt()  # RMS over tokens of each σ
    mean_tok = W_E.mean(0) + W_pos
    mean_tok = mean_tok - mean_tok.mean(-1, keepdim=True)
    expected = mean_tok / sigma[:, None] * m.blocks[1].ln1.w.detach() + m.blocks[1].ln1.b.detach()
    torch.testing.assert_close(positional_input(m, 1), expected, rtol=1e-5, atol=1e-6)


def test_previous_token_score_and_margin_brute_force(tiny2):
    pattern = positional_attention(tiny2, 1, 2)
    n = pattern.shape[0]
    expected = sum(pattern[i, i - 1] for i in range(1, n)) / (n - 1)
    scores = previous_token_scores(tiny2)
    assert float(scores.values[1, 2]) == pytest.approx(float(expected), rel=1e-5)
    profile = [sum(pattern[i, i - o] for i in range(max(o, 1), n)) / (n - max(o, 1)) for o in range(n)]
    torch.testing.assert_close(offset_profile(pattern), torch.stack(profile), rtol=1e-5, atol=1e-7)
    margin = profile[1] - max(p for o, p in enumerate(profile) if o != 1)
    assert float(scores.info["margin"][1, 2]) == pytest.approx(float(margin), rel=1e-4, abs=1e-7)
    assert scores.info["uniform"] == pytest.approx(sum(1 / (i + 1) for i in range(1, 20)) / 19)


def test_a_position_blind_head_is_not_previous_token(tiny2_noln):
    """Zero W_Q (and b_Q): uniform causal attention; its score is the uniform level, offsets 0 and 1 tie (margin 0)."""
    m = copy.deepcopy(tiny2_noln)
    with torch.no_grad():
        m.blocks[0].attn.q.weight.zero_()
        m.blocks[0].attn.q.bias.zero_()
    scores = previous_token_scores(m)
    assert float(scores.values[0, 0]) == pytest.approx(uniform_previous_attention(20), rel=1e-5)
    assert float(scores.info["margin"][0, 0]) == pytest.approx(0, abs=1e-7)
    assert (0, 0) not in classify_heads(m).heads("previous_token")


def test_classify_heads_names_exactly_the_planted_heads(planted):
    result = classify_heads(planted)
    assert result.heads("previous_token") == [planted.planted.previous_token]
    assert result.heads("induction") == [planted.planted.induction]
    lay, h = planted.planted.induction
    assert result.info["induction_source"][lay][h] == "L{}H{}".format(*planted.planted.previous_token)
    assert result.values.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="label must be one of"):
        result.heads("copy")


def test_skip_trigrams_equal_the_brute_force_cube():
    model = attn_only(1, 16, 2, 8, d_vocab=14, n_ctx=8, seed=9)
    qk, ov = skip_trigram_scores(model, 0, 1)  # [dest, src], [src, out]
    cube = einops.einsum(qk, ov, "d s, s o -> s d o")
    top = skip_trigrams(model, 0, 1, k=15)
    expected = cube.flatten().topk(15).values
    torch.testing.assert_close(top.values, expected, rtol=1e-6, atol=0)
    for (s, d, o), v in zip(top.triples.tolist(), top.values):
        assert float(cube[s, d, o]) == pytest.approx(float(v), rel=1e-6)


PLANTED_TRIGRAMS = [(3, 7, 11), (5, 2, 9), (8, 4, 1)]  # (source, destination, output)


def _planted_skip_trigram_model(V: int = 14, n_ctx: int = 8):
    """1 layer, no LN; residual = [TOK (V) | OUT (V)]; head 0 attends from dest to source and copies source→output."""
    spec = ModelSpec(1, 2 * V, 2, V, V, n_ctx, layernorm=False)
    model = build(spec, seed=0)
    gen = torch.Generator().manual_seed(1)
    W = {name: 0.01 * torch.randn(2, 2 * V, V, generator=gen) for name in ("q", "k", "v")}
    W_O = 0.01 * torch.randn(2, V, 2 * V, generator=gen)
    W["q"][0], W["k"][0], W["v"][0], W_O[0] = 0, 0, 0, 0
    W["q"][0, :V] = torch.eye(V)
    W["v"][0, :V] = torch.eye(V)
    for s, d, o in PLANTED_TRIGRAMS:
        W["k"][0, s, d] = 8.0  # key token s matches query token d
        W_O[0, s, V + o] = 5.0  # attending to s raises o
    sd = model.state_dict()
    for name in ("q", "k", "v"):
        sd[f"blocks.0.attn.{name}.weight"] = einops.rearrange(W[name], "h m d -> (h d) m")
    sd["blocks.0.attn.o.weight"] = einops.rearrange(W_O, "h d m -> m (h d)")
    sd["embed.weight"] = torch.cat([torch.eye(V), torch.zeros(V, V)], dim=1)
    sd["pos_embed.weight"] = torch.zeros(n_ctx, 2 * V)
    sd["unembed.weight"] = torch.cat([torch.zeros(V, V), torch.eye(V)], dim=1)
    model.load_state_dict(sd)
    return model


def test_planted_skip_trigrams_are_the_top_three():
    model = _planted_skip_trigram_model()
    top = skip_trigrams(model, 0, 0, k=3)
    assert sorted(map(tuple, top.triples.tolist())) == sorted(PLANTED_TRIGRAMS)
    assert top.labels[0][0].count("…") == 1


def test_bad_input(tiny2):
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\)"):
        skip_trigrams(tiny2, 5, 0)
    with pytest.raises(ValueError, match=r"head must be an integer in \[0, 4\)"):
        skip_trigrams(tiny2, 0, 4)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        skip_trigrams(tiny2, 0, 0, k=0)
    with pytest.raises(ValueError, match="no attention layers"):
        copying_scores(attn_only(0, 16, 2, 8, d_vocab=10, n_ctx=8))
    with pytest.raises(ValueError, match=r"head must be an integer in \[0, 4\)"):
        positional_attention(tiny2, 1, 7)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\)"):
        positional_input(tiny2, 2)

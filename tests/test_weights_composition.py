"""Composition scores against transformer_lens's all_composition_scores, the planted model, and the baseline."""

from __future__ import annotations

import copy

import pytest
import torch

from circuits.models import attn_only
from circuits.weights import all_composition_scores, composition_baseline, composition_scores
from circuits.weights.composition import _left_factor, _right_factor

# (n_layers, d_model, n_heads, d_head): n_heads, d_head and d_model all differ; the third has d_head > d_model
SHAPES = [(3, 32, 4, 8), (2, 24, 5, 16), (3, 16, 3, 40)]


def _rel_err(ours, ref) -> float:
    ref = ref.detach()
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_equals_transformer_lens(shape, kind):
    model = attn_only(*shape, d_vocab=20, n_ctx=16, seed=sum(shape))
    ref = model.all_composition_scores(kind).scores
    ours = composition_scores(model, kind, fold_layernorm=False)
    assert ours.scores.shape == ref.shape
    assert _rel_err(ours.scores, ref) < 1e-5


def test_fold_layernorm_equals_transformer_lens_on_processed_weights():
    """fold_layernorm=True on the raw model == all_composition_scores after process_weights(fold_ln=True)."""
    model = attn_only(3, 32, 4, 8, d_vocab=20, n_ctx=16, seed=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in range(3):
            model.blocks[layer].ln1.w.mul_(2 * torch.rand(32, generator=gen))
    processed = copy.deepcopy(model)
    processed.process_weights(fold_ln=True, center_writing_weights=False, center_unembed=False,
                              fold_value_biases=False)
    ours = all_composition_scores(model)
    for kind in "QKV":
        ref = processed.all_composition_scores(kind).scores
        assert _rel_err(ours[kind].scores, ref) < 1e-5
        assert _rel_err(composition_scores(model, kind).scores, ref) < 1e-5
    unfolded = composition_scores(model, "K", fold_layernorm=False).scores
    assert _rel_err(unfolded, ours["K"].scores) > 1e-3  # the fold matters for these LN weights


def test_planted_previous_token_to_induction_is_the_top_k_composition(planted):
    result = composition_scores(planted, "K")
    (la, ha), (lb, hb) = planted.planted.previous_token, planted.planted.induction
    top = result.scores.flatten().argmax()
    assert torch.unravel_index(top, result.scores.shape) == (la, ha, lb, hb)
    base = result.baseline
    score = float(result.scores[la, ha, lb, hb])
    assert score > base.mean + 5 * base.std
    assert float(result.zscores[la, ha, lb, hb]) == pytest.approx((score - base.mean) / base.std, rel=1e-5)
    assert result.top_pairs(1)[0][:2] == (f"L{la}H{ha}", f"L{lb}H{hb}")


def test_baseline_matches_brute_force_on_the_same_samples():
    """The baseline's fast path (QR factors) equals explicit d_model × d_model products on the same draws."""
    d_model, d_head, n, seed = 24, 6, 64, 3
    base = composition_baseline(d_model, d_head, n, seed)
    gen = torch.Generator().manual_seed(seed)
    W_V, X = (torch.randn(n, d_model, d_head, generator=gen) for _ in range(2))
    W_O, Y = (torch.randn(n, d_head, d_model, generator=gen) for _ in range(2))
    WA, WB = W_V @ W_O, X @ Y
    fro = torch.linalg.matrix_norm
    brute = fro(WA @ WB) / fro(WA) / fro(WB)
    assert base.mean == pytest.approx(float(brute.mean()), rel=1e-5)
    assert base.std == pytest.approx(float(brute.std()), rel=1e-4)
    fast = (_left_factor(W_V, W_O) @ _right_factor(X, Y)).flatten(1).norm(dim=1)
    torch.testing.assert_close(fast, fro(WA @ WB), rtol=1e-5, atol=0)


def test_mask_and_zero_below_diagonal(tiny2):
    result = composition_scores(tiny2, "V")
    assert result.mask.sum() == 4 * 4  # layer 0 → layer 1 only
    assert (result.scores[~result.mask] == 0).all() and (result.zscores[~result.mask] == 0).all()
    assert (result.scores[result.mask] > 0).all()


def test_bad_input(tiny2):
    with pytest.raises(ValueError, match=r"kind must be one of \['Q', 'K', 'V'\], got 'X'"):
        composition_scores(tiny2, "X")
    with pytest.raises(ValueError, match="no attention layers"):
        composition_scores(attn_only(0, 16, 2, 8, d_vocab=10, n_ctx=8), "K")
    with pytest.raises(ValueError, match="n_samples must be at least 2"):
        composition_baseline(16, 4, 1)


def test_model_left_unchanged(tiny2):
    before = {k: v.clone() for k, v in tiny2.state_dict().items()}
    all_composition_scores(tiny2)
    assert all(torch.equal(before[k], v) for k, v in tiny2.state_dict().items())


def test_to_networkx_keeps_the_planted_edge(planted):
    graph = composition_scores(planted, "K").to_networkx(min_zscore=5.0)
    assert list(graph.edges) == [(f"L0H{planted.planted.previous_token[1]}",
                                  f"L1H{planted.planted.induction[1]}")]
    assert graph.number_of_nodes() == 6

"""Composition scores against transformer_lens's all_composition_scores, the planted model, and the baseline."""

from __future__ import annotations

import copy

import pytest
import torch

from circuits.models import attn_only
from circuits.weights import all_composition_scores, composition_baseline, composition_scores
from circuits.weights.composition import (
    _baseline_from_grams,
    _direct_grams,
    _left_factor,
    _reduced_grams,
    _right_factor,
)

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


@pytest.mark.parametrize("d_model", [200, 128])
def test_gram_and_blocks_methods_equal_transformer_lens(d_model):
    """Both ways of computing the pair norms, on a d_model that spans uneven (200) and exact (128) Gram blocks."""
    model = attn_only(3, d_model, 3, 8, d_vocab=20, n_ctx=16, seed=d_model)
    for kind in "QKV":
        ref = model.all_composition_scores(kind).scores
        for method in ("gram", "blocks"):
            assert _rel_err(composition_scores(model, kind, fold_layernorm=False, method=method).scores, ref) < 1e-5


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


def _brute_force_scores(d_model: int, d_head: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    W_V, X = (torch.randn(n, d_model, d_head, generator=gen, dtype=torch.float64) for _ in range(2))
    W_O, Y = (torch.randn(n, d_head, d_model, generator=gen, dtype=torch.float64) for _ in range(2))
    WA, WB = W_V @ W_O, X @ Y
    fro = torch.linalg.matrix_norm
    return fro(WA @ WB) / fro(WA) / fro(WB)


@pytest.mark.parametrize("d_model, d_head", [(24, 6), (8, 12)])
def test_baseline_gram_formulas_equal_brute_force_on_the_same_samples(d_model, d_head):
    """The d_head × d_head trace formulas == explicit d_model × d_model products on the same Gaussian draws;
    (8, 12) is the d_head > d_model case, which the baseline computes this way."""
    n, seed = 64, 3
    ours = _baseline_from_grams(_direct_grams(n, d_model, d_head, seed))
    torch.testing.assert_close(ours, _brute_force_scores(d_model, d_head, n, seed), rtol=1e-10, atol=0)
    if d_model < d_head:
        base = composition_baseline(d_model, d_head, n, seed)
        assert base.mean == pytest.approx(float(ours.mean()), rel=1e-12)


@pytest.mark.parametrize("d_model, d_head", [(24, 6), (16, 12)])
def test_reduced_baseline_has_the_distribution_of_brute_force(d_model, d_head):
    """Drawn in distribution (Bartlett/Wishart) vs explicit Gaussian matrices, 20000 samples each (fixed seeds):
    means within 4 standard errors, standard deviations within 3%. (16, 12): d_model − d_head < d_head."""
    n = 20000
    ours = _baseline_from_grams(_reduced_grams(n, d_model, d_head, seed=0))
    brute = _brute_force_scores(d_model, d_head, n, seed=1)
    se = float((ours.var() / n + brute.var() / n).sqrt())
    assert abs(float(ours.mean() - brute.mean())) < 4 * se
    assert float(ours.std()) == pytest.approx(float(brute.std()), rel=0.03)


def test_reduced_baseline_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    composition_baseline.cache_clear()
    composition_baseline(32, 8, 16, 0)
    torch.testing.assert_close(torch.rand(3), expected)


def test_left_and_right_factors_keep_the_norms():
    """Ã = R_V·W_O and B̃ = X·R_Yᵀ: ‖Ã·B̃‖ = ‖W_V·W_O·X·Y‖ and ‖Ã‖ = ‖W_V·W_O‖."""
    gen = torch.Generator().manual_seed(0)
    W_V, X = (torch.randn(5, 24, 6, generator=gen) for _ in range(2))
    W_O, Y = (torch.randn(5, 6, 24, generator=gen) for _ in range(2))
    fro = torch.linalg.matrix_norm
    left, right = _left_factor(W_V, W_O), _right_factor(X, Y)
    torch.testing.assert_close(fro(left @ right), fro(W_V @ W_O @ X @ Y), rtol=1e-5, atol=0)
    torch.testing.assert_close(fro(left), fro(W_V @ W_O), rtol=1e-5, atol=0)


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

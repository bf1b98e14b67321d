"""viz figures built from real computations on the planted model: their content equals the result's."""

from __future__ import annotations

import einops
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import viz
from circuits.results import LabelledResult, head_labels, layer_labels, position_labels
from circuits.tasks.induction import induction_task
from circuits.weights.composition import all_composition_scores, composition_scores
from viz.composition import valid_pairs
from viz.curves import roc_auc
from viz.theme import DIVERGING, PROBABILITY, SEQUENTIAL


@pytest.fixture(scope="module")
def run(planted):
    """One cached forward of the planted model on induction data: (task, cache, token strings of row 0)."""
    task = induction_task(4, 8, 32, seed=3)
    _, cache = planted.run_with_cache(task.clean)
    tokens = [f"t{i}" for i in task.clean[0].tolist()]
    return task, cache, tokens


def stacked_patterns(cache, n_layers: int) -> torch.Tensor:
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(n_layers)])


def previous_token_scores(cache, n_layers: int) -> LabelledResult:
    """[layer, head, pos] attention from each position to the one before it (row 0 of the batch)."""
    pattern = stacked_patterns(cache, n_layers)[:, 0]  # layer head dest src
    prev = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # layer head dest-1
    n_layers, n_heads, n_pos = prev.shape
    return LabelledResult(prev, ("layer", "head", "pos"),
                          (layer_labels(n_layers), head_labels(n_heads), position_labels(None, n_pos)),
                          "previous_token_attention", {"metric": "attention"})


def direct_logit_attribution(model, cache, task) -> LabelledResult:
    """Per-head direct effect on (answer − wrong) logits at the metric positions (no LayerNorm in this model)."""
    z = torch.stack([cache[f"blocks.{layer}.attn.hook_z"] for layer in range(model.cfg.n_layers)])
    out = einops.einsum(z, model.W_O, "l b p h d, l h d m -> l h b p m")[:, :, :, task.positions]
    direction = model.W_U[:, task.answers] - model.W_U[:, task.wrong_answers]  # m b n
    dla = (einops.einsum(out, direction, "l h b n m, m b n -> l h") / task.answers.numel()).detach()
    return LabelledResult(dla, ("layer", "head"), (layer_labels(dla.shape[0]), head_labels(dla.shape[1])),
                          "direct_logit_attribution", {"metric": "logit_diff", "by": "head"})


# ---------------------------------------------------------------- generic LabelledResult figures


def test_heatmap_values_and_ticks_equal_the_result(planted, run):
    _, cache, _ = run
    full = previous_token_scores(cache, 2)
    result = LabelledResult(full.values[:, :, -1], ("layer", "head"), full.labels[:2], full.method, full.info)
    fig = viz.draw_result(result)
    (trace,) = fig.data
    assert isinstance(trace, go.Heatmap)
    np.testing.assert_array_equal(trace.z, result.values.double().numpy())
    assert list(fig.layout.yaxis.ticktext) == ["L0", "L1"]
    assert list(fig.layout.xaxis.ticktext) == ["H0", "H1", "H2"]
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert trace.colorscale == go.Heatmap(colorscale=SEQUENTIAL).colorscale  # attention ≥ 0: sequential
    assert "previous_token_attention" in fig.layout.title.text and "metric=attention" in fig.layout.title.text
    # the planted previous-token head attends (almost) fully to the previous token
    layer, head = planted.planted.previous_token
    assert trace.z[layer, head] > 0.99


def test_signed_result_uses_a_diverging_scale_centred_at_zero(planted, run):
    task, cache, _ = run
    result = direct_logit_attribution(planted, cache, task)
    assert (result.values < 0).any(), "the test needs signed data"
    fig = viz.draw_result(result)
    assert fig.data[0].colorscale == go.Heatmap(colorscale=DIVERGING).colorscale
    assert fig.data[0].zmid == 0
    # a non-negative result forced signed (patching effects) is diverging too
    forced = viz.draw_result(LabelledResult(result.values.abs(), result.dims, result.labels, "x"), signed=True)
    assert forced.data[0].zmid == 0 and forced.data[0].colorscale == fig.data[0].colorscale


def test_three_axis_result_is_faceted_with_one_shared_scale(run):
    _, cache, _ = run
    result = previous_token_scores(cache, 2)
    fig = viz.draw_result(result)
    assert len(fig.data) == 2  # one facet per layer
    for layer, trace in enumerate(fig.data):
        np.testing.assert_array_equal(trace.z, result.values[layer].double().numpy())
        assert trace.coloraxis == "coloraxis"
    assert [a.text for a in fig.layout.annotations] == ["layer L0", "layer L1"]
    assert list(fig.layout.xaxis.ticktext) == list(result.labels[2])
    assert list(fig.layout.yaxis.ticktext) == list(result.labels[1])
    # facet along another axis
    by_head = viz.draw_result(result, facet_dim=1)
    assert len(by_head.data) == 3
    np.testing.assert_array_equal(by_head.data[2].z, result.values[:, 2].double().numpy())


def test_one_axis_result_is_a_bar_chart_coloured_by_sign(planted, run):
    task, cache, _ = run
    dla = direct_logit_attribution(planted, cache, task)
    flat = LabelledResult(dla.values.flatten(), ("component",), (tuple(f"L{i // 3}H{i % 3}" for i in range(6)),),
                          "dla")
    fig = viz.draw_result(flat)
    (bar,) = fig.data
    np.testing.assert_array_equal(bar.y, flat.values.double().numpy())
    assert list(fig.layout.xaxis.ticktext) == list(flat.labels[0])
    assert list(bar.marker.color) == ["#c0392b" if v >= 0 else "#2166ac" for v in flat.values.tolist()]


def test_token_tick_labels_keep_repeated_tokens_apart(run):
    """Induction data repeats its tokens: each position must stay its own column, labelled by its token."""
    _, cache, tokens = run
    assert len(set(tokens)) < len(tokens)
    pattern = cache["blocks.1.attn.hook_pattern"][0, 1]
    result = LabelledResult(pattern, ("dest", "src"), (tuple(tokens), tuple(tokens)), "pattern")
    fig = viz.draw_result(result)
    assert list(fig.layout.xaxis.ticktext) == tokens
    assert list(fig.layout.xaxis.tickvals) == list(range(len(tokens)))
    np.testing.assert_array_equal(fig.data[0].z, pattern.double().numpy())


def test_bad_inputs_raise_clear_errors(run):
    with pytest.raises(ValueError, match="1 to 4 axes"):
        viz.draw_result(LabelledResult(torch.zeros(1, 1, 1, 1, 1), tuple("abcde"), (("0",),) * 5, "x"))
    with pytest.raises(ValueError, match="facet_dim"):
        viz.draw_result(LabelledResult(torch.zeros(2, 2, 2), tuple("abc"), (("0", "1"),) * 3, "x"), facet_dim=3)
    with pytest.raises(ValueError, match="tokens"):
        viz.draw_attention(torch.ones(3, 3), ["a", "b"])


# ---------------------------------------------------------------- attention


def test_attention_grid_has_token_strings_on_both_axes(planted, run):
    _, cache, tokens = run
    pattern = cache["blocks.1.attn.hook_pattern"][0]  # head dest src
    names = [f"L1H{h}" for h in range(3)]
    fig = viz.draw_attention(pattern, tokens, heads=names)
    assert len(fig.data) == 3
    for h, trace in enumerate(fig.data):
        np.testing.assert_array_equal(trace.z, pattern[h].double().numpy())
    for axis in ("xaxis", "yaxis", "xaxis3", "yaxis3"):
        assert list(fig.layout[axis].ticktext) == tokens
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    assert fig.layout.coloraxis.colorscale == go.layout.Coloraxis(colorscale=PROBABILITY).colorscale
    assert [a.text for a in fig.layout.annotations] == [f"head {n}" for n in names]
    # one head: a single heatmap; the induction head attends to the token after the earlier copy
    single = viz.draw_attention(pattern[planted.planted.induction[1]], tokens, heads=["L1H1"])
    (trace,) = single.data
    half = (len(tokens) - 1) // 2
    assert trace.z[half + 2, 3] > 0.99  # position T+k (token x_k) attends to k+1 (token x_{k+1})
    assert "L1H1" in single.layout.title.text


# ---------------------------------------------------------------- direct logit attribution


def test_dla_bars_and_heatmap_equal_the_result(planted, run):
    task, cache, _ = run
    result = direct_logit_attribution(planted, cache, task)
    fig = viz.draw_dla(result)
    bar, grid = fig.data
    np.testing.assert_array_equal(bar.y, result.values.flatten().double().numpy())
    assert list(fig.layout.xaxis.ticktext) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    np.testing.assert_array_equal(grid.z, result.values.double().numpy())
    assert list(fig.layout.yaxis2.ticktext) == ["L0", "L1"] and list(fig.layout.xaxis2.ticktext) == ["H0", "H1", "H2"]
    assert fig.layout.coloraxis.cmid == 0
    # the planted induction head carries the logit difference
    assert np.nanargmax(grid.z) == np.ravel_multi_index(planted.planted.induction, grid.z.shape)
    # by component: heads are placed on the grid, the other components only in the bars
    names = ("embed", "pos_embed", *[f"L{i // 3}H{i % 3}" for i in range(6)])
    values = torch.cat([torch.tensor([0.5, -0.25]), result.values.flatten()])
    by_component = viz.draw_dla(LabelledResult(values, ("component",), (names,), "dla"))
    np.testing.assert_array_equal(by_component.data[0].y, values.double().numpy())
    np.testing.assert_array_equal(by_component.data[1].z, result.values.double().numpy())


# ---------------------------------------------------------------- composition scores


def test_composition_panels_equal_the_scores_on_valid_pairs(planted):
    results = all_composition_scores(planted)
    fig = viz.draw_composition(results)
    heatmaps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heatmaps) == 6  # per kind: scores, then z-scores
    # rows: layer-0 heads (writers); columns: layer-1 heads (readers); every pair valid for 2 layers
    assert valid_pairs(2, 3)[:3, 3:].all() and not valid_pairs(2, 3)[3:, :].any()
    for i, kind in enumerate("QKV"):
        score_map, z_map = heatmaps[2 * i], heatmaps[2 * i + 1]
        np.testing.assert_array_equal(score_map.z, results[kind].values[0, :, 1, :].double().numpy())
        np.testing.assert_array_equal(z_map.z, results[kind].zscores[0, :, 1, :].double().numpy())
        assert list(score_map.customdata[:, 0, 0]) == ["L0H0", "L0H1", "L0H2"]
        assert list(score_map.customdata[0, :, 1]) == ["L1H0", "L1H1", "L1H2"]
        assert list(fig.layout[f"yaxis{i + 1 if i else ''}"].ticktext) == ["L0H0", "L0H1", "L0H2"]
        # the baseline is marked on the score colour bar, in the histogram's title, and as a line on it
        base = results[kind].baseline
        ticks = dict(zip(score_map.colorbar.tickvals, score_map.colorbar.ticktext))
        assert ticks[base.mean] == "baseline"
        assert any(f"{kind}-composition: scores vs baseline {base.mean:.3g} ± {base.std:.2g}" == a.text
                   for a in fig.layout.annotations)
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert [s.x0 for s in lines] == [results[k].baseline.mean for k in "QKV"]
    bands = [s for s in fig.layout.shapes if s.type == "rect"]
    assert [(s.x0, s.x1) for s in bands] == [(results[k].baseline.mean - results[k].baseline.std,
                                              results[k].baseline.mean + results[k].baseline.std) for k in "QKV"]
    assert fig.layout.coloraxis.cmid == 0
    # the planted K-composition (previous-token head → induction head) is the top pair
    (_, prev_h), (_, ind_h) = planted.planted.previous_token, planted.planted.induction
    assert np.nanargmax(heatmaps[2].z) == np.ravel_multi_index((prev_h, ind_h), (3, 3))


def test_composition_of_a_three_layer_model_blanks_pairs_out_of_order():
    from circuits.models import attn_only

    model = attn_only(3, 16, 2, 4, d_vocab=10, n_ctx=8, seed=4)
    result = composition_scores(model, "K", baseline_samples=32)
    fig = viz.draw_composition(result)
    score_map = fig.data[0]
    full = result.values.double().reshape(6, 6).numpy()[:4, 2:]  # writers L0, L1; readers L1, L2
    mask = valid_pairs(3, 2)[:4, 2:]
    assert (~mask).sum() == 4  # L1 → L1 pairs
    np.testing.assert_array_equal(score_map.z[mask], full[mask])
    assert np.isnan(score_map.z[~mask]).all()


# ---------------------------------------------------------------- QK / OV circuits


def test_top_pairs_match_brute_force_on_the_planted_ov_circuit(planted):
    layer, head = planted.planted.induction
    with torch.no_grad():
        full_ov = planted.W_E @ planted.OV[layer, head] @ planted.W_U  # FactoredMatrix [vocab, vocab]
    dense = full_ov.AB.double()
    pairs, values = viz.top_pairs(full_ov, 10, chunk=7)  # chunked over rows: must not change the answer
    # the diagonal ties (the planted head copies every token equally), so compare values, not the tie order
    np.testing.assert_allclose(values, dense.flatten().topk(10).values.numpy(), rtol=1e-6)
    np.testing.assert_allclose(values, [float(dense[r, c]) for r, c in pairs], rtol=1e-6)
    assert all(r == c for r, c in pairs)  # the planted induction head copies
    # without ties the pairs themselves equal brute force
    noisy = full_ov.AB.double() + 1e-3 * torch.randn(32, 32, dtype=torch.float64)
    for largest in (True, False):
        want = noisy.flatten().topk(5, largest=largest)
        got_pairs, got_values = viz.top_pairs(noisy, 5, largest=largest, chunk=5)
        assert [r * 32 + c for r, c in got_pairs] == want.indices.tolist()
        np.testing.assert_array_equal(got_values, want.values.numpy())
    vocab = [f"tok{i}" for i in range(32)]
    pairs, values = viz.top_pairs(full_ov, 10)
    fig = viz.draw_top_pairs(full_ov, vocab, vocab, k=10)
    (table,) = fig.data
    rank, rows, cols, scores = table.cells.values
    assert list(rank) == list(range(1, 11))
    assert list(rows) == [repr(vocab[r]) for r, _ in pairs] and list(cols) == [repr(vocab[c]) for _, c in pairs]
    assert list(scores) == [f"{v:.4g}" for v in values]


def test_eigenvalue_spectrum_and_copying_score(planted):
    ind = planted.planted.induction
    inert = planted.planted.inert[0]
    with torch.no_grad():
        circuits = {f"L{a}H{h}": planted.W_E @ planted.OV[a, h] @ planted.W_U for a, h in (ind, inert)}
    fig = viz.draw_eigenvalues(circuits)
    assert len(fig.data) == 2
    for trace, (name, fm) in zip(fig.data, circuits.items()):
        lam = fm.eigenvalues.to(torch.complex128)
        np.testing.assert_array_equal(trace.x, lam.real.numpy())
        np.testing.assert_array_equal(trace.y, lam.imag.numpy())
        dense = np.linalg.eigvals(fm.AB.double().numpy())
        expected = dense.sum().real / np.abs(dense).sum()
        assert trace.name == f"{name} (copying {expected:.3f})"
    # the planted induction head copies: score 1
    assert viz.copying_score(circuits["L1H1"].eigenvalues) == pytest.approx(1.0, abs=1e-6)
    assert fig.layout.yaxis.scaleanchor == "x"


# ---------------------------------------------------------------- curves


def test_roc_and_faithfulness_curves_plot_the_given_points(planted, run):
    """Rank heads by previous-token attention against the planted ground truth; plot the curves."""
    _, cache, _ = run
    score = previous_token_scores(cache, 2).values.mean(-1).flatten()
    truth = torch.zeros(6, dtype=torch.bool)
    truth[planted.planted.previous_token[0] * 3 + planted.planted.previous_token[1]] = True
    order = score.argsort(descending=True)
    tpr = torch.cat([torch.zeros(1), truth[order].cumsum(0) / truth.sum()]).numpy()
    fpr = torch.cat([torch.zeros(1), (~truth[order]).cumsum(0) / (~truth).sum()]).numpy()
    fig = viz.draw_roc({"prev-token attention": (fpr, tpr)})
    np.testing.assert_array_equal(fig.data[0].x, fpr)
    np.testing.assert_array_equal(fig.data[0].y, tpr)
    assert roc_auc(fpr, tpr) == pytest.approx(1.0)  # the planted head ranks first
    assert fig.data[0].name == "prev-token attention (AUC 1.000)"
    assert fig.data[-1].name == "chance"

    n_edges = np.arange(1, 7)
    curve = LabelledResult(score.sort(descending=True).values.cumsum(0), ("n_edges",),
                           (tuple(str(n) for n in n_edges),), "faithfulness")
    faith = viz.draw_faithfulness({"ours": curve, "pair": (n_edges, n_edges / 6)})
    np.testing.assert_array_equal(faith.data[0].x, n_edges)
    np.testing.assert_array_equal(faith.data[0].y, curve.values.double().numpy())
    np.testing.assert_array_equal(faith.data[1].y, n_edges / 6)
    assert [s.y0 for s in faith.layout.shapes] == [0.0, 1.0]
    with pytest.raises(ValueError, match="curve"):
        viz.draw_faithfulness({"bad": object()})


def test_colour_bars_name_the_metric_and_normalised_results_share_one_scale(planted):
    from circuits.activations import activation_patch
    from circuits.tasks import induction_task
    from viz.labelled import NICE_RANGES

    task = induction_task(4, 6, planted.cfg.d_vocab, seed=0)
    for metric in ("logit_diff", "kl"):
        r = activation_patch(planted, task, "z", per_position=False, metric=metric, progress=False)
        fig = viz.draw_result(r)
        assert fig.data[0].colorbar.title.text.startswith(f"normalised {metric}")
        bound = fig.data[0].zmax
        assert fig.data[0].zmid == 0 and fig.data[0].zmin == -bound and np.nanmax(np.abs(fig.data[0].z)) <= bound
        assert bound in (0.5, 1.0, 2.0)  # a whole-head patch moves the normalised metric by order 1
        per_pos = viz.draw_result(activation_patch(planted, task, "z", metric=metric, progress=False))
        assert per_pos.layout.coloraxis.colorbar.title.text.startswith(f"normalised {metric}")
        axis = per_pos.layout.coloraxis
        assert axis.cmid == 0 and axis.cmin == -axis.cmax and axis.cmax in NICE_RANGES


def test_long_position_labels_are_turned():
    from viz.labelled import ticks

    assert ticks([f"{i}:tok{i}" for i in range(20)], "pos")["tickangle"] == -60  # "12:tok12" side by side overlap
    assert "tickangle" not in ticks([str(i) for i in range(20)], "pos")
    assert "tickangle" not in ticks(["L0H0:x", "L0H1:y"], "head")

"""Rendering speed of viz figures for a 12-layer × 12-head result (FULL), against plain plotly.express.

Each pair builds the figure from the same tensor and serialises it (`to_json`, what `to_html` and the report
embed); ours adds the labelled ticks, hover text, theme and colour scales. Both assert the plotted values
equal the tensor. The claim checked: our figures of a 12 × 12 result render in well under 2 s.
`test_big_report_size` writes a report of every such figure and checks it stays under 15 MB.
"""

from __future__ import annotations

import numpy as np
import plotly.express as px
import pytest
import torch

import viz
from bench.conftest import FULL
from circuits.results import LabelledResult, head_labels, layer_labels, position_labels
from circuits.weights.composition import CompositionBaseline, CompositionScores, pair_mask

N_LAYERS, N_HEADS, N_POS = (12, 12, 64) if FULL else (4, 4, 16)


def _heads_result() -> LabelledResult:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(N_LAYERS, N_HEADS, generator=gen)
    return LabelledResult(values, ("layer", "head"), (layer_labels(N_LAYERS), head_labels(N_HEADS)), "bench",
                          {"metric": "logit_diff", "direction": "denoising"})


def _heads_pos_result() -> LabelledResult:
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(N_LAYERS, N_HEADS, N_POS, generator=gen)
    tokens = [f"tok{i % 50}" for i in range(N_POS)]
    return LabelledResult(values, ("layer", "head", "pos"),
                          (layer_labels(N_LAYERS), head_labels(N_HEADS), position_labels(tokens, N_POS)), "bench")


def _composition() -> CompositionScores:
    gen = torch.Generator().manual_seed(2)
    mask = pair_mask(N_LAYERS, N_HEADS)
    scores = torch.rand(N_LAYERS, N_HEADS, N_LAYERS, N_HEADS, generator=gen) * mask
    base = CompositionBaseline(mean=0.3, std=0.05, n_samples=64, seed=0, d_model=768, d_head=64)
    z = torch.where(mask, (scores - base.mean) / base.std, torch.zeros_like(scores))
    return CompositionScores(scores, ("layer_a", "head_a", "layer_b", "head_b"),
                             (layer_labels(N_LAYERS), head_labels(N_HEADS)) * 2, "composition_scores[K]",
                             {"kind": "K"}, kind="K", baseline=base, zscores=z, mask=mask)


def _render(fig) -> tuple[object, int]:
    return fig, len(fig.to_json())


def test_heatmap_ours(run_bench):
    r = _heads_result()
    fig, size = run_bench(lambda: _render(viz.draw_result(r)), group="viz-heatmap-layer-head", side="ours")
    np.testing.assert_array_equal(fig.data[0].z, px.imshow(r.values.numpy()).data[0].z)
    assert size > 0


def test_heatmap_reference(run_bench):
    r = _heads_result()
    fig, _ = run_bench(lambda: _render(px.imshow(r.values.numpy())), group="viz-heatmap-layer-head",
                       side="reference")
    np.testing.assert_array_equal(fig.data[0].z, viz.draw_result(r).data[0].z)


def test_facets_ours(run_bench):
    r = _heads_pos_result()
    fig, _ = run_bench(lambda: _render(viz.draw_result(r)), group="viz-facets-layer-head-pos", side="ours")
    np.testing.assert_array_equal(np.stack([t.z for t in fig.data]), r.values.double().numpy())


def test_facets_reference(run_bench):
    r = _heads_pos_result()
    fig, _ = run_bench(lambda: _render(px.imshow(r.values.numpy(), facet_col=0, facet_col_wrap=4)),
                       group="viz-facets-layer-head-pos", side="reference")
    ours = viz.draw_result(r)
    for layer in range(N_LAYERS):
        np.testing.assert_array_equal(np.asarray(fig.data[layer].z, dtype=float), ours.data[layer].z)


def test_composition_ours(run_bench):
    c = _composition()
    fig, _ = run_bench(lambda: _render(viz.draw_composition(c)), group="viz-composition", side="ours")
    flat = c.values.double().reshape(N_LAYERS * N_HEADS, -1)[: (N_LAYERS - 1) * N_HEADS, N_HEADS:].numpy()
    z = fig.data[0].z
    np.testing.assert_array_equal(z[np.isfinite(z)], flat[np.isfinite(z)])


def test_composition_reference(run_bench):
    c = _composition()
    flat = c.values.reshape(N_LAYERS * N_HEADS, -1)[: (N_LAYERS - 1) * N_HEADS, N_HEADS:].numpy()
    fig, _ = run_bench(lambda: _render(px.imshow(flat)), group="viz-composition", side="reference")
    ours = viz.draw_composition(c).data[0].z
    np.testing.assert_array_equal(np.asarray(fig.data[0].z, dtype=float)[np.isfinite(ours)],
                                  ours[np.isfinite(ours)])


def test_big_report_size(tmp_path):
    """A report of every large figure (the flagship analysis holds fewer) stays under 15 MB."""
    r3 = _heads_pos_result()
    attention = torch.softmax(torch.randn(N_HEADS, N_POS, N_POS), -1).tril()
    tokens = [f"tok{i % 50}" for i in range(N_POS)]
    sections = [
        viz.Section("heads", "", [viz.draw_result(_heads_result()), viz.draw_dla(_heads_result())]),
        viz.Section("positions", "", [viz.draw_result(r3), viz.draw_result(r3, facet_dim=1)]),
        viz.Section("composition", "", [viz.draw_composition({k: _composition() for k in "QKV"})]),
        viz.Section("attention", "", [viz.draw_attention(attention, tokens)]),
    ]
    path = viz.report(sections, tmp_path / "big.html")
    size_mb = path.stat().st_size / 2**20
    print(f"big report: {size_mb:.2f} MiB")
    assert size_mb < 15


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "--benchmark-enable", "-q"])

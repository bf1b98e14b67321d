"""draw_circuit: every node and edge of a real ACDC circuit (planted model) is drawn, with q/k/v told apart,
width by |score|, hover text with the score; a 300+-edge graph keeps every edge, fading the weak ones."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch

import viz
from circuits.graph import Circuit, ComputeGraph, acdc
from circuits.tasks import induction_task
from viz.theme import FADED, QKV_DASHES


def parts(fig):
    edges = [t for t in fig.data if (t.meta or {}).get("role") == "edge"]
    nodes = [t for t in fig.data if (t.meta or {}).get("role") == "nodes"]
    hover = [t for t in fig.data if (t.meta or {}).get("role") == "edge_hover"]
    return edges, nodes, hover


@pytest.fixture(scope="module")
def planted_circuit(planted):
    return acdc(planted, induction_task(12, 10, 32, seed=0), threshold=0.01, metric="kl", ablation="zero",
                progress=False).graph


def test_planted_acdc_circuit(planted_circuit):
    g = planted_circuit
    fig = viz.draw_circuit(g)
    edges, nodes, hover = parts(fig)
    assert len(nodes) == 1 and len(nodes[0].x) == g.number_of_nodes() == 11
    assert set(nodes[0].meta["names"]) == set(g.nodes)
    assert len(edges) == g.number_of_edges()
    assert {tuple(t.meta["edge"]) for t in edges} == set(g.edges)
    residual = [(u, v, a) for u, v, a in g.edges(data=True) if a["kind"] == "residual"]
    assert len(residual) == 7 and len(hover) == 1 and len(hover[0].x) == len(residual)
    # hover text names each edge with its score
    for (u, v, a), text in zip(residual, hover[0].text):
        assert text.startswith(f"{u} → {v}") and f"{a['score']:.4g}" in text
    by_edge = {tuple(t.meta["edge"]): t for t in edges}
    # q/k/v edges are told apart by dash; width grows with |score|
    assert by_edge[("L0H2", "L1H1.k")].line.dash == QKV_DASHES["k"]
    assert by_edge[("tok_embed", "L1H1.v")].line.dash == QKV_DASHES["v"]
    assert by_edge[("tok_embed", "L1H1.q")].line.dash == QKV_DASHES["q"]
    widths = {(u, v): by_edge[(u, v)].line.width for u, v, _ in residual}
    order = sorted(residual, key=lambda e: abs(e[2]["score"]))
    assert widths[order[0][:2]] <= widths[order[-1][:2]]
    # layers run left to right: every residual edge points rightwards
    x = dict(zip(nodes[0].meta["names"], nodes[0].x))
    assert all(x[u] < x[v] for u, v, _ in residual)
    assert "ACDC" in fig.layout.title.text and "7 edges" in fig.layout.title.text


def test_big_graph_keeps_every_edge():
    graph = ComputeGraph.build(3, 8)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.valid.shape, generator=gen).masked_fill(~graph.valid, math.nan)
    g = Circuit.full(graph, scores, method="eap").to_networkx()
    n_residual = graph.n_edges
    assert n_residual > 300
    fig = viz.draw_circuit(g)
    edges, nodes, hover = parts(fig)
    assert len(edges) == g.number_of_edges() and len(nodes[0].x) == g.number_of_nodes()
    assert len(hover[0].x) == n_residual
    faded = [t for t in edges if t.line.color == FADED]
    assert len(faded) == n_residual - 80  # all but the 80 strongest are faded, none dropped
    explicit = viz.draw_circuit(g, threshold=0.0)
    assert not any(t.line.color == FADED for t in parts(explicit)[0])


def test_bad_input():
    with pytest.raises(ValueError, match="graph: expected a networkx DiGraph"):
        viz.draw_circuit({"a": 1})
    g = nx.DiGraph(n_layers=1, n_heads=1)
    g.add_node("x", kind="neuron", layer=0, head=None)
    with pytest.raises(ValueError, match="has kind 'neuron'"):
        viz.draw_circuit(g)


def test_edge_width_legend_and_sign_names_the_metric(planted_circuit):
    """The legend has a scale for edge width (three widths, the |score| each stands for, the largest equal to the
    widest edge) and says what a sign means for the circuit's metric."""
    fig = viz.draw_circuit(planted_circuit)
    legend = [t for t in fig.data if (t.meta or {}).get("role") == "legend"]
    widths = [(t.name, t.line.width) for t in legend if t.name.startswith("width: |score|")]
    assert len(widths) == 3 and widths[0][1] > widths[1][1] > widths[2][1]
    edges, _, _ = parts(fig)
    assert widths[0][1] == pytest.approx(max(t.line.width for t in edges))
    scores = [abs(a["score"]) for _, _, a in planted_circuit.edges(data=True) if a["kind"] == "residual"]
    assert widths[0][0] == f"width: |score| {max(scores):.3g}"
    assert any("raises kl" in t.name for t in legend) and any("lowers kl" in t.name for t in legend)


def test_titles_sit_below_the_toolbar_band(planted_circuit):
    from viz.theme import TOOLBAR_BAND

    fig = viz.draw_circuit(planted_circuit)
    title = fig.layout.template.layout.title
    assert title.yref == "container" and title.yanchor == "top" and title.pad.t >= TOOLBAR_BAND
    assert fig.layout.template.layout.margin.t >= TOOLBAR_BAND + 50

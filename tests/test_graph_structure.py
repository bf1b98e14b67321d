"""The computational graph: its nodes and edges, the edge-count formula, networkx schema, JSON round trip."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch

from circuits.graph import Circuit, ComputeGraph, NodeKind, attn_only_edge_count


def brute_force_edges(n_layers: int, n_heads: int, has_mlp: bool) -> set[tuple[str, str]]:
    """Every (source, destination) pair with the source strictly upstream, enumerated from the architecture."""
    sources = [("tok_embed", -1, 0), ("pos_embed", -1, 0)]  # (name, layer, 0 attention / 1 mlp)
    dests = []
    for layer in range(n_layers):
        sources += [(f"L{layer}H{h}", layer, 0) for h in range(n_heads)]
        dests += [(f"L{layer}H{h}.{x}", layer, 0) for h in range(n_heads) for x in "qkv"]
        if has_mlp:
            sources.append((f"MLP{layer}", layer, 1))
            dests.append((f"MLP{layer}", layer, 1))
    dests.append(("logits", n_layers, 0))
    return {(s, d) for s, ls, ps in sources for d, ld, pd in dests if (ls, ps) < (ld, pd)}


@pytest.mark.parametrize("n_layers,n_heads,has_mlp", [(0, 1, False), (1, 1, False), (1, 3, False), (2, 4, False),
                                                      (3, 2, False), (4, 8, False), (2, 3, True), (3, 1, True)])
def test_edges_match_the_architecture(n_layers, n_heads, has_mlp):
    g = ComputeGraph.build(n_layers, n_heads, has_mlp=has_mlp)
    assert {(e.source.name, e.destination.name) for e in g.edges()} == brute_force_edges(n_layers, n_heads, has_mlp)
    if not has_mlp:
        assert g.n_edges == attn_only_edge_count(n_layers, n_heads)


def test_edge_count_formula_values():
    # 2 layers × 4 heads: layer 0's 12 inputs read 2 embeddings, layer 1's 12 read 2 + 4, logits read 2 + 8.
    assert attn_only_edge_count(2, 4) == 12 * 2 + 12 * 6 + 10 == 106
    assert attn_only_edge_count(1, 1) == 3 * 2 + 3
    assert attn_only_edge_count(0, 5) == 2


def test_graph_of_models(tiny2):
    g = ComputeGraph.of(tiny2)
    assert (g.n_layers, g.n_heads, g.has_mlp) == (2, 4, False)
    assert g.sources[0].kind is NodeKind.TOK_EMBED and g.destinations[-1].kind is NodeKind.LOGITS
    assert g.edge("L0H2", "L1H1.k").destination.qkv == "k"
    with pytest.raises(ValueError, match="not an edge"):
        g.edge("L1H0", "L1H1.q")
    with pytest.raises(ValueError, match="no source named"):
        g.edge("L9H0", "logits")


def random_circuit(graph: ComputeGraph, seed: int = 0) -> Circuit:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(graph.valid.shape, generator=gen).masked_fill(~graph.valid, math.nan)
    scores[graph.valid.nonzero()[0].tolist()[0], graph.valid.nonzero()[0].tolist()[1]] = math.nan  # one unscored
    members = graph.valid & (torch.rand(graph.valid.shape, generator=gen) < 0.4)
    return Circuit(graph, scores, members, {"model": "test", "method": "eap", "threshold": 0.5})


@pytest.mark.parametrize("has_mlp", [False, True])
def test_networkx_schema(has_mlp):
    graph = ComputeGraph.build(2, 3, has_mlp=has_mlp)
    c = random_circuit(graph)
    g = c.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert g.graph["n_layers"] == 2 and g.graph["n_heads"] == 3 and g.graph["method"] == "eap"
    residual = [(u, v, a) for u, v, a in g.edges(data=True) if a["kind"] == "residual"]
    assert sorted((u, v) for u, v, _ in residual) == sorted(
        (e.source.name, e.destination.name) for e in graph.edges() if c.members[e.src, e.dst])
    for u, v, a in residual:
        e = graph.edge(u, v)
        assert a["qkv"] == e.destination.qkv
        s = float(c.scores[e.src, e.dst])
        assert (math.isnan(a["score"]) and math.isnan(s)) or a["score"] == s
    for node, a in g.nodes(data=True):
        assert set(a) >= {"layer", "head", "kind"}
        if a["kind"] == "head_input":
            assert node == f"L{a['layer']}H{a['head']}.{a['qkv']}"
            assert g.has_edge(node, node.rsplit(".", 1)[0])
            internal = g.edges[node, node.rsplit(".", 1)[0]]
            assert internal["kind"] == "internal" and internal["qkv"] == a["qkv"] and math.isnan(internal["score"])
        elif a["kind"] == "head":
            assert node == f"L{a['layer']}H{a['head']}"
        elif a["kind"] == "mlp":
            assert node == f"MLP{a['layer']}" and a["head"] is None
        else:
            assert a["kind"] in ("tok_embed", "pos_embed", "logits") and a["head"] is None
            assert a["layer"] == (2 if a["kind"] == "logits" else -1)
    back = Circuit.from_networkx(g, graph)
    assert torch.equal(back.members, c.members)
    assert torch.equal(back.scores.nan_to_num(7.0)[c.members], c.scores.nan_to_num(7.0)[c.members])


@pytest.mark.parametrize("has_mlp", [False, True])
def test_json_round_trip_is_exact(tmp_path, has_mlp):
    c = random_circuit(ComputeGraph.build(3, 2, has_mlp=has_mlp), seed=3)
    back = Circuit.load(c.save(tmp_path / "c.json"))
    assert torch.equal(back.members, c.members)
    assert back.scores.dtype == c.scores.dtype
    assert torch.equal(back.scores.isnan(), c.scores.isnan())
    assert torch.equal(back.scores.nan_to_num(0.0), c.scores.nan_to_num(0.0))
    assert back.attrs == c.attrs
    assert back.graph.destination_names == c.graph.destination_names


def test_selection():
    graph = ComputeGraph.build(1, 2)
    scores = torch.zeros(graph.valid.shape).masked_fill(~graph.valid, math.nan)
    edges = graph.edges()
    for i, e in enumerate(edges):
        scores[e.src, e.dst] = (-1) ** i * (i + 1)
    c = Circuit.full(graph, scores)
    top = c.top_n(3)
    assert top.n_edges == 3
    assert set(top.edge_names()) == {edges[-1].name, edges[-2].name, edges[-3].name}
    assert c.above(len(edges) - 1.5).n_edges == 2
    assert c.top_n(3, by_abs=False).n_edges == 3
    with pytest.raises(ValueError, match="members"):
        Circuit(graph, scores, torch.ones_like(graph.valid))

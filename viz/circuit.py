"""A circuit (the networkx DiGraph of `circuits.graph`, schema in its package docstring) as a layered figure.

Layers run left to right: the embeddings, then for each layer its heads' q/k/v inputs, its heads (grouped,
head 0 on top) and its MLP, and the logits last. Residual edges are lines whose width follows |score| and
whose colour gives the sign (red positive, blue negative, grey unscored; a score is the metric's change when
the edge is removed, the same sign for every method), with a legend of the widths; the dash tells q (solid), k
(dashed) and v (dotted) inputs apart, and the input nodes carry the q/k/v colours. Internal edges (a head's
input → the head) are thin grey. Hovering an edge's midpoint shows its score. In a big circuit the edges
below a threshold are drawn faded (thin, light grey), never dropped: every edge of the graph is drawn.
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import numpy as np
import plotly.graph_objects as go

from viz.theme import BASELINE, FADED, NEGATIVE, NEUTRAL, POSITIVE, QKV_COLOURS, QKV_DASHES, TEMPLATE

NODE_COLOURS = {"tok_embed": "#444444", "pos_embed": "#444444", "head": "#222222", "mlp": "#8c564b",
                "logits": "#000000"}
MAX_WIDTH = 7.0
MIN_WIDTH = 0.8
BOLD_EDGES = 80
"""Without an explicit `threshold`, edges beyond the 80 largest |scores| are faded."""


def node_position(name: str, attrs: dict[str, Any], n_layers: int, n_heads: int) -> tuple[float, float]:
    """(x, y) of a node: x = 3·layer + 1 for head inputs, + 2 for heads, + 2.6 for the MLP; embeddings at 0
    and the logits at 3·n_layers + 1; y = −head (inputs spread around their head), MLPs below the heads."""
    kind, layer, head = attrs.get("kind"), attrs.get("layer", 0), attrs.get("head")
    mid = -(n_heads - 1) / 2
    if kind == "tok_embed":
        return 0.0, mid + 0.6
    if kind == "pos_embed":
        return 0.0, mid - 0.6
    if kind == "logits":
        return 3.0 * n_layers + 1.0, mid
    if kind == "mlp":
        return 3.0 * layer + 2.6, -float(n_heads)
    if kind == "head_input":
        offset = {"q": 0.28, "k": 0.0, "v": -0.28}[attrs.get("qkv", "k")]
        return 3.0 * layer + 1.0, -float(head) + offset
    if kind == "head":
        return 3.0 * layer + 2.0, -float(head)
    raise ValueError(f"graph: node {name!r} has kind {kind!r}; expected one of the circuits.graph schema kinds "
                     "(tok_embed, pos_embed, head, head_input, mlp, logits)")


def _edge_style(score: float, qkv: str | None, kind: str, scale: float, threshold: float) -> dict[str, Any]:
    if kind == "internal":
        return {"color": NEUTRAL, "width": 1.0, "dash": QKV_DASHES.get(qkv, "solid")}
    if math.isnan(score):
        return {"color": NEUTRAL, "width": 1.5, "dash": QKV_DASHES.get(qkv, "solid")}
    if abs(score) < threshold:
        return {"color": FADED, "width": MIN_WIDTH, "dash": QKV_DASHES.get(qkv, "solid")}
    return {"color": POSITIVE if score >= 0 else NEGATIVE, "width": width_of(score, scale),
            "dash": QKV_DASHES.get(qkv, "solid")}


def default_threshold(scores: np.ndarray, bold: int = BOLD_EDGES) -> float:
    """The |score| below which edges are faded: 0 for circuits of at most `bold` scored edges, else the
    `bold`-th largest |score|."""
    finite = np.abs(scores[np.isfinite(scores)])
    if finite.size <= bold:
        return 0.0
    return float(np.sort(finite)[::-1][bold - 1])


def draw_circuit(
    graph: nx.DiGraph,
    *,
    threshold: float | None = None,
    title: str | None = None,
    width: int = 960,
    height: int | None = None,
) -> go.Figure:
    """Draw a circuit DiGraph: layers left to right, width by |score|, colour by sign, dash by q/k/v.

    `threshold`: edges with |score| below it are drawn faded (default: fade all but the 80 largest when the
    circuit has more). Every node and edge of `graph` is drawn: one marker per node (in the trace with
    `meta["role"] == "nodes"`), one line trace per edge (`meta["role"] == "edge"`, `meta["edge"]` its
    endpoints), and a hover marker at each residual edge's midpoint with its score.
    Example: `draw_circuit(acdc(model, task, threshold=0.01).graph)`
    """
    if not isinstance(graph, nx.DiGraph):
        raise ValueError(f"graph: expected a networkx DiGraph (circuits.graph schema), got {type(graph).__name__}")
    n_layers = int(graph.graph.get("n_layers", 1 + max((a.get("layer", 0) for _, a in graph.nodes(data=True)),
                                                        default=0)))
    n_heads = int(graph.graph.get("n_heads", 1 + max((a.get("head") or 0 for _, a in graph.nodes(data=True)),
                                                      default=0)))
    pos = {n: node_position(n, a, n_layers, n_heads) for n, a in graph.nodes(data=True)}
    residual = [(u, v, a) for u, v, a in graph.edges(data=True) if a.get("kind", "residual") != "internal"]
    scores = np.array([float(a.get("score", math.nan)) for _, _, a in residual], dtype=float)
    finite = np.abs(scores[np.isfinite(scores)])
    scale = float(finite.max()) if finite.size else 1.0
    if threshold is None:
        threshold = default_threshold(scores)
    elif not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"threshold must be a number >= 0 or None, got {threshold!r}")
    fig = go.Figure()
    # faded edges first, so that the strong ones are drawn on top of them
    edges = sorted(graph.edges(data=True), key=lambda e: _sort_key(e[2], threshold))
    for u, v, a in edges:
        (x0, y0), (x1, y1) = pos[u], pos[v]
        style = _edge_style(float(a.get("score", math.nan)), a.get("qkv"), a.get("kind", "residual"), scale,
                            threshold)
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", line=style, hoverinfo="skip",
                                 showlegend=False, meta={"role": "edge", "edge": [u, v]}))
    _add_edge_hover(fig, residual, pos)
    _add_nodes(fig, graph, pos)
    _add_legend(fig, scale if finite.size else 0.0, graph.graph.get("metric"))
    n_res = len(residual)
    if title is None:
        attrs = graph.graph
        method = attrs.get("method", "circuit")
        how = ", ".join(f"{k} {attrs[k]}" for k in ("metric", "ablation", "threshold") if k in attrs)
        title = f"{method.upper() if method in ('acdc', 'eap') else method}: {n_res} edges" + (
            f" ({how})" if how else "")
        if threshold > 0:
            title += f"; |score| < {threshold:.3g} faded"
    ticks = [0.0] + [x for layer in range(n_layers) for x in (3.0 * layer + 1, 3.0 * layer + 2)] + [3.0 * n_layers + 1]
    labels = ["embeddings"] + [t for layer in range(n_layers) for t in (f"L{layer} q/k/v", f"L{layer} heads")] + [
        "logits"]
    fig.update_layout(
        template=TEMPLATE, title={"text": title}, width=width,
        height=height or max(420, 90 * n_heads + (90 if any(a.get("kind") == "mlp" for _, a in graph.nodes(data=True))
                                                   else 0) + 180),
        xaxis={"tickvals": ticks, "ticktext": labels, "title": {"text": "layer"}, "showgrid": False,
               "zeroline": False, "range": [-0.6, 3.0 * n_layers + 1.6]},
        yaxis={"showticklabels": False, "showgrid": False, "zeroline": False, "ticks": ""},
        legend={"orientation": "h", "y": -0.18}, hovermode="closest",
    )
    return fig


def _sort_key(attrs: dict[str, Any], threshold: float) -> float:
    score = float(attrs.get("score", math.nan))
    if attrs.get("kind") == "internal" or math.isnan(score):
        return -1.0
    return abs(score) if abs(score) >= threshold else -0.5


def _add_edge_hover(fig: go.Figure, residual: list, pos: dict) -> None:
    xs, ys, texts = [], [], []
    for u, v, a in residual:
        (x0, y0), (x1, y1) = pos[u], pos[v]
        xs.append((x0 + x1) / 2)
        ys.append((y0 + y1) / 2)
        score = float(a.get("score", math.nan))
        qkv = a.get("qkv")
        texts.append(f"{u} → {v}" + (f" ({qkv})" if qkv else "") + "<br>score " +
                     ("not scored" if math.isnan(score) else f"{score:.4g}"))
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker={"size": 7, "color": "rgba(0,0,0,0)"},
                             text=texts, hovertemplate="%{text}<extra></extra>", showlegend=False,
                             meta={"role": "edge_hover"}))


def _add_nodes(fig: go.Figure, graph: nx.DiGraph, pos: dict) -> None:
    names = list(graph.nodes)
    attrs = [graph.nodes[n] for n in names]
    colours = [QKV_COLOURS[a.get("qkv")] if a.get("kind") == "head_input" else NODE_COLOURS.get(a.get("kind"), NEUTRAL)
               for a in attrs]
    sizes = [9 if a.get("kind") == "head_input" else 16 for a in attrs]
    labels = [n.rsplit(".", 1)[1] if a.get("kind") == "head_input" else n for n, a in zip(names, attrs)]
    hover = [f"{n}<br>kind {a.get('kind')}, layer {a.get('layer')}" + (
        f", head {a.get('head')}" if a.get("head") is not None else "") for n, a in zip(names, attrs)]
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text", text=labels,
        textposition=["middle left" if a.get("kind") == "head_input" else "top center" for a in attrs],
        textfont={"size": 11}, marker={"size": sizes, "color": colours, "line": {"width": 1, "color": "white"}},
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>", showlegend=False,
        meta={"role": "nodes", "names": names}))


def width_of(score: float, scale: float) -> float:
    """The line width of an edge of |score| in a figure whose largest |score| is `scale`."""
    return MIN_WIDTH + (MAX_WIDTH - MIN_WIDTH) * (abs(score) / scale if scale > 0 else 1.0)


def _add_legend(fig: go.Figure, scale: float, metric: str | None) -> None:
    """Legend-only traces (no data): the q/k/v dashes, the sign colours (what a sign means for the metric),
    and the edge-width scale (three widths and the |score| each stands for)."""
    what = metric or "the metric"
    entries = [(f"→ {x} input", {"color": QKV_COLOURS[x], "dash": QKV_DASHES[x], "width": 2}) for x in "qkv"]
    entries += [(f"score > 0: removing it raises {what}", {"color": POSITIVE, "width": 3}),
                (f"score < 0: removing it lowers {what}", {"color": NEGATIVE, "width": 3}),
                ("faded / unscored", {"color": NEUTRAL, "width": 1})]
    if scale > 0:
        entries += [(f"width: |score| {v:.3g}", {"color": BASELINE, "width": width_of(v, scale)})
                    for v in (scale, scale / 2, scale / 4)]
    for name, line in entries:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line, name=name, hoverinfo="skip",
                                 meta={"role": "legend"}))

"""Composition scores: Q-, K- and V-composition heatmaps with the random baseline marked, and the z-scores."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz.labelled import as_array, heatmap, pair_labels, ticks
from viz.theme import BASELINE, DIVERGING, SEQUENTIAL, SERIES, TEMPLATE


def draw_composition(results: Mapping[str, Any] | Any, *, title: str = "composition scores") -> go.Figure:
    """Composition scores of every (earlier head → later head) pair, one column per kind.

    `results` is one composition-score result or a mapping {"Q": ..., "K": ..., "V": ...} of them. Each
    result has scores [layer, head, layer, head] (`.scores`, else `.values`; earlier head first), a
    `.baseline` (the expected score of random matrices of the same shapes; a number, or a tensor broadcast
    against the scores, or a record with `.mean` and `.std`) with its spread in `.baseline_std` or
    `info["baseline_std"]` when known, and
    `.zscores` when known. Rows: the scores (sequential scale; the colour bar's tick "baseline" marks the
    baseline), the z-scores (diverging, centred at 0), and the distribution of the scores with the baseline
    (and ±1 spread) drawn as a line and band. Heatmap rows are the heads of layers 0..L−2 (writers), columns
    those of layers 1..L−1 (readers); pairs not in increasing layer order are blank (NaN).
    Example: `draw_composition({k: composition_scores(model, k) for k in "QKV"})`
    """
    if not isinstance(results, Mapping):
        results = {str(_get(results, "kind", default=None) or "") or "composition": results}
    kinds = list(results)
    panels = [_panel(results[k]) for k in kinds]
    has_z = any(p["z"] is not None for p in panels)
    rows = 3 if has_z else 2
    titles = [f"{k}-composition" if len(k) == 1 else k for k in kinds]
    subplot_titles = [f"{t}: score" for t in titles]
    if has_z:
        subplot_titles += [f"{t}: z-score" for t in titles]
    subplot_titles += [f"{t}: scores vs {_baseline_text(p)}" for t, p in zip(titles, panels)]
    fig = make_subplots(rows=rows, cols=len(kinds), subplot_titles=subplot_titles, vertical_spacing=0.12,
                        horizontal_spacing=0.16, row_heights=[0.38, 0.38, 0.24] if has_z else [0.6, 0.4])
    for c, (kind, p) in enumerate(zip(kinds, panels), start=1):
        _add_score_panel(fig, p, kind, row=1, col=c)
        if has_z and p["z"] is not None:
            fig.add_trace(heatmap(p["z"], p["rows"], p["cols"], row_dim="earlier head", col_dim="later head",
                                  coloraxis="coloraxis", name=f"{kind} z", value_name="z-score"), row=2, col=c)
            _pair_axes(fig, p, row=2, col=c)
        _add_distribution(fig, p, kind, row=rows, col=c)
    z_all = np.concatenate([p["z"][np.isfinite(p["z"])] for p in panels if p["z"] is not None] or [np.zeros(1)])
    bound = float(np.abs(z_all).max()) if z_all.size else 1.0
    side = 360 if panels[0]["scores"].shape[0] <= 24 else 520
    fig.update_layout(
        template=TEMPLATE, title={"text": title}, showlegend=False, height=side * (rows - 1) + 260,
        width=max(700, side * len(kinds) + 160),
        coloraxis={"colorscale": DIVERGING, "cmid": 0.0, "cmin": -bound, "cmax": bound,
                   "colorbar": {"title": {"text": "z-score"}, "x": 1.01, "y": 0.5, "len": 0.3}},
    )
    return fig


def _get(obj: Any, name: str, *, default: Any = ...) -> Any:
    if hasattr(obj, name):
        return getattr(obj, name)
    info = getattr(obj, "info", {}) or {}
    if name in info:
        return info[name]
    if default is ...:
        raise ValueError(f"results: a composition result needs `.{name}` (or info[{name!r}]); {type(obj).__name__} "
                         "has neither")
    return default


def _panel(result: Any) -> dict[str, Any]:
    """The flattened, masked [earlier head, later head] scores of one kind, with its baseline and z-scores."""
    scores = as_array(result.scores if hasattr(result, "scores") else result.values)
    if scores.ndim != 4 or scores.shape[:2] != scores.shape[2:] or scores.shape[0] < 2:
        raise ValueError(f"scores: expected [layer, head, layer, head] with at least 2 layers, got {scores.shape}")
    n_layers, n_heads = scores.shape[:2]
    labels = getattr(result, "labels", None)
    layer_names = labels[0] if labels else [f"L{i}" for i in range(n_layers)]
    head_names = labels[1] if labels else [f"H{i}" for i in range(n_heads)]
    names = pair_labels(layer_names, head_names)
    # rows: heads with a later layer to write to; columns: heads with an earlier layer to read from
    n_rows = (n_layers - 1) * n_heads
    rows, cols = slice(0, n_rows), slice(n_heads, n_layers * n_heads)
    valid_full = valid_pairs(n_layers, n_heads)
    valid = valid_full[rows, cols]
    flat = scores.reshape(len(names), len(names))[rows, cols]
    baseline = _get(result, "baseline")
    spread = _get(result, "baseline_std", default=None)
    if hasattr(baseline, "mean") and hasattr(baseline, "std") and not hasattr(baseline, "shape"):
        baseline, spread = baseline.mean, baseline.std  # a baseline record (mean and spread of random scores)
    baseline = as_array(baseline)
    z = _get(result, "zscores", default=None)
    z = None if z is None else np.where(valid, as_array(z).reshape(len(names), len(names))[rows, cols], np.nan)
    base_flat = np.broadcast_to(baseline, scores.shape).reshape(len(names), len(names))[rows, cols]
    return {
        "scores": np.where(valid, flat, np.nan),
        "rows": names[rows],
        "cols": names[cols],
        "valid": valid,
        "baseline": float(np.mean(base_flat[valid])),
        "spread": None if spread is None else float(np.mean(as_array(spread))),
        "z": z,
    }


def valid_pairs(n_layers: int, n_heads: int) -> np.ndarray:
    """[earlier head, later head] mask of the pairs a composition score is defined for: layer(a) < layer(b)."""
    layer = np.repeat(np.arange(n_layers), n_heads)
    return layer[:, None] < layer[None, :]


def _pair_axes(fig: go.Figure, p: dict[str, Any], *, row: int, col: int, x_title: bool = True) -> None:
    fig.update_xaxes(ticks(p["cols"], "later head" if x_title else "", max_ticks=30), row=row, col=col)
    fig.update_yaxes({**ticks(p["rows"], "earlier head", max_ticks=30), "autorange": "reversed"}, row=row, col=col)


def _add_score_panel(fig: go.Figure, p: dict[str, Any], kind: str, *, row: int, col: int) -> None:
    finite = p["scores"][np.isfinite(p["scores"])]
    top = float(finite.max()) if finite.size else 1.0
    base = p["baseline"]
    axes = fig.get_subplot(row, col)
    x_end, (y0, y1) = axes.xaxis.domain[1], axes.yaxis.domain
    colour = {"colorscale": SEQUENTIAL, "zmin": 0.0, "zmax": max(top, base),
              "colorbar": {"title": {"text": "score"}, "x": x_end + 0.005, "xanchor": "left", "len": y1 - y0,
                           "y": (y0 + y1) / 2, "thickness": 10,
                           **_colourbar_ticks(base, max(top, base))}}
    fig.add_trace(heatmap(p["scores"], p["rows"], p["cols"], row_dim="earlier head", col_dim="later head",
                          name=kind, value_name="score", colour=colour), row=row, col=col)
    _pair_axes(fig, p, row=row, col=col, x_title=False)


def _colourbar_ticks(base: float, top: float) -> dict[str, list]:
    """Ticks 0, "baseline" and the maximum; the maximum's tick is left out when it would overlap the baseline's."""
    vals, text = [0.0, base], ["0", "baseline"]
    if top > 0 and (top - base) / top > 0.15:
        vals.append(top)
        text.append(f"{top:.3g}")
    return {"tickvals": vals, "ticktext": text}


def _baseline_text(p: dict[str, Any]) -> str:
    return f"baseline {p['baseline']:.3g}" + (f" ± {p['spread']:.2g}" if p["spread"] is not None else "")


def _add_distribution(fig: go.Figure, p: dict[str, Any], kind: str, *, row: int, col: int) -> None:
    scores = p["scores"][p["valid"]]
    fig.add_trace(go.Histogram(x=scores, nbinsx=40, marker_color=SERIES[0], name=f"{kind} scores",
                               hovertemplate="score %{x}<br>%{y} pairs<extra></extra>"), row=row, col=col)
    base, spread = p["baseline"], p["spread"]
    if spread is not None:
        fig.add_vrect(x0=base - spread, x1=base + spread, fillcolor=BASELINE, opacity=0.15, line_width=0,
                      row=row, col=col)
    fig.add_vline(x=base, line={"color": BASELINE, "dash": "dash", "width": 2}, row=row, col=col)
    fig.update_xaxes(title={"text": "score"}, row=row, col=col)
    fig.update_yaxes(title={"text": "pairs"}, row=row, col=col)

"""Figures for any `LabelledResult`: a bar chart for one axis, a heatmap for two, facets of heatmaps for three.

Every axis is titled with the result's dim name and ticked with its labels (layer, head, position and token
strings), placed at integer positions so that repeated token strings stay separate columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.results import LabelledResult
from viz.theme import (
    DIVERGING,
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    TEMPLATE,
    TOOLBAR_BAND,
    as_coloraxis,
    colour_args,
    is_signed,
)

DESCRIBED_INFO = ("site", "metric", "direction", "ablation", "normalised", "by", "kind")
"""The `info` keys that a figure's title states, in this order, when the result has them."""
METRIC_UNITS = {"logit_diff": "logits", "logprob": "nats", "kl": "nats"}
"""The unit of each named metric (a custom metric's is unknown)."""
EDGE_METHODS = ("acdc", "eap", "eap-ig")
NICE_RANGES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def normalised_colour(z: np.ndarray) -> dict[str, Any]:
    """Normalised metrics (0 = corrupted, 1 = clean) on one diverging scale, white at 0 and symmetric, to the
    first of `NICE_RANGES` that holds every |value|: per-head results of every model read on ±1, and small
    per-position effects are not washed out."""
    finite = np.abs(z[np.isfinite(z)])
    top = float(finite.max()) if finite.size else 1.0
    bound = next((r for r in NICE_RANGES if top <= r), top)
    return {"colorscale": DIVERGING, "zmid": 0.0, "zmin": -bound, "zmax": bound}


def metric_of(result: LabelledResult) -> str | None:
    """The metric a result was computed with (its `metric` field or `info["metric"]`), if any."""
    value = getattr(result, "metric", None) or result.info.get("metric")
    return value.value if isinstance(value, Enum) else value


def is_normalised(result: LabelledResult) -> bool:
    """Patching and attribution results: `values` are the normalised metric."""
    return hasattr(result, "clean_metric") and hasattr(result, "corrupted_metric")


def value_label(result: LabelledResult) -> str:
    """What a result's values are, with units, for a colour bar or a value axis: "normalised logit_diff
    (0 = corrupted, 1 = clean)", "Δ kl (nats)" for edge scores, "logit_diff (logits)", or the metric's name."""
    metric = metric_of(result)
    if metric is None:
        return "value"
    unit = METRIC_UNITS.get(metric)
    if is_normalised(result):
        return f"normalised {metric}<br>(0 = corrupted, 1 = clean)"
    if result.method in EDGE_METHODS:
        return f"Δ {metric}" + (f" ({unit})" if unit else "")
    return f"{metric} ({unit})" if unit else str(metric)


def as_array(values: Any) -> np.ndarray:
    """A result's values as a float64 numpy array (exact for float32 and float64 tensors)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        if values.is_complex():
            return values.numpy()
        return values.double().numpy()
    return np.asarray(values, dtype=float)


def ticks(labels: Sequence[str], title: str, max_ticks: int = 60) -> dict[str, Any]:
    """Axis settings that put `labels[i]` at i and title the axis.

    Beyond `max_ticks` labels only every k-th is written (hover still names every cell).
    """
    step = max(1, math.ceil(len(labels) / max_ticks))
    shown = range(0, len(labels), step)
    out = {"title": {"text": title}, "tickmode": "array", "tickvals": list(shown),
           "ticktext": [str(labels[i]) for i in shown]}
    if len(shown) > 12 and max(len(str(lab)) for lab in labels) > 3:  # position labels "12:tok": turned, smaller
        out.update(tickangle=-60, tickfont={"size": 11})
    return out


def describe(result: LabelledResult, extra: Sequence[str] = ()) -> str:
    """A one-line title: the method and the `info` entries that say how it was computed.

    Example: `describe(r)` → "activation_patch · site=z · metric=logit_diff · direction=denoising"
    """
    parts = [result.method]
    for key in (*DESCRIBED_INFO, *extra):
        value = result.info.get(key)
        if isinstance(value, Enum):
            value = value.value
        if isinstance(value, (str, int, float)):
            parts.append(f"{key}={_short(value)}")
    return " · ".join(parts)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def heatmap(
    z: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    row_dim: str,
    col_dim: str,
    signed: bool | None = None,
    coloraxis: str | None = None,
    name: str = "",
    value_name: str = "value",
    colour: dict[str, Any] | None = None,
) -> go.Heatmap:
    """One heatmap trace: rows `row_labels` (y), columns `col_labels` (x), hover naming both and the value.

    With `coloraxis` the colour scale comes from the layout (shared across facets); otherwise it is set here:
    `colour` (colour arguments such as `probability_colour()`) or else `colour_args(z, signed)`.
    """
    if z.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"z: expected shape {(len(row_labels), len(col_labels))}, got {z.shape}")
    rows = np.asarray(row_labels, dtype=object)[:, None].repeat(len(col_labels), axis=1)
    cols = np.asarray(col_labels, dtype=object)[None, :].repeat(len(row_labels), axis=0)
    custom = np.stack([rows, cols], axis=-1)
    trace = go.Heatmap(
        z=z,
        x=np.arange(len(col_labels)),
        y=np.arange(len(row_labels)),
        customdata=custom,
        name=name,
        hovertemplate=f"{row_dim}: %{{customdata[0]}}<br>{col_dim}: %{{customdata[1]}}<br>"
        f"{value_name}: %{{z:.4g}}<extra>{name}</extra>",
    )
    if coloraxis is not None:
        trace.coloraxis = coloraxis
    else:
        trace.update(**(colour if colour is not None else colour_args(z, signed)))
    return trace


def draw_heatmap(
    z: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    row_dim: str,
    col_dim: str,
    title: str,
    signed: bool | None = None,
    value_name: str = "value",
    colour: dict[str, Any] | None = None,
) -> go.Figure:
    """A titled single-heatmap figure, row 0 at the top. Example: `draw_heatmap(z, ["L0"], ["H0"], ...)`"""
    fig = go.Figure(heatmap(z, row_labels, col_labels, row_dim=row_dim, col_dim=col_dim, signed=signed,
                            value_name=value_name, colour=colour))
    fig.data[0].colorbar = {"title": {"text": value_name}}
    fig.update_layout(template=TEMPLATE, title={"text": title},
                      xaxis=ticks(col_labels, col_dim), yaxis={**ticks(row_labels, row_dim), "autorange": "reversed"})
    _size_heatmap(fig, len(row_labels), len(col_labels), title)
    return fig


def draw_bar(
    values: np.ndarray,
    labels: Sequence[str],
    *,
    dim: str,
    title: str,
    signed: bool | None = None,
    value_name: str = "value",
) -> go.Figure:
    """Bars at each label; coloured red/blue by sign when the data is signed."""
    values = np.asarray(values, dtype=float)
    if signed is None:
        signed = is_signed(values)
    colours = [POSITIVE if v >= 0 else NEGATIVE for v in values] if signed else NEUTRAL
    fig = go.Figure(go.Bar(
        x=np.arange(len(labels)), y=values, marker_color=colours, customdata=np.asarray(labels, dtype=object),
        hovertemplate=f"{dim}: %{{customdata}}<br>{value_name}: %{{y:.4g}}<extra></extra>",
    ))
    fig.update_layout(template=TEMPLATE, title={"text": title}, xaxis=ticks(labels, dim),
                      yaxis={"title": {"text": value_name}, "zeroline": True, "zerolinecolor": "#666666"})
    return fig


def draw_result(
    result: LabelledResult,
    *,
    title: str | None = None,
    signed: bool | None = None,
    facet_dim: int = 0,
    facet_cols: int = 4,
    value_name: str | None = None,
) -> go.Figure:
    """The default figure of any `LabelledResult`, chosen by its number of axes.

    1 axis: bar chart; 2 axes: heatmap (rows = first axis); 3 axes: one heatmap per index of axis
    `facet_dim`, sharing one colour scale; 4 axes (pairs such as [layer, head, layer, head]): a heatmap of
    (axis 0, axis 1) pairs against (axis 2, axis 3) pairs. `signed=None` picks the diverging scale when any
    value is negative. The colour bar (or value axis) names the metric and its units (`value_label`); normalised
    patching results share one symmetric scale, white at 0, ±1 when any entry reaches 1 (`normalised_colour`).
    Example: `draw_result(activation_patch(model, task, "z"))`
    """
    title = describe(result) if title is None else title
    value_name = value_label(result) if value_name is None else value_name
    z = as_array(result.values)
    if np.iscomplexobj(z):
        raise ValueError("result: complex values cannot be drawn as a heatmap; draw .real or .abs() instead")
    colour = normalised_colour(z) if is_normalised(result) and signed is not False else None
    if z.ndim == 1:
        return draw_bar(z, result.labels[0], dim=result.dims[0], title=title, signed=signed, value_name=value_name)
    if z.ndim == 2:
        return draw_heatmap(z, result.labels[0], result.labels[1], row_dim=result.dims[0], col_dim=result.dims[1],
                            title=title, signed=signed, value_name=value_name, colour=colour)
    if z.ndim == 3:
        return draw_facets(z, result.dims, result.labels, facet_dim=facet_dim, title=title, signed=signed,
                           facet_cols=facet_cols, value_name=value_name, colour=colour)
    if z.ndim == 4:
        rows, cols = pair_labels(result.labels[0], result.labels[1]), pair_labels(result.labels[2], result.labels[3])
        return draw_heatmap(z.reshape(len(rows), len(cols)), rows, cols,
                            row_dim=f"{result.dims[0]}·{result.dims[1]}", col_dim=f"{result.dims[2]}·{result.dims[3]}",
                            title=title, signed=signed, value_name=value_name)
    raise ValueError(f"result: can draw 1 to 4 axes, got {z.ndim} (dims {result.dims}); select or reduce axes first")


def pair_labels(outer: Sequence[str], inner: Sequence[str]) -> list[str]:
    """Labels of a flattened (outer, inner) axis: "L0"+"H1" → "L0H1", others joined with ":"."""
    joiner = "" if all(o.startswith("L") for o in outer) and all(i.startswith("H") for i in inner) else ":"
    return [f"{o}{joiner}{i}" for o in outer for i in inner]


def draw_facets(
    z: np.ndarray,
    dims: Sequence[str],
    labels: Sequence[Sequence[str]],
    *,
    facet_dim: int = 0,
    title: str,
    signed: bool | None = None,
    facet_cols: int = 4,
    value_name: str = "value",
    colour: dict[str, Any] | None = None,
) -> go.Figure:
    """One heatmap per index of axis `facet_dim` of a 3-axis array, on a grid, with one shared colour scale."""
    if z.ndim != 3:
        raise ValueError(f"z: expected 3 axes, got shape {z.shape}")
    if not -3 <= facet_dim < 3:
        raise ValueError(f"facet_dim must be an axis of a 3-axis result (0, 1 or 2), got {facet_dim}")
    facet_dim %= 3
    rest = [a for a in range(3) if a != facet_dim]
    z = np.moveaxis(z, facet_dim, 0)
    n = z.shape[0]
    n_cols = min(n, facet_cols)
    n_rows = math.ceil(n / n_cols)
    facet_labels = [f"{dims[facet_dim]} {lab}" for lab in labels[facet_dim]]
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=facet_labels, horizontal_spacing=0.06,
                        vertical_spacing=min(0.12, 0.3 / n_rows))
    row_dim, col_dim = dims[rest[0]], dims[rest[1]]
    facet_px = _clamp(80 + 20 * z.shape[2], 240, 560)
    max_x_ticks = max(2, int(facet_px // 18))  # turned labels need about 18 px each
    for i in range(n):
        r, c = divmod(i, n_cols)
        fig.add_trace(heatmap(z[i], labels[rest[0]], labels[rest[1]], row_dim=row_dim, col_dim=col_dim,
                              coloraxis="coloraxis", name=facet_labels[i], value_name=value_name),
                      row=r + 1, col=c + 1)
        fig.update_xaxes(ticks(labels[rest[1]], col_dim if r == n_rows - 1 else "", max_ticks=max_x_ticks),
                         row=r + 1, col=c + 1)
        fig.update_yaxes({**ticks(labels[rest[0]], row_dim if c == 0 else ""), "autorange": "reversed"},
                         row=r + 1, col=c + 1)
    scale = as_coloraxis(colour if colour is not None else colour_args(z, signed))
    fig.update_layout(template=TEMPLATE, title={"text": title},
                      coloraxis={**scale, "colorbar": {"title": {"text": value_name}}},
                      height=int(90 + TOOLBAR_BAND + n_rows * _clamp(70 + 20 * z.shape[1], 200, 520)
                                 + (50 if "tickangle" in ticks(labels[rest[1]], "", max_x_ticks) else 0)),
                      width=int(170 + n_cols * facet_px))
    return fig


def _size_heatmap(fig: go.Figure, n_rows: int, n_cols: int, title: str = "") -> None:
    """Cells of a readable size: at least 300 px high, about 22 px a row up to 1200 px; wide enough for the
    title (about 10 px a character at the title's size)."""
    fig.update_layout(height=int(min(1200, max(320, 140 + 22 * n_rows))),
                      width=int(min(1400, max(480, 220 + 28 * n_cols, 80 + 10 * len(title)))))


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))

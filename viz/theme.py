"""The one look of every figure: a Plotly template, the colour scales, and the colour of each kind of thing.

Signed data (patching effects, attributions, logit differences) uses `DIVERGING`, centred at 0 by
`colour_args` (blue negative, white zero, red positive); non-negative scores (composition scores, attention
probabilities, AUCs) use `SEQUENTIAL`. Fonts are sized to read at 100% zoom. Nothing here changes Plotly's
global default template: every figure gets `template=TEMPLATE` explicitly.
Example: `go.Figure(layout={"template": TEMPLATE})`
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

FONT_FAMILY = "Inter, 'Helvetica Neue', Arial, sans-serif"
FONT_SIZE = 14

DIVERGING = "RdBu_r"
"""Signed data: blue < 0 < red, white at 0 (with `zmid=0`)."""
SEQUENTIAL = "Viridis"
"""Non-negative scores, low (dark) to high (bright)."""
PROBABILITY = "Blues"
"""Attention probabilities in [0, 1]."""

POSITIVE = "#c0392b"
NEGATIVE = "#2166ac"
NEUTRAL = "#8c8c8c"
FADED = "rgba(140, 140, 140, 0.25)"
BASELINE = "#333333"
QKV_COLOURS = {"q": "#1b9e77", "k": "#d95f02", "v": "#7570b3", None: "#555555"}
"""Edges into a head's query, key and value inputs, and every other edge."""
QKV_DASHES = {"q": "solid", "k": "dash", "v": "dot", None: "solid"}
"""A second cue for q/k/v edges (readable in grey-scale and for colour-blind readers)."""
SERIES = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")

TEMPLATE_NAME = "circuits"
TOOLBAR_BAND = 34
"""Pixels at the top of every figure kept clear for Plotly's toolbar: titles start below it."""

TEMPLATE = go.layout.Template(
    layout=go.Layout(
        font={"family": FONT_FAMILY, "size": FONT_SIZE, "color": "#222222"},
        # the title sits in the top margin, below the band where Plotly's toolbar (the modebar) appears
        title={"font": {"size": FONT_SIZE + 4}, "x": 0.02, "xanchor": "left", "y": 1.0, "yref": "container",
               "yanchor": "top", "pad": {"t": TOOLBAR_BAND}},
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=list(SERIES),
        margin={"l": 70, "r": 30, "t": TOOLBAR_BAND + 60, "b": 60},
        xaxis={"showgrid": False, "zeroline": False, "ticks": "outside", "automargin": True, "linecolor": "#999999"},
        yaxis={"showgrid": True, "gridcolor": "#eeeeee", "zeroline": False, "ticks": "outside", "automargin": True,
               "linecolor": "#999999"},
        hoverlabel={"font": {"family": FONT_FAMILY, "size": FONT_SIZE - 1}},
        legend={"font": {"size": FONT_SIZE - 1}},
        coloraxis={"colorbar": {"thickness": 14, "outlinewidth": 0}},
    ),
    data={"heatmap": [go.Heatmap(colorbar={"thickness": 14, "outlinewidth": 0})]},
)
pio.templates[TEMPLATE_NAME] = TEMPLATE


def is_signed(values: Any) -> bool:
    """True when the data has entries below 0 (then it is drawn with the diverging scale)."""
    arr = np.asarray(values, dtype=float)
    finite = arr[np.isfinite(arr)]
    return bool(finite.size and finite.min() < 0)


def colour_args(values: Any, signed: bool | None = None) -> dict[str, Any]:
    """Colour arguments for a heatmap or colour axis: diverging centred at 0 for signed data, else sequential.

    `signed=None` decides from the data (any entry below 0); patching and attribution results pass `True`,
    since their sign is meaningful even where every entry happens to be positive.
    Example: `go.Heatmap(z=z, **colour_args(z))`
    """
    if signed is None:
        signed = is_signed(values)
    if signed:
        return {"colorscale": DIVERGING, "zmid": 0.0}
    return {"colorscale": SEQUENTIAL}


def probability_colour() -> dict[str, Any]:
    """Colour arguments for probabilities (attention patterns): `PROBABILITY` on the fixed range [0, 1]."""
    return {"colorscale": PROBABILITY, "zmin": 0.0, "zmax": 1.0}


def as_coloraxis(args: dict[str, Any]) -> dict[str, Any]:
    """Heatmap colour arguments (zmin/zmid/zmax) spelled for a shared `layout.coloraxis` (cmin/cmid/cmax)."""
    return {("c" + k[1:] if k in ("zmin", "zmid", "zmax") else k): v for k, v in args.items()}

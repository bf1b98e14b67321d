"""Direct logit attribution: a bar per component beside a layer × head heatmap of the heads' share."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.results import LabelledResult
from viz.labelled import as_array, describe, heatmap, pair_labels, ticks
from viz.theme import DIVERGING, NEGATIVE, POSITIVE, TEMPLATE

HEAD_NAME = re.compile(r"^L(\d+)H(\d+)$")


def draw_dla(result: LabelledResult, *, title: str | None = None,
             value_name: str = "direct effect on logit diff (logits)") -> go.Figure:
    """Direct logit attribution as a bar chart by component and, for the heads, a layer × head heatmap.

    Accepts the result by head ([layer, head]) or by component ([component], labels such as "embed",
    "pos_embed", "L0H1", "bias"): the heatmap places every component named `L{l}H{h}`; the bars show every
    component in the result's order. Signed: red raises the answer's logit (difference), blue lowers it.
    Example: `draw_dla(direct_logit_attribution(model, tokens, answers, by="head"))`
    """
    z = as_array(result.values)
    title = describe(result) if title is None else title
    if z.ndim == 2:
        names = pair_labels(result.labels[0], result.labels[1])
        bars = z.reshape(-1)
        grid, layer_labels, head_labels = z, list(result.labels[0]), list(result.labels[1])
    elif z.ndim == 1:
        names, bars = list(result.labels[0]), z
        grid, layer_labels, head_labels = head_grid(names, z)
    else:
        raise ValueError(f"result: DLA figures take [component] or [layer, head] values, got dims {result.dims}; "
                         "reduce the other axes (for example sum over positions) first")
    has_grid = grid is not None
    fig = make_subplots(rows=1, cols=2 if has_grid else 1, column_widths=[0.6, 0.4] if has_grid else None,
                        subplot_titles=["by component", "heads: layer × head"] if has_grid else None,
                        horizontal_spacing=0.12)
    fig.add_trace(go.Bar(x=np.arange(len(names)), y=bars, customdata=np.asarray(names, dtype=object),
                         marker_color=[POSITIVE if v >= 0 else NEGATIVE for v in bars], name="by component",
                         hovertemplate=f"%{{customdata}}<br>{value_name}: %{{y:.4g}}<extra></extra>"), row=1, col=1)
    fig.update_xaxes(ticks(names, "component"), row=1, col=1)
    fig.update_yaxes({"title": {"text": value_name}, "zeroline": True, "zerolinecolor": "#666666"}, row=1, col=1)
    if has_grid:
        fig.add_trace(heatmap(grid, layer_labels, head_labels, row_dim="layer", col_dim="head", coloraxis="coloraxis",
                              name="heads", value_name=value_name), row=1, col=2)
        fig.update_xaxes(ticks(head_labels, "head"), row=1, col=2)
        fig.update_yaxes({**ticks(layer_labels, "layer"), "autorange": "reversed"}, row=1, col=2)
        fig.update_layout(coloraxis={"colorscale": DIVERGING, "cmid": 0.0, "colorbar": {"title": {"text": value_name}}})
    fig.update_layout(template=TEMPLATE, title={"text": title}, showlegend=False, height=460,
                      width=max(900, 320 + 22 * len(names)))
    return fig


def head_grid(names: Sequence[str], values: np.ndarray) -> tuple[np.ndarray | None, list[str], list[str]]:
    """Place the components named `L{l}H{h}` on a [layer, head] grid (NaN where a head is absent)."""
    found = [(int(m[1]), int(m[2]), v) for n, v in zip(names, values) if (m := HEAD_NAME.match(n))]
    if not found:
        return None, [], []
    n_layers = max(f[0] for f in found) + 1
    n_heads = max(f[1] for f in found) + 1
    grid = np.full((n_layers, n_heads), np.nan)
    for layer, head, v in found:
        grid[layer, head] = v
    return grid, [f"L{i}" for i in range(n_layers)], [f"H{i}" for i in range(n_heads)]

"""Faithfulness curves (metric as the top-n edges are added) and ROC curves against a ground-truth circuit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from viz.labelled import as_array
from viz.theme import BASELINE, SERIES, TEMPLATE

X_NAMES = ("n_edges", "x", "sizes", "fpr")
Y_NAMES = ("faithfulness", "y", "values", "tpr")


def curve_xy(curve: Any, x_names: Sequence[str] = X_NAMES, y_names: Sequence[str] = Y_NAMES) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """The (x, y) arrays of a curve given as an (x, y) pair, a 1-axis `LabelledResult` whose tick labels are
    the x values, or an object with x and y attributes (`n_edges`/`faithfulness`, `fpr`/`tpr`, `x`/`y`)."""
    if isinstance(curve, tuple) and len(curve) == 2:
        x, y = as_array(curve[0]), as_array(curve[1])
    else:
        x_name = next((n for n in x_names if hasattr(curve, n) and n != "values"), None)
        y_name = next((n for n in y_names if hasattr(curve, n) and n != "values"), None)
        if x_name and y_name:
            x, y = as_array(getattr(curve, x_name)), as_array(getattr(curve, y_name))
        elif hasattr(curve, "values") and hasattr(curve, "labels") and len(curve.labels) == 1:
            y = as_array(curve.values)
            try:
                x = np.asarray([float(t) for t in curve.labels[0]])
            except ValueError:
                x = np.arange(len(y), dtype=float)
        else:
            raise ValueError(f"curve: expected an (x, y) pair, a 1-axis result, or an object with x/y attributes "
                             f"({'/'.join(x_names)} and {'/'.join(y_names)}); got {type(curve).__name__}")
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"curve: x and y must be 1-d of one length, got shapes {x.shape} and {y.shape}")
    return x, y


def draw_faithfulness(
    curves: Mapping[str, Any] | Any,
    *,
    title: str = "faithfulness as edges are added",
    x_title: str = "edges in the circuit",
    y_title: str = "normalised metric (0 = ablated, 1 = full model)",
    log_x: bool = False,
) -> go.Figure:
    """One line per scoring method: the circuit's normalised metric as its top-n edges are added.

    `curves` is one curve or {method name: curve}; see `curve_xy` for the accepted forms. Dotted lines
    mark 0 (everything ablated) and 1 (the full model).
    Example: `draw_faithfulness({"EAP": eap_curve, "ACDC": acdc_curve})`
    """
    if not isinstance(curves, Mapping):
        curves = {"": curves}
    fig = go.Figure()
    for i, (name, curve) in enumerate(curves.items()):
        x, y = curve_xy(curve)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers" if len(x) <= 40 else "lines", name=name or "circuit",
                                 line={"color": SERIES[i % len(SERIES)], "width": 2.5}, marker={"size": 6},
                                 hovertemplate="%{x} edges<br>metric %{y:.4g}<extra>" + (name or "") + "</extra>"))
    for level in (0.0, 1.0):
        fig.add_hline(y=level, line={"color": BASELINE, "dash": "dot", "width": 1})
    fig.update_layout(template=TEMPLATE, title={"text": title}, xaxis={"title": {"text": x_title},
                      "type": "log" if log_x else "linear"}, yaxis={"title": {"text": y_title}},
                      showlegend=len(curves) > 1, height=480, width=760)
    return fig


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve by the trapezoid rule (points sorted by false-positive rate)."""
    order = np.lexsort((tpr, fpr))
    return float(np.trapezoid(tpr[order], fpr[order]))


def draw_roc(curves: Mapping[str, Any] | Any, *, title: str = "ROC against the ground-truth circuit") -> go.Figure:
    """ROC curves (true- against false-positive rate), one per scoring method, AUC in the legend.

    Each curve is an (fpr, tpr) pair or an object with `.fpr` and `.tpr` (and `.auc`, else computed by the
    trapezoid rule). The dashed diagonal is chance.
    Example: `draw_roc({"EAP": roc_eap, "EAP-IG": roc_ig})`
    """
    if not isinstance(curves, Mapping):
        curves = {"": curves}
    fig = go.Figure()
    for i, (name, curve) in enumerate(curves.items()):
        fpr, tpr = curve_xy(curve, ("fpr", "x"), ("tpr", "y"))
        auc = getattr(curve, "auc", None)
        auc = roc_auc(fpr, tpr) if auc is None else float(auc)
        label = f"{name} (AUC {auc:.3f})" if name else f"AUC {auc:.3f}"
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=label, line={"color": SERIES[i % len(SERIES)],
                                 "width": 2.5},
                                 hovertemplate="FPR %{x:.3f}<br>TPR %{y:.3f}<extra>" + (name or "") + "</extra>"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", hoverinfo="skip",
                             line={"color": BASELINE, "dash": "dash", "width": 1}))
    fig.update_layout(template=TEMPLATE, title={"text": title},
                      xaxis={"title": {"text": "false-positive rate"}, "range": [-0.01, 1.01]},
                      yaxis={"title": {"text": "true-positive rate"}, "range": [-0.01, 1.01], "scaleanchor": "x"},
                      height=540, width=600)
    return fig

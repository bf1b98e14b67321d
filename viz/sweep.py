"""Figures of a sweep's tidy table (`circuits.sweep.tidy_table`): faithfulness against circuit size per
method, ROC per method against a known circuit, and threshold against the edges kept.

They read the table's columns (`method`, `model`, `task`, `n_edges`, `faithfulness`, `param.threshold`) and
the entries' `roc` records, nothing else. Example: `draw_sweep_faithfulness(result.table)`
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from viz.curves import draw_faithfulness, draw_roc
from viz.theme import SERIES, TEMPLATE


def _series(table, group: Sequence[str]) -> dict[str, Any]:
    """{name: sub-table} per group of rows; the name lists only the group columns that vary."""
    varying = [c for c in group if table[c].nunique(dropna=False) > 1] or group[:1]
    return {" · ".join(str(v) for v in (key if isinstance(key, tuple) else (key,))): sub
            for key, sub in table.groupby(varying if len(varying) > 1 else varying[0], sort=False)}


def draw_sweep_faithfulness(table, *, group: Sequence[str] = ("method", "model", "task")) -> go.Figure:
    """Faithfulness (normalised metric, 0 = ablated, 1 = full model) against the circuit's edges, one line per
    method (per model and task where they vary), points sorted by size. Example: `draw_sweep_faithfulness(t)`"""
    ok = table[(table["status"] == "ok")].dropna(subset=["n_edges", "faithfulness"])
    if ok.empty:
        raise ValueError("table: no finished run with a circuit (n_edges and faithfulness)")
    curves = {}
    for name, sub in _series(ok, list(group)).items():
        sub = sub.sort_values(["n_edges", "faithfulness"])
        curves[name] = (sub["n_edges"].to_numpy(float), sub["faithfulness"].to_numpy(float))
    return draw_faithfulness(curves, title="faithfulness against circuit size")


def draw_sweep_roc(entries: Sequence[Mapping[str, Any]]) -> go.Figure:
    """ROC against the known circuit of each run that has one (a run's `roc` record), named by method and
    parameters; runs whose curves coincide (EAP scores do not depend on how many edges are kept) are drawn
    once under the first name. Example: `draw_sweep_roc(result.entries)`"""
    curves: dict[str, Any] = {}
    seen: set[tuple] = set()
    for e in entries:
        r = e.get("roc")
        if not r:
            continue
        ident = (tuple(r["fpr"]), tuple(r["tpr"]), e["identity"]["run"]["method"])
        if ident in seen:
            continue
        seen.add(ident)
        run = e["identity"]["run"]
        params = ", ".join(f"{k}={v}" for k, v in run["params"].items() if k not in ("top_n",))
        curves[f"{run['method']} ({params})" if params else run["method"]] = _Curve(r["fpr"], r["tpr"], r["auc"])
    if not curves:
        raise ValueError("entries: no run has an ROC (no model with a known circuit, or no scored circuit)")
    return draw_roc(curves, title="ROC against the known circuit")


def draw_threshold_vs_edges(table, *, group: Sequence[str] = ("method", "model", "task")) -> go.Figure:
    """Edges kept against the threshold (log scale), one line per method (per model and task where they vary).
    Example: `draw_threshold_vs_edges(t)`"""
    if "param.threshold" not in table.columns:
        raise ValueError("table: no run has a 'threshold' parameter")
    ok = table[(table["status"] == "ok")].dropna(subset=["param.threshold", "n_edges"])
    if ok.empty:
        raise ValueError("table: no finished run with a threshold and a circuit")
    fig = go.Figure()
    for i, (name, sub) in enumerate(_series(ok, list(group)).items()):
        sub = sub.sort_values("param.threshold")
        fig.add_trace(go.Scatter(x=sub["param.threshold"], y=sub["n_edges"], mode="lines+markers", name=name,
                                 line={"color": SERIES[i % len(SERIES)], "width": 2.5}, marker={"size": 7},
                                 hovertemplate="threshold %{x:.3g}<br>%{y} edges<extra>" + name + "</extra>"))
    positive = (ok["param.threshold"] > 0).all()
    fig.update_layout(template=TEMPLATE, title={"text": "edges kept against the threshold"},
                      xaxis={"title": {"text": "threshold"}, "type": "log" if positive else "linear"},
                      yaxis={"title": {"text": "edges in the circuit"}, "rangemode": "tozero"},
                      height=460, width=720)
    return fig


def sweep_figures(table, entries: Sequence[Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Every figure the sweep's runs allow: {"faithfulness", "roc", "threshold"} where there is data for it."""
    out = {}
    draws = {"faithfulness": lambda: draw_sweep_faithfulness(table), "roc": lambda: draw_sweep_roc(entries),
             "threshold": lambda: draw_threshold_vs_edges(table)}
    for name, draw in draws.items():
        try:
            out[name] = draw()
        except ValueError:
            continue
    return out


class _Curve:
    def __init__(self, fpr: Sequence[float], tpr: Sequence[float], auc: float):
        self.fpr, self.tpr, self.auc = list(fpr), list(tpr), auc

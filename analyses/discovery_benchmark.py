"""How well each discovery method recovers a circuit known by construction: ROC AUC per method, ablation and metric.

    python -m analyses.discovery_benchmark [--short] [--out out/discovery_benchmark] [--quiet]

Models: the planted induction model (its previous-token and induction heads; `circuits.models.planted`) and
tracr-compiled programs (`reverse` and `frac_prevs` as in the ACDC paper, and `hist`), each converted with
`circuits.models.from_tracr`. The truth is `circuits.graph.known.residual_circuit`: every edge whose
source writes a residual dimension its destination reads. Methods: ACDC over a sweep of thresholds (each
threshold one ROC point, the AUC the area under their step frontier, as in the ACDC paper), EAP and
EAP-IG (edges ranked by |score|) and node patching (each component's output ablated; node level only).
Each is run with zero and resample ablation and every metric that fits the output (KL and log-probability
for categorical outputs, L2 for numerical ones); the time column is the method's wall-clock seconds
(for ACDC the whole sweep); "inert known edges" counts the known edges whose removal alone changes no
logit on the task's inputs under that ablation (they carry nothing there, so no method can find them, and
they cap the AUC); "edge AUC (active)" scores against the known circuit less those edges. `--short` (CI)
runs fewer thresholds and inputs and the first metric of each model only. Writes `table.md`,
`summary.json` and `report.html` (the table and a figure of the AUCs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor
from transformer_lens import TransformerBridge

from analyses.common import write_outputs
from circuits.graph import Circuit, acdc, eap, roc
from circuits.graph.known import inert_edges, residual_circuit
from circuits.graph.node_patching import node_patching
from circuits.models import planted_induction
from circuits.tasks import Task, induction_task
from viz import Section

PROGRAMS = ("reverse", "frac_prevs", "hist")
THRESHOLDS = {"short": (1.0, 1e-1, 1e-2, 1e-3, 1e-6), "full": (3.0, 1.0, 0.3, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-6)}
IG_STEPS = 8


@dataclass(frozen=True, eq=False)
class Case:
    """One model with its task, its known circuit and the metrics that fit its output."""

    name: str
    model: TransformerBridge
    task: Task
    truth: Circuit
    metrics: dict[str, str | Callable[[Tensor], Tensor]]


def planted_case(short: bool) -> Case:
    model = planted_induction()
    heads = [model.planted.previous_token, model.planted.induction]
    task = induction_task(8 if short else 32, 6 if short else 12, model.cfg.d_vocab, seed=0)
    return Case("planted induction", model, task, residual_circuit(model, heads=heads),
                {"kl": "kl", "logprob": "logprob"})


def tracr_case(name: str, short: bool) -> Case:
    from circuits.models.tracr import compile_program, from_tracr
    from circuits.tasks.tracr import program_task

    model = from_tracr(compile_program(name).assembled)
    pt = program_task(model, n=32 if short else None, seed=0)
    return Case(f"tracr {name}", model, pt.task, residual_circuit(model), pt.metrics)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def evaluate(case: Case, ablation: str, metric_name: str, thresholds: tuple[float, ...], progress: bool
             ) -> list[dict[str, Any]]:
    """One row per method: its edge and node AUC against the known circuit and its time."""
    model, task, truth = case.model, case.task, case.truth
    metric = case.metrics[metric_name]
    common = dict(model=case.name, ablation=ablation, metric=metric_name)
    rows = []
    inert = inert_edges(model, task, truth, ablation)
    common["inert_known_edges"] = int(inert.sum())
    active = truth.with_members(truth.members & ~inert)
    sweep, seconds = timed(lambda: [acdc(model, task, threshold=t, metric=metric, ablation=ablation,
                                         progress=False) for t in thresholds])
    smallest = sweep[-1].circuit
    rows.append(dict(common, method="ACDC", edge_auc=roc(sweep, truth).auc, active_auc=roc(sweep, active).auc,
                     node_auc=roc(sweep, truth, level="node").auc, seconds=seconds,
                     exact_at_smallest=bool(torch.equal(smallest.members, truth.members)),
                     active_at_smallest=bool(torch.equal(smallest.members, active.members)),
                     edges_at_smallest=smallest.n_edges))
    for method, steps in (("EAP", 0), ("EAP-IG", IG_STEPS)):
        result, seconds = timed(lambda steps=steps: eap(model, task, metric=metric, ablation=ablation, ig_steps=steps))
        rows.append(dict(common, method=method, edge_auc=roc(result, truth).auc, active_auc=roc(result, active).auc,
                         node_auc=roc(result, truth, level="node").auc, seconds=seconds))
    result, seconds = timed(lambda: node_patching(model, task, ablation=ablation, metric=metric))
    rows.append(dict(common, method="node patching", edge_auc=None, active_auc=None,
                     node_auc=roc(result, truth, level="node").auc, seconds=seconds))
    return rows


def run(short: bool, progress: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of the AUC table, one description per model)."""
    thresholds = THRESHOLDS["short" if short else "full"]
    cases = [planted_case(short)] + [tracr_case(name, short) for name in PROGRAMS]
    rows, models = [], []
    for case in cases:
        g = case.truth.graph
        models.append(dict(model=case.name, layers=g.n_layers, heads=g.n_heads, edges=g.n_edges,
                           known_edges=case.truth.n_edges, inputs=case.task.batch,
                           attention=case.model.cfg.attention_dir))
        for ablation in ("zero", "resample"):
            for metric_name in list(case.metrics)[:1] if short else case.metrics:
                rows += evaluate(case, ablation, metric_name, thresholds, progress)
    return rows, models


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The AUC table in Markdown (— where a method has no edge-level score)."""
    def fmt(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    head = ("| model | ablation | metric | inert known edges | method | edge AUC | edge AUC (active) | node AUC | "
            "seconds |\n|---|---|---|---:|---|---:|---:|---:|---:|\n")
    return head + "\n".join(
        f"| {r['model']} | {r['ablation']} | {r['metric']} | {r['inert_known_edges']} | {r['method']} | "
        f"{fmt(r['edge_auc'])} | {fmt(r['active_auc'])} | {fmt(r['node_auc'])} | {r['seconds']:.2f} |"
        for r in rows) + "\n"


def auc_figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Grouped bars: edge AUC (left) and node AUC (right) per method, one group per model · ablation · metric."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("edge AUC", "node AUC"), shared_yaxes=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = dict(zip(methods, ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        x = [f"{r['model']}<br>{r['ablation']} · {r['metric']}" for r in mine]
        for col, key in ((1, "edge_auc"), (2, "node_auc")):
            y = [r[key] for r in mine]
            fig.add_trace(go.Bar(x=x, y=y, name=method, marker_color=colours[method], showlegend=col == 1,
                                 legendgroup=method,
                                 hovertemplate=f"{method}<br>%{{x}}<br>AUC %{{y:.3f}}<extra></extra>"), row=1, col=col)
    fig.update_yaxes(range=[0, 1.05], title_text="AUC", row=1, col=1)
    fig.update_layout(barmode="group", height=520, title="Circuit recovery against circuits known by construction")
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="fewer thresholds and inputs (CI)")
    parser.add_argument("--out", type=Path, default=Path("out/discovery_benchmark"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows, models = run(args.short, progress=not args.quiet)
    table = markdown_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    print(table)
    thresholds = THRESHOLDS["short" if args.short else "full"]
    summary = {"short": args.short, "thresholds": list(thresholds), "ig_steps": IG_STEPS, "models": models,
               "rows": rows}
    text = (f"ACDC thresholds {list(thresholds)}; EAP-IG with {IG_STEPS} steps. Truth: every edge whose source writes "
            "a residual dimension its destination reads (circuits.graph.known.residual_circuit).")
    return write_outputs(args.out, summary, [Section("AUC per method", text, [auc_figure(rows)])],
                         title="Discovery benchmark", subtitle="planted induction and tracr programs")


if __name__ == "__main__":
    main()

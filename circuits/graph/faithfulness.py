"""How much of the model's behaviour a circuit keeps, curves of it as edges are added, and ROC against a truth.

The normalised metric of a circuit is (metric(circuit) − metric(nothing)) / (metric(full) − metric(nothing)):
0 when every edge is ablated (for resample ablation: the corrupted run), 1 for the full model, where the
circuit's run keeps its edges and ablates all others (edge patching, `circuits.graph.patching`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from circuits.graph.circuit import Circuit, top_n_mask
from circuits.graph.known import circuit_nodes
from circuits.graph.metric import resolve_metric
from circuits.graph.nodes import ComputeGraph
from circuits.graph.patching import Ablation, EdgePatcher
from circuits.results import LabelledResult
from circuits.tasks.metrics import MetricSpec
from circuits.tasks.task import Task
from circuits.validate import check_count, check_gap, check_scores, check_task


@dataclass(frozen=True, eq=False)
class Faithfulness(LabelledResult):
    """`values` = the metric of [the circuit, the full model, everything ablated]; `normalised` places the
    circuit between ablated (0) and full (1)."""

    normalised: float = float("nan")
    n_edges: int = 0


@dataclass(frozen=True, eq=False)
class FaithfulnessCurve(LabelledResult):
    """The normalised metric of the top-n edges of a score, for each n: `values` [n] with tick labels n;
    `n_edges` the sizes and `faithfulness` the values (the names `viz.draw_faithfulness` reads)."""

    n_edges: tuple[int, ...] = ()

    @property
    def faithfulness(self) -> Tensor:
        return self.values


@dataclass(frozen=True, eq=False)
class Roc:
    """A ROC curve against a ground-truth circuit: false/true-positive rates and the area.

    `level` "edge" or "node"; `thresholds` the sweep's thresholds, one per point (a sweep of circuits only).
    For a score ranking the points are the curve through every distinct score (the AUC counts ties ½);
    for a sweep of circuits they are each circuit's (FPR, TPR), with (0, 0) and (1, 1) added."""

    fpr: Tensor
    tpr: Tensor
    auc: float
    level: str = "edge"
    thresholds: Tensor | None = None


def faithfulness(
    model: TransformerBridge,
    task: Task,
    circuit: Circuit | nx.DiGraph,
    *,
    ablation: Ablation | str | None = None,
    metric: MetricSpec = None,
) -> Faithfulness:
    """The normalised metric of `circuit` alone (its edges kept, all others ablated) against the full model.

    `ablation` defaults to the circuit's own (its `ablation` attribute) or resample; `metric` to the task's
    (the one contract, `circuits.tasks.metrics`). Raises ValueError for a circuit of another model, and for a
    task on which the full model and the fully ablated one score the same (the normalised value would be 0/0)
    or the metric is not finite. Example: `faithfulness(model, task, result.graph).normalised`
    """
    check_task(model, task)
    patcher = EdgePatcher(model, task, _ablation_of(circuit, ablation))
    c = as_circuit(circuit, patcher.graph, patcher.weights.description)
    gm = resolve_metric(task, metric, patcher.clean_logits_full)
    masks = torch.stack([c.members, patcher.graph.valid, torch.zeros_like(c.members)])
    values = gm(patcher.run(masks.to(patcher.device))).detach().cpu()
    check_gap(float(values[1]), float(values[2]), name="task (full vs every edge ablated)", raise_on_zero=True)
    normalised = float((values[0] - values[2]) / (values[1] - values[2]))
    return Faithfulness(values=values, dims=("run",), labels=(("circuit", "full", "ablated"),), method="faithfulness",
                        info=dict(metric=gm.name, ablation=patcher.ablation.value, normalised=normalised),
                        normalised=normalised, n_edges=c.n_edges)


def faithfulness_curve(
    model: TransformerBridge,
    task: Task,
    scores: Circuit | LabelledResult | Float[Tensor, "n_src n_dst"],
    ns: Sequence[int],
    *,
    ablation: Ablation | str = Ablation.RESAMPLE,
    metric: MetricSpec = None,
    by_abs: bool = True,
    progress: bool = True,
) -> FaithfulnessCurve:
    """The normalised metric of the circuit made of the top-n edges of `scores` (|score| unless `by_abs=False`),
    for each n ≥ 0 in `ns`, in batched forwards behind a progress bar (`progress=False` silences it). Scores must
    be finite on every edge, except ACDC's NaN for an edge it never tested (ranked last). Raises ValueError
    where `faithfulness` does. Example: `faithfulness_curve(model, task, r, [8, 16])`
    """
    check_task(model, task)
    ns = [check_count(n, "ns") for n in ns]
    if not ns:
        raise ValueError("ns: expected at least one circuit size")
    patcher = EdgePatcher(model, task, ablation)
    table = _score_table(scores, patcher.graph, patcher.weights.description)
    valid = patcher.graph.valid
    _check_ranked(table, valid, scores)
    gm = resolve_metric(task, metric, patcher.clean_logits_full)
    masks = torch.stack([valid, torch.zeros_like(valid)] + [top_n_mask(table, valid, n, by_abs=by_abs) for n in ns])
    chunks = masks.to(patcher.device).split(patcher.chunk_size())
    values = torch.cat([gm(patcher.run(m)).detach().cpu()
                        for m in tqdm(chunks, desc="faithfulness curve", disable=not progress, leave=False)])
    values = torch.cat([values[2:], values[:2]])  # the circuits, then full and ablated
    check_gap(float(values[-2]), float(values[-1]), name="task (full vs every edge ablated)", raise_on_zero=True)
    normalised = (values[:-2] - values[-1]) / (values[-2] - values[-1])
    return FaithfulnessCurve(values=normalised, dims=("n_edges",), labels=(tuple(str(n) for n in ns),),
                             method="faithfulness_curve",
                             info=dict(metric=gm.name, ablation=patcher.ablation.value, normalised=True),
                             n_edges=tuple(int(n) for n in ns))


def roc(
    scores: Circuit | LabelledResult | Float[Tensor, "..."] | Sequence[Circuit | LabelledResult],
    truth: Circuit | Bool[Tensor, "n_src n_dst"],
    valid: Bool[Tensor, "n_src n_dst"] | None = None,
    *,
    by_abs: bool = True,
    level: str = "edge",
) -> Roc:
    """ROC of a method against the ground-truth circuit `truth`, over edges or nodes (`level`).

    `scores` is either a score table (an EAP/ACDC result, a Circuit or a [n_src, n_dst] tensor; at node level
    also a node-patching result or a [n_src] tensor of node scores): edges (nodes) are ranked by |score|
    (nan lowest; a node's score from edges is its largest |score|), and the AUC is the probability that a
    true one outranks a false one, ties counting ½. Or a sweep: a list of circuits (ACDC results at several
    thresholds, say), each one point (FPR, TPR) of what it kept, as in the ACDC paper; their thresholds
    (attribute `threshold`) must be distinct and not nan. The sweep's AUC is the area under the step curve
    through the points on its upper-left frontier, with (0, 0) and (1, 1) added: a point contributes only
    from its own FPR on (no interpolation between thresholds that were not run).
    Nodes are components (embeddings, heads, MLPs; graph source order); a circuit uses a node when a member
    edge leaves it or enters one of its inputs (`circuits.graph.known.circuit_nodes`).
    Edge scores must be finite on every valid edge, except ACDC's nan for an edge it never tested (ranked
    lowest); anything else non-finite is refused.
    Example: `roc(eap_result, truth).auc`, `roc([acdc(m, t, threshold=x) for x in (0.1, 0.01)], truth).auc`
    """
    if level not in ("edge", "node"):
        raise ValueError(f"level must be 'edge' or 'node', got {level!r}")
    if isinstance(truth, Circuit):
        valid = truth.graph.valid if valid is None else valid
        truth_circuit: Circuit | None = truth
        truth = truth.members
    else:
        truth_circuit = None
    if valid is None:
        valid = torch.ones_like(truth)
    if level == "node":
        if truth_circuit is None:
            raise ValueError("truth: node-level ROC needs the truth as a Circuit (its graph names the nodes)")
        truth_nodes = circuit_nodes(truth_circuit)
    if isinstance(scores, (list, tuple)):
        circuits = [_circuit_of(c) for c in scores]
        if level == "node":
            return _sweep_roc([circuit_nodes(c) for c in circuits], truth_nodes, None, circuits)
        return _sweep_roc([c.members.cpu() for c in circuits], truth.cpu(), valid.cpu(), circuits)
    table = _table_of(scores)
    if table.ndim == 2 and table.shape == truth.shape:
        _check_ranked(table, valid, scores)
    if level == "node":
        if table.ndim == 2:
            table = _node_scores(table, truth_circuit.graph, by_abs)
        if tuple(table.shape) != tuple(truth_nodes.shape):
            raise ValueError(f"scores: expected {tuple(truth_nodes.shape)} node scores, got {tuple(table.shape)}")
        return _ranking_roc(table, truth_nodes, torch.ones_like(truth_nodes), by_abs, "node")
    if table.shape != truth.shape:
        raise ValueError(f"scores and truth: shapes differ, {tuple(table.shape)} vs {tuple(truth.shape)}")
    return _ranking_roc(table, truth, valid, by_abs, "edge")


def _table_of(scores: Circuit | LabelledResult | Tensor) -> Tensor:
    if isinstance(scores, LabelledResult) and getattr(scores, "circuit", None) is not None:
        return scores.circuit.scores
    if isinstance(scores, Circuit):
        return scores.scores
    if isinstance(scores, LabelledResult):
        return scores.values
    if isinstance(scores, Tensor):
        return scores
    raise ValueError("scores: expected a result, a Circuit, a tensor or a list of circuits, "
                     f"got {type(scores).__name__}")


def _circuit_of(c: Circuit | LabelledResult) -> Circuit:
    circuit = getattr(c, "circuit", None) if isinstance(c, LabelledResult) else c
    if not isinstance(circuit, Circuit):
        raise ValueError(f"scores: a sweep is a list of Circuits or results with a `circuit`, got {type(c).__name__}")
    return circuit


def _node_scores(table: Float[Tensor, "n_src n_dst"], graph: ComputeGraph, by_abs: bool) -> Float[Tensor, " n_src"]:
    """Each component's score: the largest (|·|) score of the edges leaving it or entering its inputs (nan if none
    is scored)."""
    s = (table.abs() if by_abs else table).double().cpu()
    s = torch.nan_to_num(s, nan=-float("inf")).masked_fill(~graph.valid, -float("inf"))
    node = s.amax(1)
    for d in range(graph.n_destinations):
        src = graph.source_index_of_destination(d)
        if src is not None:
            node[src] = torch.maximum(node[src], s[:, d].max())
    return node.masked_fill(node == -float("inf"), float("nan"))


def _ranking_roc(table: Tensor, truth: Tensor, valid: Tensor, by_abs: bool, level: str) -> Roc:
    s = table.abs() if by_abs else table
    s = torch.nan_to_num(s.double().cpu(), nan=-float("inf"))[valid.cpu()]
    t = truth.cpu()[valid.cpu()]
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"truth: needs at least one {level} in and one {level} out of the circuit")
    thresholds = torch.unique(s, sorted=True).flip(0)
    tpr = torch.stack([((s >= th) & t).sum() / n_pos for th in thresholds]).double()
    fpr = torch.stack([((s >= th) & ~t).sum() / n_neg for th in thresholds]).double()
    zero = torch.zeros(1, dtype=torch.float64)
    greater = (s[t][:, None] > s[~t][None, :]).double()
    ties = (s[t][:, None] == s[~t][None, :]).double()
    auc = float((greater + 0.5 * ties).mean())
    return Roc(torch.cat([zero, fpr]), torch.cat([zero, tpr]), auc, level)


def _sweep_roc(found: list[Tensor], truth: Tensor, valid: Tensor | None, circuits: list[Circuit]) -> Roc:
    """One (FPR, TPR) point per circuit of a sweep, and the area under the step frontier through them."""
    if not found:
        raise ValueError("scores: an empty sweep")
    thresholds = torch.tensor([float(c.attrs.get("threshold", float("nan"))) for c in circuits], dtype=torch.float64)
    if thresholds.isnan().any():
        raise ValueError("scores: every circuit of a sweep needs a threshold that is not nan (attribute `threshold`)")
    if len(torch.unique(thresholds)) != len(thresholds):
        raise ValueError(f"scores: the sweep's thresholds must be distinct (ties), got {thresholds.tolist()}")
    level = "edge" if valid is not None else "node"
    valid = torch.ones_like(truth) if valid is None else valid
    t = truth[valid]
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"truth: needs at least one {level} in and one {level} out of the circuit")
    tpr = torch.tensor([float((f[valid] & t).sum()) / n_pos for f in found], dtype=torch.float64)
    fpr = torch.tensor([float((f[valid] & ~t).sum()) / n_neg for f in found], dtype=torch.float64)
    return Roc(fpr, tpr, step_auc(fpr, tpr), level, thresholds)


def step_auc(fpr: Float[Tensor, " k"], tpr: Float[Tensor, " k"]) -> float:
    """The area under the step curve through ROC points, with (0, 0) and (1, 1) added: at each FPR x the curve
    is the best TPR of any point with FPR <= x (the upper-left frontier), so a point counts from its own FPR
    on. Example: `step_auc(torch.tensor([0.0]), torch.tensor([1.0])) == 1.0`"""
    x = torch.cat([fpr.double().cpu(), torch.tensor([0.0, 1.0], dtype=torch.float64)])
    y = torch.cat([tpr.double().cpu(), torch.tensor([0.0, 1.0], dtype=torch.float64)])
    edges = torch.unique(x, sorted=True)
    best = torch.stack([y[x <= e].max() for e in edges])
    widths = torch.diff(torch.cat([edges, torch.tensor([1.0], dtype=torch.float64)]))
    return float((best * widths).sum())


def _check_ranked(table: Tensor, valid: Tensor, scores: object) -> None:
    """Refuse NaN or infinite scores on edges: a ranking of them would be arbitrary. ACDC's scores are NaN where
    an edge was never tested (its destination was already cut off): there NaN means "lowest" and is allowed."""
    attrs = getattr(getattr(scores, "circuit", scores), "attrs", {})
    if getattr(scores, "method", None) == "acdc" or attrs.get("method") == "acdc":
        table = torch.nan_to_num(table, nan=0.0)
    check_scores(table, valid.to(table.device), "scores")


def as_circuit(circuit: Circuit | nx.DiGraph, graph: ComputeGraph, model_description: str) -> Circuit:
    """A Circuit over `graph`, from a Circuit or a DiGraph; ValueError if it was made for another model."""
    if isinstance(circuit, nx.DiGraph):
        made_for = circuit.graph.get("model")
        _check_same_structure(circuit.graph.get("n_layers"), circuit.graph.get("n_heads"), graph, made_for,
                              model_description)
        c = Circuit.from_networkx(circuit, graph)
    elif isinstance(circuit, Circuit):
        _check_same_structure(circuit.graph.n_layers, circuit.graph.n_heads, graph, circuit.attrs.get("model"),
                              model_description)
        if not circuit.graph.same_structure(graph):
            raise ValueError("circuit: its graph has MLP nodes where the model has none (or the reverse)")
        c = circuit
    else:
        raise ValueError(f"circuit: expected a Circuit or a networkx DiGraph, got {type(circuit).__name__}")
    return c


def _check_same_structure(n_layers: object, n_heads: object, graph: ComputeGraph, made_for: object,
                          model_description: str) -> None:
    if (n_layers, n_heads) != (graph.n_layers, graph.n_heads):
        raise ValueError(f"circuit: made for a model with {n_layers} layers × {n_heads} heads ({made_for}); "
                         f"this model has {graph.n_layers} × {graph.n_heads} ({model_description})")
    if made_for is not None and made_for != model_description:
        raise ValueError(f"circuit: made for another model ({made_for}); this model is {model_description}")


def _score_table(scores: Circuit | LabelledResult | Tensor, graph: ComputeGraph, description: str) -> Tensor:
    if isinstance(scores, LabelledResult):
        c = getattr(scores, "circuit", None)
        if c is None:
            raise ValueError("scores: expected a result with a `circuit` (EAP or ACDC), a Circuit or a tensor")
        scores = c
    if isinstance(scores, Circuit):
        return as_circuit(scores, graph, description).scores
    if tuple(scores.shape) != tuple(graph.valid.shape):
        raise ValueError(f"scores: expected shape {tuple(graph.valid.shape)}, got {tuple(scores.shape)}")
    return scores.detach().cpu()


def _ablation_of(circuit: Circuit | nx.DiGraph, ablation: Ablation | str | None) -> Ablation | str:
    if ablation is not None:
        return ablation
    attrs = circuit.graph if isinstance(circuit, nx.DiGraph) else getattr(circuit, "attrs", {})
    return attrs.get("ablation", Ablation.RESAMPLE)

"""ACDC (Conmy et al., 2023): prune edges from the logits back to the embeddings while the metric holds.

The plain algorithm: start from every edge; visit the destinations from the logits back to the first
layer (reverse graph order: logits, then each layer's MLP input, v, k and q inputs, heads from last to
first); for each incoming edge in turn (latest source first, or earliest with `order="earliest_first"`)
remove it if the loss rises by less than `threshold` over the current circuit's loss, and keep it
otherwise. A head or MLP whose output has no kept edge left cannot affect the output: its incoming edges
are dropped without a forward (as ACDC does). Every test costs one forward of the whole model.

`mode="exact"` makes the same decisions with far less work:
- candidates for one destination differ from the current circuit only in that destination's column, so
  only that node and what it reaches along kept edges is recomputed (`EdgePatcher.evaluate_column`); the
  prefix below it is the shared clean run, and the last layer is computed at the metric positions only;
- decisions are sequential, so a batch of candidates is built from guessed decisions (first round: as
  the last destination of the same kind went, else remove; later rounds: remove iff its removal along the
  last round's guessed path stayed under threshold) and checked in order: every candidate up to the
  first wrong guess tested exactly the circuit the plain algorithm tests, so its decision is the plain
  algorithm's; the batch resumes after it.
- an edge whose source equals its ablated value wherever the destination reads it (for resample ablation
  the positional embedding, and at the metric positions any token the clean and corrupted inputs share)
  changes no input: with a threshold > 0 it is removed with a score of exactly 0 and no forward.
The scores (loss increases) equal the plain algorithm's to float rounding.

`mode="batched"` tests all incoming edges of a destination against the same circuit in one forward and
removes together every edge whose removal alone stayed under threshold: faster, but blind to edges that
are only redundant one at a time (removing two such edges together can raise the loss by more).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from circuits.graph.circuit import Circuit, top_edges
from circuits.graph.incremental import (
    CircuitState,
    Evaluated,
    commit_column,
    commit_evaluated,
    evaluate_columns,
    seed_terms,
)
from circuits.graph.metric import GraphMetric, resolve_metric
from circuits.graph.nodes import ComputeGraph
from circuits.graph.patching import Ablation, EdgePatcher
from circuits.results import LabelledResult
from circuits.tasks.task import Metric, Task
from circuits.validate import check_gap, check_number, check_task


@dataclass(frozen=True, eq=False)
class ACDCResult(LabelledResult):
    """ACDC's circuit. `values` [source, destination] are the loss increases measured when each edge was
    tested (nan where it was never tested); `circuit` holds them with the kept edges; `graph` is the circuit
    as a networkx DiGraph (shared schema); `n_forwards` counts the circuits evaluated (each a forward of the
    plain algorithm, or a batch row), and `info["n_batches"]` the batched calls."""

    circuit: Circuit | None = None

    def top(self, k: int = 5, *, by_abs: bool = True) -> list[tuple[tuple[str, ...], float]]:
        """The k scored edges with the largest (absolute) scores; unscored (nan) entries are skipped."""
        return top_edges(self.values, self.circuit.graph, k, by_abs=by_abs)
    graph: nx.DiGraph | None = None
    n_forwards: int = 0
    edges: tuple[str, ...] = field(default_factory=tuple)


def acdc(
    model: TransformerBridge,
    task: Task,
    *,
    threshold: float,
    metric: str | Metric | Callable[[Tensor], Tensor] = "kl",
    ablation: Ablation | str = Ablation.RESAMPLE,
    mode: Literal["exact", "batched"] = "exact",
    order: Literal["latest_first", "earliest_first"] = "latest_first",
    progress: bool = True,
) -> ACDCResult:
    """Find a circuit by ACDC. `metric` is "kl" (KL from the clean run), a task metric ("logit_diff",
    "logprob": its decrease counts as the loss's increase), or a callable logits[batch, n, vocab] → scalar
    loss. Example: `acdc(model, induction_task(16, 8, 50), threshold=0.01).graph.edges`
    """
    check_task(model, task)
    check_number(threshold, "threshold", minimum=0)
    if mode not in ("exact", "batched"):
        raise ValueError(f"mode must be 'exact' or 'batched', got {mode!r}")
    if order not in ("latest_first", "earliest_first"):
        raise ValueError(f"order must be 'latest_first' or 'earliest_first', got {order!r}")
    patcher = EdgePatcher(model, task, ablation)
    gm = resolve_metric(task, metric, patcher.clean_logits_full)
    _check_baselines(patcher, gm)
    walk = _Walk(patcher, gm, float(threshold), order)
    # the walk runs in inference mode (less bookkeeping per operation on these small tensors); what it
    # returns is copied out of it, so the result holds ordinary tensors
    with torch.inference_mode():
        for d in tqdm(walk.destination_order(), desc=f"ACDC ({mode})", disable=not progress):
            if walk.skip_unused(d):
                continue
            if mode == "exact":
                walk.exact_destination(d)
            else:
                walk.batched_destination(d)
    members = prune_dead_ends(walk.state.mask.clone(), patcher.graph)
    attrs = dict(model=patcher.weights.description, method="acdc", metric=gm.name, ablation=patcher.ablation.value,
                 threshold=float(threshold), mode=mode)
    circuit = Circuit(patcher.graph, walk.scores, members.cpu(), attrs)
    g = patcher.graph
    return ACDCResult(
        values=walk.scores, dims=("source", "destination"), labels=(g.source_names, g.destination_names),
        method="acdc",
        info=dict(threshold=float(threshold), metric=gm.name, ablation=patcher.ablation.value, mode=mode,
                  order=order, n_batches=walk.n_batches, loss=walk.loss,
                  n_edges=int(members.sum()), n_edges_total=g.n_edges),
        circuit=circuit, graph=circuit.to_networkx(), n_forwards=walk.n_forwards,
        edges=tuple(circuit.edge_names()),
    )


def _check_baselines(patcher: EdgePatcher, metric: GraphMetric) -> None:
    """Refuse a task on which the full model and the fully ablated one score the same (every edge would go) or
    on which the metric is not finite."""
    valid = patcher.graph.valid.to(patcher.device)
    full, ablated = metric.loss(patcher.run(torch.stack([valid, torch.zeros_like(valid)]))).tolist()
    check_gap(full, ablated, name="task (full vs every edge ablated)", raise_on_zero=True)


class _Walk:
    """ACDC's running state: the circuit, its run, its loss, the scores and the cost so far."""

    def __init__(self, patcher: EdgePatcher, metric: GraphMetric, threshold: float, order: str):
        self.patcher, self.metric, self.threshold, self.order = patcher, metric, threshold, order
        self.graph = patcher.graph
        self.state: CircuitState = clean_state(patcher)
        self.loss = float(metric.loss(self.state.logits[None])[0])
        self.scores = torch.full(self.graph.valid.shape, math.nan)
        self.n_forwards, self.n_batches = 1, 1
        # (layer, kind) -> {source: removed} of the last destination of that kind decided, the first guesses
        # for the next one (a layer's heads tend to keep the same inputs)
        self.decided: dict[tuple[int, str], dict[int, bool]] = {}

    def kind(self, d: int) -> tuple[int, str]:
        node = self.graph.destinations[d]
        return node.layer, node.qkv or node.kind.value

    def destination_order(self) -> list[int]:
        return list(range(self.graph.n_destinations - 1, -1, -1))

    def incoming(self, d: int) -> list[int]:
        sources = torch.nonzero(self.state.mask[:, d]).flatten().tolist()
        return sources[::-1] if self.order == "latest_first" else sources

    def skip_unused(self, d: int) -> bool:
        """Drop the incoming edges of a destination whose node no longer reaches the output; True if dropped."""
        node = self.graph.source_index_of_destination(d)
        if node is None or self.state.mask[node].any():
            return False
        if self.state.mask[:, d].any():  # the run cannot change: only edges into an unused node go
            mask = self.state.mask.clone()
            mask[:, d] = False
            self.state = self.state.with_mask(mask)
        return True

    def _losses(self, d: int, columns: Bool[Tensor, "k n_src"]) -> tuple[list[float], list[tuple[Evaluated, int]]]:
        """The loss of each candidate column, and where each was evaluated (its batch and row in it)."""
        out, where = [], []
        for chunk in columns.split(self.patcher.chunk_size()):
            evaluated = evaluate_columns(self.patcher, self.state, d, chunk)
            out += self.metric.loss(evaluated.logits).tolist()
            where += [(evaluated, i) for i in range(chunk.shape[0])]
            self.n_batches += 1
        self.n_forwards += columns.shape[0]
        return out, where

    def exact_destination(self, d: int) -> None:
        """The plain algorithm's decisions for destination d, checked in speculative batches.

        A round builds the circuits the plain algorithm would test if each decision went as guessed and
        evaluates them together; decisions are then made in order with the plain algorithm's rule, and every
        one up to the first wrong guess is the plain algorithm's own. Guesses: in the first round, the
        decision made for the same source at the last destination of the same kind (a layer's q, k or v
        inputs), else remove (ACDC circuits are sparse); then the decision implied by each edge's marginal
        loss rise along the last round's guessed path. The circuit after the last removal was itself a
        candidate: the new state is taken from its evaluation, with no further forward.
        """
        column = self.state.mask[:, d].clone()
        prior = self.decided.get(self.kind(d), {})
        decided = self.decided[self.kind(d)] = {}  # every incoming edge is decided before the loop ends
        remaining = self._remove_inert(d, column, decided)
        guesses = [prior.get(s, True) for s in remaining]
        last_removal: tuple[Evaluated, int] | None = None
        while remaining:
            candidates, trial = [], column.clone()
            for s, guess in zip(remaining, guesses):
                candidate = trial.clone()
                candidate[s] = False
                candidates.append(candidate)
                if guess:
                    trial = candidate
            losses, where = self._losses(d, torch.stack(candidates))
            marginal, path_loss = [], self.loss
            for guess, loss in zip(guesses, losses):
                marginal.append(loss - path_loss)
                if guess:
                    path_loss = loss
            consumed = len(remaining)
            for i, (s, guess, loss) in enumerate(zip(remaining, guesses, losses)):
                increase = loss - self.loss
                self.scores[s, d] = increase
                remove = increase < self.threshold
                decided[s] = remove
                if remove:
                    column[s] = False
                    self.loss = loss
                    last_removal = where[i]
                if remove != guess:
                    consumed = i + 1
                    break
            remaining = remaining[consumed:]
            guesses = [m < self.threshold for m in marginal[consumed:]]
        if last_removal is not None:
            evaluated, i = last_removal
            if not torch.equal(evaluated.columns[i].cpu(), column.cpu()):
                raise AssertionError("the last removal's candidate is the final column")
            self.state = commit_evaluated(self.patcher, self.state, evaluated, i, in_place=True)
        else:
            self._set_column_without_forward(d, column)

    def _remove_inert(self, d: int, column: Bool[Tensor, " n_src"], decided: dict[int, bool]) -> list[int]:
        """Remove the incoming edges of d whose source equals its ablated value wherever d reads it (for
        resample ablation, the positional embedding; in the last layer's queries and the logits, which read
        the metric positions only, any source the clean and corrupted inputs share there): their removal
        leaves every input unchanged, so the loss rises by exactly 0, which is below any threshold > 0,
        whatever else is removed. (The plain algorithm measures float rounding for them: ~1e-7.) With
        threshold 0 they are tested like the rest. Returns the other incoming sources, in order."""
        remaining = self.incoming(d)
        if self.threshold <= 0:
            return remaining
        inert = seed_terms(self.patcher, self.state, d).inert  # source − ablated exactly 0 where d reads it
        others = []
        for s in remaining:
            if inert[s]:
                self.scores[s, d] = 0.0
                column[s] = False
                decided[s] = True
            else:
                others.append(s)
        return others

    def _set_column_without_forward(self, d: int, column: Bool[Tensor, " n_src"]) -> None:
        """Set column d where the run cannot change (only inert edges were removed)."""
        if not torch.equal(column, self.state.mask[:, d]):
            mask = self.state.mask.clone()
            mask[:, d] = column
            self.state = self.state.with_mask(mask)

    def batched_destination(self, d: int) -> None:
        """Test every incoming edge of d alone against the current circuit; remove all that stay under threshold."""
        column = self.state.mask[:, d].clone()
        remaining = self._remove_inert(d, column, {})
        if not remaining:
            self._set_column_without_forward(d, column)
            return
        candidates = []
        for s in remaining:
            candidate = column.clone()
            candidate[s] = False
            candidates.append(candidate)
        losses, _ = self._losses(d, torch.stack(candidates))
        for s, loss in zip(remaining, losses):
            increase = loss - self.loss
            self.scores[s, d] = increase
            if increase < self.threshold:
                column[s] = False
        if self._commit_column(d, column):
            self.loss = float(self.metric.loss(self.state.logits[None])[0])

    def _commit_column(self, d: int, column: Bool[Tensor, " n_src"]) -> bool:
        if torch.equal(column, self.state.mask[:, d]):
            return False
        self.state = commit_column(self.patcher, self.state, d, column)
        self.n_forwards += 1
        self.n_batches += 1
        return True


def clean_state(patcher: EdgePatcher) -> CircuitState:
    """The state of the full circuit: the patcher's clean run (copied, since ACDC updates its state in place)."""
    sources, inputs = patcher.clean_sources.clone(), patcher.clean_inputs()
    pos = patcher.positions
    return CircuitState(patcher.graph.valid.to(patcher.device).clone(), sources, inputs, patcher.clean_logits,
                        sources[..., pos, :], inputs[..., pos, :])


def prune_dead_ends(mask: Bool[Tensor, "n_src n_dst"], graph: ComputeGraph) -> Bool[Tensor, "n_src n_dst"]:
    """Remove the edges into heads and MLPs whose output has no kept edge (repeatedly): they cannot change the
    logits. Heads that keep an output edge but lost every input stay (their output from ablated inputs is
    part of what ACDC measured)."""
    mask = mask.clone()
    node_of = [graph.source_index_of_destination(d) for d in range(graph.n_destinations)]
    changed = True
    while changed:
        changed = False
        for d, node in enumerate(node_of):
            if node is not None and not mask[node].any() and mask[:, d].any():
                mask[:, d] = False
                changed = True
    return mask

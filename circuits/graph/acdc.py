"""ACDC (Conmy et al., 2023): prune edges from the logits back to the embeddings while the metric holds.

The plain algorithm: start from every edge; visit the destinations from the logits back to the first
layer (reverse graph order: logits, then each layer's MLP input, v, k and q inputs, heads from last to
first); for each incoming edge in turn (latest source first, or earliest with `order="earliest_first"`)
remove it if the loss rises by less than `threshold` over the current circuit's loss, and keep it
otherwise. A head or MLP whose output has no kept edge left cannot affect the output: its incoming edges
are dropped without a forward (as ACDC does). Every test costs one forward of the whole model.

The walk makes the same decisions with far less work:
- candidates for one destination differ from the current circuit only in that destination's column, so
  only that node and what it reaches along kept edges is recomputed (`circuits.graph.incremental.evaluate_columns`); the
  prefix below it is the shared clean run, and the last layer is computed at the metric positions only;
- decisions are sequential, so a batch of candidates is built from guessed decisions (first round: as
  the last destination of the same kind went, else remove; later rounds: remove iff its removal along the
  last round's guessed path stayed under threshold) and checked in order: every candidate up to the
  first wrong guess tested exactly the circuit the plain algorithm tests, so its decision is the plain
  algorithm's; the batch resumes after it. The candidates are evaluated a chunk at a time (sized by the
  nodes they reach, or `chunk_size`) and decided after each chunk, so memory is bounded by one chunk,
  not by the number of candidates, and no chunk past a wrong guess is evaluated;
- a run can be checkpointed after each destination and resumed (`checkpoint=`, `circuits.graph.acdc_checkpoint`);
- an edge whose source equals its ablated value wherever the destination reads it (for resample ablation
  the positional embedding, and at the metric positions any token the clean and corrupted inputs share)
  changes no input: with a threshold > 0 it is removed with a score of exactly 0 and no forward.
The scores equal the plain algorithm's to float rounding. Each is the metric's change when the edge was
tested, metric(circuit without it) − metric(circuit with it), the sign every method reports
(docs/conventions.md): for logit_diff or logprob an edge the behaviour needs scores below 0, for KL above 0.
The loss ACDC keeps under its threshold is the metric oriented so that lower is better (KL itself, or minus
logit_diff/logprob/a custom metric).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from circuits.allocator import heap_reuse
from circuits.graph.acdc_checkpoint import (
    decode_mask,
    decode_values,
    encode_mask,
    encode_values,
    read_checkpoint,
    run_description,
    write_checkpoint,
)
from circuits.graph.circuit import Circuit
from circuits.graph.incremental import (
    CircuitState,
    Evaluated,
    candidate_floats,
    circuit_state,
    clean_state,
    commit_evaluated,
    evaluate_columns,
    seed_terms,
)
from circuits.graph.metric import GraphMetric, resolve_metric
from circuits.graph.nodes import ComputeGraph, NodeKind
from circuits.graph.patching import Ablation, EdgePatcher
from circuits.graph.result import EdgeResult
from circuits.tasks.metrics import MetricSpec
from circuits.tasks.task import Task
from circuits.validate import check_count, check_gap, check_number, check_task

CANDIDATE_BUDGET_FLOATS = 2**26
"""The default bound on one chunk of candidates' recomputed nodes, in floats (256 MiB in float32)."""


@dataclass(frozen=True, eq=False)
class ACDCResult(EdgeResult):
    """ACDC's circuit, with the edge-result interface (`EdgeResult`: `.circuit`, `.graph`, `.edges`, `.top`,
    `.top_n`, `.to_networkx`). `values` [source, destination] are the metric's changes measured when each edge
    was tested (nan where it was never tested); `circuit` holds the kept edges with those scores; `n_forwards`
    counts the circuits evaluated (each a forward of the plain algorithm, or a batch row), and
    `info["n_batches"]` the batched calls; `info["resumed_after"]` the destinations read from a checkpoint
    (0 for a fresh run)."""

    n_forwards: int = 0


def acdc(
    model: TransformerBridge,
    task: Task,
    *,
    threshold: float,
    metric: MetricSpec = None,
    ablation: Ablation | str = Ablation.RESAMPLE,
    order: Literal["latest_first", "earliest_first"] = "latest_first",
    chunk_size: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ACDCResult:
    """Find a circuit by ACDC: remove each edge whose removal raises the loss by less than `threshold`.

    `metric` follows the one contract (`circuits.tasks.metrics`): the task's (None), "logit_diff", "logprob",
    "kl" (KL from the clean run), or a callable of the logits at the metric positions [batch, n, vocab] →
    scalar, higher meaning more of the behaviour. The loss is KL itself, or minus any other metric, so
    `threshold` is in the metric's units. Scores: the metric's change when each edge was tested.

    Memory: a destination's candidates are evaluated `chunk_size` at a time, each chunk's recomputed nodes
    dropped once its losses are read (only the last removal's run is kept, for the commit), so the peak is
    about the circuit's run plus one chunk of candidates. The default (None) sizes each chunk by the nodes its
    candidates reach, within `CANDIDATE_BUDGET_FLOATS`; `chunk_size=1` is the smallest footprint. It changes
    the cost, never a decision.

    `checkpoint`: a file where the walk's state is written (atomically) after each destination it evaluates. If
    the file exists and describes this same run (weights, task, metric, ablation, threshold, order), the walk
    resumes after the last destination it records, recomputing none before it; a file from another run is
    refused with an error. The resumed circuit's run is recomputed from its mask by one patched forward, equal
    to the uninterrupted run's to float rounding (as exact ACDC is to the plain algorithm). `chunk_size` may
    differ between the runs (e.g. smaller after running out of memory).
    Example: `acdc(model, induction_task(16, 8, 50), threshold=0.01, metric="kl").edges`
    """
    check_task(model, task)
    check_number(threshold, "threshold", minimum=0)
    if order not in ("latest_first", "earliest_first"):
        raise ValueError(f"order must be 'latest_first' or 'earliest_first', got {order!r}")
    if chunk_size is not None:
        check_count(chunk_size, "chunk_size", minimum=1)
    patcher = EdgePatcher(model, task, ablation)
    gm = resolve_metric(task, metric, patcher.clean_logits_full)
    _check_baselines(patcher, gm)
    # a metric that reads few vocabulary columns (the logit difference) has only those computed by the walk
    patcher.logit_columns = None if gm.columns is None else gm.columns.to(patcher.device)
    description = saved = None
    if checkpoint is not None:
        description = run_description(model, task, metric=gm.name, ablation=patcher.ablation.value,
                                      threshold=float(threshold), order=order,
                                      graph=[patcher.graph.n_sources, patcher.graph.n_destinations])
        saved = read_checkpoint(checkpoint, description)
    # a resumed walk starts from the checkpoint's circuit, never also holding the full circuit's run
    state = None if saved is None else circuit_state(patcher, _saved_mask(saved, patcher.graph).to(patcher.device))
    walk = _Walk(patcher, gm.restricted(), float(threshold), order, chunk_size, state)
    destinations = walk.destination_order()
    # the walk runs in inference mode (less bookkeeping per operation on these small tensors); what it
    # returns is copied out of it, so the result holds ordinary tensors. Its chunks of candidates are large
    # blocks allocated and freed over and over: `heap_reuse` keeps their memory instead of faulting it anew.
    with torch.inference_mode(), heap_reuse():
        done = walk.restore(saved) if saved is not None else 0
        bar = tqdm(destinations, desc="ACDC", disable=not progress, initial=done)
        for i in range(done, len(destinations)):
            bar.update(1)
            if walk.skip_unused(destinations[i]):
                continue
            walk.exact_destination(destinations[i])
            if checkpoint is not None:
                write_checkpoint(checkpoint, description, walk.snapshot(i + 1))
        bar.close()
        if checkpoint is not None and done < len(destinations):
            write_checkpoint(checkpoint, description, walk.snapshot(len(destinations)))
    members = prune_dead_ends(walk.state.mask.clone(), patcher.graph)
    attrs = dict(model=patcher.weights.description, method="acdc", metric=gm.name, ablation=patcher.ablation.value,
                 threshold=float(threshold))
    scores = walk.metric_changes()
    circuit = Circuit(patcher.graph, scores, members.cpu(), attrs)
    g = patcher.graph
    return ACDCResult(
        values=scores, dims=("source", "destination"), labels=(g.source_names, g.destination_names),
        method="acdc",
        info=dict(threshold=float(threshold), metric=gm.name, ablation=patcher.ablation.value,
                  order=order, n_batches=walk.n_batches, loss=walk.loss, resumed_after=done,
                  n_edges=int(members.sum()), n_edges_total=g.n_edges),
        circuit=circuit, n_forwards=walk.n_forwards,
    )


def _saved_mask(saved: dict, graph: ComputeGraph) -> Bool[Tensor, "n_src n_dst"]:
    """The circuit a checkpoint records, checked against this graph's shape."""
    mask = decode_mask(saved["mask"])
    if mask.shape != graph.valid.shape:
        raise ValueError(f"checkpoint: its mask is {tuple(mask.shape)}, this graph's {tuple(graph.valid.shape)}")
    return mask


def _check_baselines(patcher: EdgePatcher, metric: GraphMetric) -> None:
    """Refuse a task on which the full model and the fully ablated one score the same (every edge would go) or
    on which the metric is not finite."""
    valid = patcher.graph.valid.to(patcher.device)
    full, ablated = metric.loss(patcher.run(torch.stack([valid, torch.zeros_like(valid)]))).tolist()
    check_gap(full, ablated, name="task (full vs every edge ablated)", raise_on_zero=True)


class _Walk:
    """ACDC's running state: the circuit, its run, its loss, the scores and the cost so far."""

    def __init__(self, patcher: EdgePatcher, metric: GraphMetric, threshold: float, order: str,
                 chunk_size: int | None = None, state: CircuitState | None = None):
        """`state`: the circuit to start from (default: the full circuit, the patcher's clean run)."""
        self.patcher, self.metric, self.threshold, self.order = patcher, metric, threshold, order
        self.chunk_size = chunk_size
        self.graph = patcher.graph
        self.state: CircuitState = clean_state(patcher) if state is None else state
        self.loss = float(metric.loss(self.state.logits[None])[0])
        self.scores = torch.full(self.graph.valid.shape, math.nan)
        self.n_forwards, self.n_batches = 1, 1
        # kind -> {source: removed} of the last destination of that kind decided, the first guesses for the
        # next one (a layer's heads tend to keep the same inputs; an MLP, what the MLP above it kept)
        self.decided: dict[tuple[int | None, str], dict[int, bool]] = {}

    def metric_changes(self) -> Tensor:
        """The scores as the metric's own change (the walk records loss increases)."""
        return self.scores if not self.metric.higher_is_better else 0.0 - self.scores  # 0.0 - 0.0 is +0.0

    def kind(self, d: int) -> tuple[int | None, str]:
        """Which destinations share first guesses: a layer's q, k or v inputs; every MLP (the sources below an
        MLP are also below the one above it, which is decided first); the logits."""
        node = self.graph.destinations[d]
        if node.kind is NodeKind.MLP:
            return None, node.kind.value
        return node.layer, node.qkv or node.kind.value

    def destination_order(self) -> list[int]:
        return list(range(self.graph.n_destinations - 1, -1, -1))

    def incoming(self, d: int) -> list[int]:
        sources = torch.nonzero(self.state.mask[:, d]).flatten().tolist()
        return sources[::-1] if self.order == "latest_first" else sources

    def skip_unused(self, d: int) -> bool:
        """Drop the incoming edges of a destination whose node no longer reaches the output; True if dropped."""
        nodes = self.graph.sources_of_destination(d)
        if not nodes or self.state.mask[nodes].any():
            return False
        if self.state.mask[:, d].any():  # the run cannot change: only edges into an unused node go
            mask = self.state.mask.clone()
            mask[:, d] = False
            self.state = self.state.with_mask(mask)
        return True

    def snapshot(self, done: int) -> dict:
        """The walk's state after `done` destinations of `destination_order()`, for a checkpoint."""
        return dict(done=done, mask=encode_mask(self.state.mask), scores=encode_values(self.scores),
                    loss=self.loss, n_forwards=self.n_forwards, n_batches=self.n_batches,
                    decided=[[layer, kind, [[s, r] for s, r in d.items()]]
                             for (layer, kind), d in self.decided.items()])

    def restore(self, saved: dict) -> int:
        """Continue from a checkpoint's counts, scores and guesses (the walk was made with its circuit's state,
        `circuit_state` of its mask: one patched forward, counted here); returns how many destinations it had
        done."""
        scores = decode_values(saved["scores"])
        if scores.shape != self.graph.valid.shape:
            raise ValueError(f"checkpoint: its scores are {tuple(scores.shape)}, this graph's "
                             f"{tuple(self.graph.valid.shape)}")
        self.scores = scores
        self.n_forwards, self.n_batches = int(saved["n_forwards"]), int(saved["n_batches"])
        if not torch.equal(self.state.mask, self.graph.valid.to(self.state.mask.device)):
            self.n_forwards, self.n_batches = self.n_forwards + 1, self.n_batches + 1
        self.decided = {(layer, kind): {int(s): bool(r) for s, r in d} for layer, kind, d in saved["decided"]}
        return int(saved["done"])

    def chunk_for(self, d: int) -> int:
        """How many candidates of d one call evaluates: the user's chunk size, or as many as the budget holds
        given the nodes they reach."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, CANDIDATE_BUDGET_FLOATS // candidate_floats(self.patcher, self.state.mask, d))

    def _evaluate(self, d: int, columns: Bool[Tensor, "k n_src"]) -> Evaluated:
        self.n_batches += 1
        self.n_forwards += columns.shape[0]
        return evaluate_columns(self.patcher, self.state, d, columns)

    def exact_destination(self, d: int) -> None:
        """The plain algorithm's decisions for destination d, checked in speculative batches.

        A round builds the circuits the plain algorithm would test if each decision went as guessed and
        evaluates them in order, a chunk per call; decisions are made after each chunk with the plain
        algorithm's rule, and every one up to the first wrong guess is the plain algorithm's own; the round
        ends there (later chunks are not evaluated). Guesses: in the first round, the decision made for the
        same source at the last destination of the same kind (`kind`), else remove (ACDC
        circuits are sparse); then, for the candidates the last round evaluated, the decision implied by each
        edge's marginal loss rise along that round's guessed path (the others: as the last decision went). A chunk's
        recomputed nodes are dropped once its losses are read, except the last removal's (`Evaluated.select`):
        the circuit after the last removal was itself a candidate, and the new state is taken from its
        evaluation, with no further forward.
        """
        column = self.state.mask[:, d].clone()
        prior = self.decided.get(self.kind(d), {})
        decided = self.decided[self.kind(d)] = {}  # every incoming edge is decided before the loop ends
        remaining = self._remove_inert(d, column, decided)
        guesses = [prior.get(s, True) for s in remaining]
        chunk = self.chunk_for(d)
        last_removal: Evaluated | None = None
        while remaining:
            candidates, trial = [], column.clone()
            for s, guess in zip(remaining, guesses):
                candidate = trial.clone()
                candidate[s] = False
                candidates.append(candidate)
                if guess:
                    trial = candidate
            marginal, path_loss, consumed = [], self.loss, None
            for start in range(0, len(remaining), chunk):
                evaluated = self._evaluate(d, torch.stack(candidates[start:start + chunk]))
                losses = self.metric.loss(evaluated.logits).tolist()
                for guess, loss in zip(guesses[start:], losses):
                    marginal.append(loss - path_loss)
                    if guess:
                        path_loss = loss
                removal = None
                for j, loss in enumerate(losses):
                    s, guess = remaining[start + j], guesses[start + j]
                    increase = loss - self.loss
                    self.scores[s, d] = increase
                    remove = increase < self.threshold
                    decided[s] = remove
                    if remove:
                        column[s] = False
                        self.loss = loss
                        removal = j
                    if remove != guess:
                        consumed = start + j + 1
                        break
                if removal is not None:
                    last_removal = evaluated.select(removal)
                del evaluated
                if consumed is not None:
                    break
            if consumed is None:
                consumed = len(remaining)
            # the candidates no chunk reached are guessed to go as the last decision went (a run of kept edges
            # in a dense circuit, of removed ones in a sparse circuit)
            guesses = [m < self.threshold for m in marginal[consumed:]] + [decided[remaining[consumed - 1]]] * (
                len(remaining) - len(marginal))
            remaining = remaining[consumed:]
        if last_removal is not None:
            if not torch.equal(last_removal.columns[0].cpu(), column.cpu()):
                raise AssertionError("the last removal's candidate is the final column")
            self.state = commit_evaluated(self.patcher, self.state, last_removal, 0, in_place=True)
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


def prune_dead_ends(mask: Bool[Tensor, "n_src n_dst"], graph: ComputeGraph) -> Bool[Tensor, "n_src n_dst"]:
    """Remove the edges into heads and MLPs whose output has no kept edge (repeatedly): they cannot change the
    logits. Heads that keep an output edge but lost every input stay (their output from ablated inputs is
    part of what ACDC measured)."""
    mask = mask.clone()
    nodes_of = [graph.sources_of_destination(d) for d in range(graph.n_destinations)]
    changed = True
    while changed:
        changed = False
        for d, nodes in enumerate(nodes_of):
            if nodes and not mask[nodes].any() and mask[:, d].any():
                mask[:, d] = False
                changed = True
    return mask

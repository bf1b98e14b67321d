"""Incremental edge patching: evaluate circuits that differ from a known one in one destination's edges.

ACDC tests circuits that differ from the current one only in the incoming edges of one destination d
(one column of the mask). Such a candidate changes nothing below d's layer (the shared prefix) and,
above it, only the nodes reached from d's node along the circuit's kept edges: a removed edge carries the
ablated value, which no candidate changes. `evaluate_column` recomputes exactly those nodes for k
candidates at once; the last layer is computed at the metric positions only (its outputs reach nothing
but the logits there), and so is every MLP whose kept edges lead only to destinations read there (in a
sparse circuit, the chain of MLPs that writes to the logits: `CircuitState.at_metric`). `commit_column`
applies one candidate to the state the same way.

A `CircuitState` holds one circuit's run. Every output and input is kept current at the metric positions;
at the other positions, all but those a commit computed at the metric positions only (`stale`), which no
destination of that circuit, or of one with fewer edges, reads there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.engine import rotate
from circuits.engine.primitives import affine, per_head
from circuits.graph.forward import attend_values, mlp, unembed
from circuits.graph.nodes import NodeKind
from circuits.graph.patching import EdgePatcher


@dataclass(frozen=True, eq=False)
class CircuitState:
    """One circuit's run: its mask, every source's output and destination's input (also at the metric
    positions: `sources_at`, `inputs_at`), and its logits at the metric positions. Caches filled as
    evaluations need them: `projected`, the query, key or value [1, batch, pos, d_head] each head computes
    from its current input (a head input read at the metric positions only is projected there only);
    `seed_terms`, per stage, the fixed part of its destinations' candidate inputs (see `_Propagation.seed`)."""

    mask: Bool[Tensor, "n_src n_dst"]
    sources: Float[Tensor, "n_src batch pos d_model"]
    inputs: Float[Tensor, "n_dst batch pos d_model"]
    logits: Float[Tensor, "batch n vocab"]  # only `patcher.logit_columns` where set
    sources_at: Float[Tensor, "n_src batch n d_model"]
    inputs_at: Float[Tensor, "n_dst batch n d_model"]
    projected: dict[int, Tensor] = field(default_factory=dict)
    seed_terms: dict[tuple[int, bool], SeedTerms] = field(default_factory=dict)
    stale: frozenset[int] = frozenset()  # sources whose output is current at the metric positions only

    @functools.cached_property
    def kept(self) -> list[list[bool]]:
        """The mask as nested lists (membership tests in Python, without a tensor access each)."""
        return self.mask.tolist()

    @functools.cached_property
    def _alike(self) -> dict[int, list[int]]:
        return {}

    @functools.cached_property
    def _at_metric(self) -> list[bool]:
        return []

    def at_metric(self, patcher: EdgePatcher, dst: int) -> bool:
        """True where destination dst is read at the metric positions only in this circuit: those the model's
        shape fixes (`EdgePatcher.at_metric_positions`), and the input of an MLP every kept edge of whose
        output goes to such a destination. Removing edges never undoes it."""
        if not self._at_metric:
            self._at_metric.extend(read_at_metric_positions(patcher, self.mask))
        return self._at_metric[dst]

    def alike(self, patcher: EdgePatcher, dst: int) -> int:
        """The first destination of dst's stage that keeps the same incoming edges and is read at the same
        positions: its input is the same (in this circuit and in any candidate that changes other columns).
        In a dense circuit a layer's head inputs are mostly alike (each is the residual stream)."""
        i = patcher.stage_of(dst)
        stage = patcher.stages[i]
        firsts = self._alike.get(i)
        if firsts is None:
            at = [[self.at_metric(patcher, d)] for d in range(stage.dst.start, stage.dst.stop)]
            key = torch.cat([self.mask[: stage.n_below, stage.dst].T.cpu(), torch.tensor(at)], dim=1)
            classes = torch.unique(key, dim=0, return_inverse=True)[1].tolist()
            first: dict[int, int] = {}
            firsts = self._alike[i] = [first.setdefault(c, stage.dst.start + j) for j, c in enumerate(classes)]
        return firsts[dst - stage.dst.start]

    def with_mask(self, mask: Bool[Tensor, "n_src n_dst"]) -> CircuitState:
        """The same run under another mask (for changes that cannot alter it, e.g. edges into unused nodes)."""
        return CircuitState(mask, self.sources, self.inputs, self.logits, self.sources_at, self.inputs_at,
                            self.projected, self.seed_terms, self.stale)


def read_at_metric_positions(patcher: EdgePatcher, mask: Bool[Tensor, "n_src n_dst"]) -> list[bool]:
    """For each destination, whether circuit `mask` reads it at the metric positions only (see
    `CircuitState.at_metric`): decided from the logits down, an MLP's input after everything its output feeds.
    Example: `read_at_metric_positions(p, p.graph.valid)[-1]` (the logits: True)"""
    at = patcher.metric_only_destinations.clone()
    mask = mask.cpu()
    for stage in reversed(patcher.stages):
        if stage.kind is NodeKind.MLP and not at[stage.dst.start]:
            at[stage.dst.start] = bool((at | ~mask[stage.out.start]).all())
    return at.tolist()


def circuit_state(patcher: EdgePatcher, mask: Bool[Tensor, "n_src n_dst"]) -> CircuitState:
    """The run of one circuit by a full patched forward (the full circuit's is the clean run, copied).
    Example: `circuit_state(p, p.graph.valid)`"""
    mask = patcher._check_masks(mask[None])[0]
    if torch.equal(mask, patcher.graph.valid.to(mask.device)):
        return clean_state(patcher)
    with torch.no_grad():
        run = patcher.forward(patcher.embed(patcher.task.clean), mask[None], keep=True)
    sources, inputs = run.sources[0], run.inputs[0]
    pos = patcher.positions
    return CircuitState(mask.clone(), sources, inputs, logits_read(patcher, run.logits[0]), sources[..., pos, :],
                        inputs[..., pos, :])


def clean_state(patcher: EdgePatcher) -> CircuitState:
    """The state of the full circuit: the patcher's clean run (copied, since ACDC updates its state in place)."""
    sources, inputs = patcher.clean_sources.clone(), patcher.clean_inputs()
    pos = patcher.positions
    return CircuitState(patcher.graph.valid.to(patcher.device).clone(), sources, inputs,
                        logits_read(patcher, patcher.clean_logits), sources[..., pos, :], inputs[..., pos, :])


def unembed_columns(patcher: EdgePatcher, resid: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead c"]:
    """The logits the evaluations read: every column, or only `patcher.logit_columns` where set."""
    w, columns = patcher.weights, patcher.logit_columns
    if columns is None:
        return unembed(w, resid)
    return affine(w.ln_final(resid), w.W_U[:, columns], w.b_U[columns])


def logits_read(patcher: EdgePatcher, logits: Float[Tensor, "*lead vocab"]) -> Float[Tensor, "*lead c"]:
    """Full logits restricted to the columns the evaluations read (`patcher.logit_columns`)."""
    return logits if patcher.logit_columns is None else logits[..., patcher.logit_columns]


def evaluate_column(
    patcher: EdgePatcher, state: CircuitState, d: int, columns: Bool[Tensor, "k n_src"]
) -> Float[Tensor, "k batch n vocab"]:
    """Logits of k circuits equal to `state.mask` except that the incoming edges of destination d are
    `columns[i]` in circuit i. Equal (to float rounding) to `patcher.run` on the full masks."""
    return evaluate_columns(patcher, state, d, columns).logits


@dataclass(frozen=True, eq=False)
class Evaluated:
    """k candidate columns for destination d evaluated against one state: their logits, and what they
    recomputed (so that any of them can become the new state without another forward, `commit_evaluated`)."""

    d: int
    columns: Bool[Tensor, "k n_src"]
    logits: Float[Tensor, "k batch n vocab"]
    propagation: _Propagation

    def select(self, i: int) -> Evaluated:
        """Candidate i alone, with its own copy of what it recomputed: what a commit needs, so that the other
        candidates' memory is freed once this evaluation is dropped. Example: `keep = evaluated.select(3)`"""
        prop = self.propagation
        kept = _Propagation(prop.p, prop.state, self.d, self.columns[i:i + 1].clone())
        copies: dict[int, Tensor] = {}  # alike destinations share one tensor: copied once

        def row(value: Tensor) -> Tensor:
            if id(value) not in copies:
                copies[id(value)] = _row(value, i)
            return copies[id(value)]

        kept.outputs = {s: (row(value), restricted) for s, (value, restricted) in prop.outputs.items()}
        kept.new_inputs = {dst: row(value) for dst, value in prop.new_inputs.items()}
        kept.new_projected = {dst: row(value) for dst, value in prop.new_projected.items()}
        return Evaluated(self.d, kept.columns, self.logits[i:i + 1].clone(), kept)


def _row(value: Tensor, i: int) -> Tensor:
    """Row i of a per-candidate tensor (one shared by every candidate has a leading axis of 1), copied."""
    return (value[i:i + 1] if value.shape[0] > 1 else value).clone()


def reached(patcher: EdgePatcher, mask: Bool[Tensor, "n_src n_dst"], d: int) -> tuple[int, int]:
    """How many destinations and sources a candidate column of d recomputes: d, its node, and what that node
    reaches along the kept edges of `mask` (the circuit's own: a removed edge carries the ablated value).
    Example: `n_dst, n_src = reached(p, state.mask, d)`"""
    g, feeds = patcher.graph, patcher.feeds
    mask = mask.to(feeds.device)
    dst = torch.zeros(g.n_destinations, dtype=torch.bool, device=feeds.device)
    src = torch.zeros(g.n_sources, dtype=torch.bool, device=feeds.device)
    dst[d] = True
    for stage in patcher.stages[patcher.stage_of(d):]:
        fed = (mask[:, stage.dst] & src[:, None]).any(0)
        dst[stage.dst] |= fed
        src |= (dst[stage.dst, None] & feeds[stage.dst]).any(0)
    return int(dst.sum()), int(src.sum())


def candidate_floats(patcher: EdgePatcher, mask: Bool[Tensor, "n_src n_dst"], d: int) -> int:
    """An upper bound on the floats one candidate column of d holds while it is evaluated: a new input for each
    destination it reaches, a new output and its change (two when read at every position and at the metric
    positions) for each source, and its logits at the metric positions."""
    n_dst, n_src = reached(patcher, mask, d)
    stream = patcher.clean_sources[0].numel()
    w = patcher.weights
    hidden = stream * w.W_in.shape[-1] // w.d_model if w.W_in is not None else 0  # an MLP's, while it runs
    logits = patcher.clean_logits.numel()
    if patcher.logit_columns is not None:  # only these columns are computed
        logits = logits // patcher.clean_logits.shape[-1] * patcher.logit_columns.numel()
    return stream * (n_dst + 3 * n_src) + hidden + logits


def evaluate_columns(
    patcher: EdgePatcher, state: CircuitState, d: int, columns: Bool[Tensor, "k n_src"]
) -> Evaluated:
    """`evaluate_column`, keeping what each candidate recomputed. Example: `e = evaluate_columns(p, s, d, cols)`"""
    columns = columns.to(patcher.device)
    with torch.no_grad():
        prop = _Propagation(patcher, state, d, columns)
        logits = prop.run()
    return Evaluated(d, columns, logits, prop)


def commit_evaluated(
    patcher: EdgePatcher, state: CircuitState, evaluated: Evaluated, i: int, *, in_place: bool = False
) -> CircuitState:
    """The state of candidate i of `evaluated` (which must have been evaluated against `state`). With
    `in_place=True` the new state reuses (and overwrites) `state`'s tensors: `state` must not be used again."""
    prop = evaluated.propagation
    if prop.state is not state:
        raise ValueError("evaluated: these candidates were evaluated against another state")
    pos = patcher.positions
    with torch.no_grad():
        if in_place:
            sources, inputs, sources_at, inputs_at = state.sources, state.inputs, state.sources_at, state.inputs_at
            projected = state.projected
        else:
            sources, inputs = state.sources.clone(), state.inputs.clone()
            sources_at, inputs_at = state.sources_at.clone(), state.inputs_at.clone()
            projected = dict(state.projected)
        for s, (value, restricted) in prop.outputs.items():
            row = value[i if value.shape[0] > 1 else 0]
            _write(sources[s], row, restricted, pos)
            sources_at[s] = row if restricted else row[..., pos, :]
        for dst, value in prop.new_inputs.items():
            row = value[i if value.shape[0] > 1 else 0]
            at = state.at_metric(patcher, dst)
            _write(inputs[dst], row, at, pos)
            inputs_at[dst] = row if at else row[..., pos, :]
            value = prop.new_projected.get(dst)
            if value is None:
                projected.pop(dst, None)
            else:
                projected[dst] = value[i:i + 1] if value.shape[0] > 1 else value
    mask = state.mask.clone()
    mask[:, evaluated.d] = evaluated.columns[i]
    # the seed terms of a stage hold its sources: kept while none of them changed
    first_changed = min(prop.outputs, default=patcher.graph.n_sources)
    seed_terms = {key: t for key, t in state.seed_terms.items() if patcher.stages[key[0]].n_below <= first_changed}
    stale = state.stale | {s for s, (_, restricted) in prop.outputs.items() if restricted}
    return CircuitState(mask, sources, inputs, evaluated.logits[i], sources_at, inputs_at, projected, seed_terms,
                        frozenset(stale))


def commit_column(
    patcher: EdgePatcher, state: CircuitState, d: int, column: Bool[Tensor, " n_src"]
) -> CircuitState:
    """The state of the circuit `state.mask` with column d set to `column`, updated incrementally."""
    return commit_evaluated(patcher, state, evaluate_columns(patcher, state, d, column[None]), 0)


@dataclass(frozen=True, eq=False)
class SeedTerms:
    """The fixed part of the inputs of a stage's destinations (read at every position, or at the metric
    positions only) in a circuit state: `base` = bias + Σ ablated sources, `difference[s]` = source s −
    its ablated value (flattened), `inert[s]`: that difference is exactly zero (removing an edge from s
    changes nothing)."""

    base: Float[Tensor, "1 flat"]
    difference: Float[Tensor, "n_below flat"]
    shape: torch.Size
    inert: list[bool]


def seed_terms(patcher: EdgePatcher, state: CircuitState, d: int) -> SeedTerms:
    """The seed terms of destination d's stage in `state`, computed once and kept on the state while the
    sources below the stage are unchanged (one stage's at a time: ACDC walks a layer's destinations in turn).
    Example: `seed_terms(p, state, d).inert` (which incoming edges of d carry nothing)"""
    i, at = patcher.stage_of(d), state.at_metric(patcher, d)
    terms = state.seed_terms.get((i, at))
    if terms is None:
        nb = patcher.stages[i].n_below
        sources = (state.sources_at if at else state.sources)[:nb]
        ablated = (patcher.ablated_at if at else patcher.ablated)[:nb]
        base = ablated.sum(0) + patcher.biases[i]
        difference = (sources - ablated).flatten(1)
        inert = (difference == 0).all(-1).tolist()
        terms = SeedTerms(base.flatten()[None], difference, base.shape, inert)
        state.seed_terms.clear()
        state.seed_terms[(i, at)] = terms
    return terms


def _stack_heads(xs: list[Tensor]) -> Tensor:
    """Stack per-head queries, keys or values [k_i, batch, pos, d_head] on a head axis (broadcasting k; one
    head's is a view: the products that read it broadcast its k)."""
    if len(xs) == 1:
        return xs[0][:, None]
    k = max(x.shape[0] for x in xs)
    return torch.stack([x.expand(k, *x.shape[1:]) for x in xs], dim=1)


def _write(target: Tensor, value: Tensor, restricted: bool, positions: Tensor) -> None:
    if restricted:
        target[..., positions, :] = value
    else:
        target.copy_(value)


class _Propagation:
    """One incremental evaluation of k candidates that differ from `state` in column d."""

    def __init__(self, patcher: EdgePatcher, state: CircuitState, d: int, columns: Tensor):
        self.p, self.state, self.d, self.columns = patcher, state, d, columns
        self.outputs: dict[int, tuple[Tensor, bool]] = {}  # source -> (new output [k, batch, P, d], restricted)
        self.new_inputs: dict[int, Tensor] = {}  # destination -> its new input [k, batch, P, d]
        self.new_projected: dict[int, Tensor] = {}  # head input -> its new query, key or value [k, batch, P, e]
        self._changes: dict[tuple[int, bool], Tensor] = {}  # (source, at metric positions) -> new − current output
        self._totals: dict[bool, tuple[Tensor, int]] = {}  # at metric positions -> (Σ changes, how many)
        self.z: dict[int, Tensor] = {}  # head source -> its new z (before W_O), where `outputs` has its output
        if state.stale and not state.at_metric(patcher, d):
            stale = sorted(s for s in state.stale if bool(columns[:, s].any()))
            if stale:
                names = ", ".join(patcher.graph.source_names[s] for s in stale)
                raise ValueError(f"columns: the edges from {names} into {patcher.graph.destination_names[d]} read "
                                 "outputs this state holds at the metric positions only (computed there when no "
                                 "kept edge read them elsewhere); evaluate against `circuit_state(patcher, mask)`")

    def run(self) -> Tensor:
        p, w = self.p, self.p.weights
        first = p.stage_of(self.d)
        for i, stage in enumerate(p.stages[first:], start=first):
            if stage.kind is NodeKind.LOGITS:
                x = self.input_of(i, stage.dst.start)
                if x is None:
                    return self.state.logits.expand(self.columns.shape[0], *self.state.logits.shape)
                logits = self.logits_through_heads(stage.dst.start, x)
                return unembed_columns(self.p, x) if logits is None else logits
            if stage.kind is NodeKind.MLP:
                x = self.input_of(i, stage.dst.start)
                if x is not None:
                    self.outputs[stage.out.start] = (mlp(w, stage.layer, x), self.at(stage.dst.start))
                continue
            self.attention(i)
        raise AssertionError("unreachable: the last stage is the logits")

    def logits_through_heads(self, dst: int, x: Float[Tensor, "k batch n d_model"]
                             ) -> Float[Tensor, "k batch n c"] | None:
        """The candidates' logits when every changed source the logits read is a head, with few enough of them:
        x · G = (current input − Σ those heads' current outputs) · G + Σ z · (W_O G) per head, G the folded
        unembedding (`EdgePatcher.folded_unembedding`), then the final norm's division by the scale of x. A
        head's change lies in its d_head output directions, so this replaces the [rows, d_model] × [d_model, c]
        product of each candidate by one of d_head per head changed, after one shared product. None where it does
        not apply (an MLP or an embedding changed, the candidates' own destination is the logits) or the k
        candidates' full products are cheaper."""
        kept, p = self.state.kept, self.p
        fed = [s for s in self.outputs if kept[s][dst]]
        if dst == self.d or not fed or any(s not in self.z for s in fed):
            return None
        norm, D = p.weights.ln_final, p.weights.d_model
        if x.shape[0] * (D - len(fed) * p.weights.W_O.shape[-2]) <= D:
            return None  # one product of the shared base plus k of d_head per head must beat k of d_model
        if norm.kind in ("RMS", "RMSPre", "LNPre") and x.dtype != torch.float32:
            return None  # those norms compute in float32 whatever the dtype
        G, constant = p.folded_unembedding()
        base = self.current_input(dst)
        for s in fed:
            base = base - self.current_output(s, True)
        acc = base @ G
        for s in fed:
            z, node = self.z[s], p.graph.sources[s]
            z = z if self.outputs[s][1] else z[..., p.positions, :]  # at the metric positions
            acc = acc + z @ p.head_unembedding(node.layer, node.head)
        return acc / norm.scale(x) + constant

    def attention(self, i: int) -> None:
        """Recompute the heads of one layer whose q, k or v input changed (under grouped-query attention every
        head of a group whose shared k or v input changed)."""
        p, stage, g = self.p, self.p.stages[i], self.p.graph
        heads, projected = [], []
        for h in range(g.n_heads):
            dsts = [g.input_index(stage.dst.start, h, j) for j in range(3)]
            xs = [self.input_of(i, dst) for dst in dsts]
            if all(x is None for x in xs):
                continue
            heads.append(h)
            kv = h // g.group_size
            projected.append([(h if j == 0 else kv, j, dst, x) for j, (dst, x) in enumerate(zip(dsts, xs))])
        if not heads:
            return
        self.project_new(stage.layer, [item for qkv in projected for item in qkv if item[3] is not None])
        projected = [[self.projection(stage.layer, *item) for item in qkv] for qkv in projected]
        q, key, v = (_stack_heads([qkv[j] for qkv in projected]) for j in range(3))
        restricted = p.at_metric_positions(stage.dst.start)  # the layer's first q input
        z = attend_values(p.weights, q, key, v, p.attention_bias(restricted))
        out = per_head(z, p.weights.W_O[stage.layer, p.head_index(heads)], z.dim() - 4)
        for j, h in enumerate(heads):
            self.outputs[stage.out.start + h] = (out[:, j], restricted)
            self.z[stage.out.start + h] = z[:, j]

    def projection(self, layer: int, h: int, which: int, dst: int, x: Tensor | None) -> Tensor:
        """Head h's query, key or value (`which` 0, 1, 2; h a key/value head for 1 and 2) from its new input x
        [k, batch, P, d] (kept for a commit), or the state's (projected once and cached) where no candidate
        changes it (x None)."""
        if x is None:
            cached = self.state.projected.get(dst)
            if cached is None:
                cached = self.state.projected[dst] = self._project(layer, h, which, dst, self.current_input(dst)[None])
            return cached
        if dst not in self.new_projected:  # a shared k or v input is projected once for its group
            self.new_projected[dst] = self._project(layer, h, which, dst, x)
        return self.new_projected[dst]

    def project_new(self, layer: int, items: list[tuple[int, int, int, Tensor]]) -> None:
        """The queries, keys and values (h, which, dst, x) from new inputs, one LayerNorm and one product per
        distinct input (alike destinations share theirs: `CircuitState.alike`), into `new_projected`."""
        groups: dict[int, list[tuple[int, int, int, Tensor]]] = {}
        for item in items:
            if item[2] not in self.new_projected:
                groups.setdefault(id(item[3]), []).append(item)
        w = self.p.weights
        for group in groups.values():
            group = list({item[2]: item for item in group}.values())  # a shared k or v input once
            if len(group) == 1:
                h, which, dst, x = group[0]
                self.new_projected[dst] = self._project(layer, h, which, dst, x)
                continue
            x = group[0][3]
            W, b = self.p.qkv_columns(layer, tuple((h, which) for h, which, _, _ in group))
            y = affine(w.ln1.at(layer)(x), W, b.flatten()).view(*x.shape[:-1], *b.shape)
            for j, (_, which, dst, _) in enumerate(group):
                self.new_projected[dst] = self._rotated(which, dst, y[..., j, :])

    def _rotated(self, which: int, dst: int, y: Tensor) -> Tensor:
        if which == 2:
            return y
        return rotate(self.p.weights.rotary, y, self.p.query_positions(self.p.at_metric_positions(dst)))

    def _project(self, layer: int, h: int, which: int, dst: int, x: Tensor) -> Tensor:
        w = self.p.weights
        W, b = w.qkv_weights(which)
        return self._rotated(which, dst, affine(w.ln1.at(layer)(x), W[layer, h], b[layer, h]))

    def at(self, dst: int) -> bool:
        """Destination dst is read at the metric positions only (in the state's circuit, which every candidate
        shares downstream of d)."""
        return self.state.at_metric(self.p, dst)

    def current_input(self, dst: int) -> Tensor:
        at = self.at(dst)
        return self.state.inputs_at[dst] if at else self.state.inputs[dst]

    def current_output(self, s: int, at: bool) -> Tensor:
        return self.state.sources_at[s] if at else self.state.sources[s]

    def input_of(self, i: int, dst: int) -> Tensor | None:
        """Destination dst's input in each candidate, or None where no candidate changes it."""
        at = self.at(dst)
        if dst in self.new_inputs:  # a shared k or v input, read by each head of its group
            return self.new_inputs[dst]
        if dst == self.d:
            x = self.seed(i, at)
        elif (first := self.state.alike(self.p, dst)) not in (dst, self.d):
            x = self.input_of(i, first)
            if x is None:
                return None
        else:
            kept = self.state.kept
            fed = [s for s in self.outputs if kept[s][dst]]
            if not fed:
                return None
            cut = [s for s in self.changed(at) if not kept[s][dst]]
            if len(cut) + 1 < len(fed):  # a dense circuit: every change but the few cut ones, as one total
                x = self.input_from_total(dst, at, cut)
            else:
                x = self.current_input(dst)
                for s in fed:
                    x = x + self.change(s, at)
        self.new_inputs[dst] = x
        return x

    def input_from_total(self, dst: int, at: bool, cut: list[int]) -> Tensor:
        """dst's new input as its current one plus the total change of the sources recomputed so far, minus the
        changes of those whose edge into dst the circuit cuts."""
        x = self.current_input(dst) + self.total_change(at)
        for s in cut:
            x = x - self.change(s, at)
        return x

    def total_change(self, at: bool) -> Tensor:
        """Σ change(s) over every source recomputed so far [k, batch, P, d]: all are upstream of the stage being
        read (a stage's inputs are formed before its outputs), so a destination fed by most of them reads this
        total minus the few it does not keep. Kept as a running sum, extended by the sources added since."""
        total, n = self._totals.get(at, (None, 0))
        changed = self.changed(at)
        for s in changed[n:]:
            c = self.change(s, at)
            if total is None:
                total = c.clone()  # owned: later changes are added into it in place
            elif total.shape == c.shape:
                total.add_(c)
            else:  # one candidate's change broadcast against k candidates', or the reverse
                total = total + c
        self._totals[at] = (total, len(changed))
        return total

    def changed(self, at: bool) -> list[int]:
        """The sources recomputed so far, in order; away from the metric positions (`at` False) those computed
        there as well (one computed at the metric positions only feeds no destination read elsewhere)."""
        return list(self.outputs) if at else [s for s, (_, restricted) in self.outputs.items() if not restricted]

    def change(self, s: int, at: bool) -> Tensor:
        """Source s's new output minus its current one [k, batch, P, d] (computed once for all its readers)."""
        key = (s, at)
        if key not in self._changes:
            value, restricted = self.outputs[s]
            if restricted and not at:
                raise AssertionError("a source computed at the metric positions feeds a destination read elsewhere")
            new = value[..., self.p.positions, :] if at and not restricted else value
            self._changes[key] = new - self.current_output(s, at)
        return self._changes[key]

    def seed(self, i: int, at: bool) -> Tensor:
        """The candidates' input of d: (bias + Σ ablated sources) + Σ kept (source − ablated), one product with
        the candidates' columns (`seed_terms`). Every term is a source-sized vector, so a destination that
        keeps few edges is not a small difference of large sums (as `input − Σ removed (source − ablated)`
        would be)."""
        terms = seed_terms(self.p, self.state, self.d)
        kept = self.columns[:, : terms.difference.shape[0]].to(terms.difference.dtype)
        return torch.addmm(terms.base, kept, terms.difference).unflatten(1, terms.shape)

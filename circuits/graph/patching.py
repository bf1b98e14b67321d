"""Edge patching: run a model with any set of edges replaced by their ablated values, many circuits at once.

A circuit is a boolean mask over (sources × destinations), True where the edge is kept. In a patched run
every destination reads

    x_d = Σ_s [ m[s, d] · out_s + (1 − m[s, d]) · abl_s ] + (output biases of the layers below)

that is, its usual input plus Σ over removed edges (abl_s − out_s), where `out_s` is the source's output
in this (patched) run and `abl_s` its ablated value: the corrupted run's output (resample), zero, or the
mean over the batch of the clean run's output at each position (mean). Every other reader of the source
is unchanged. With every edge kept this is the model's own forward; with none kept every destination reads
the ablated sources, which for resample ablation is the corrupted run.

`EdgePatcher(model, task, ablation)` holds the clean and ablated source outputs; `patcher.run(masks)`
evaluates [k, n_src, n_dst] masks in batched forwards (chunked to bound memory). `patcher.state(mask)` and
`patcher.evaluate_column(state, d, columns)` are the incremental form used by exact ACDC: candidates that
differ from a circuit only in the incoming edges of destination `d` recompute only the nodes whose input
changes, along the circuit's kept edges, and only at the metric positions in the last layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.graph.forward import NativeWeights, attend, embed, mlp, unembed
from circuits.graph.nodes import ComputeGraph, NodeKind
from circuits.tasks.task import Task

MAX_CHUNK_FLOATS = 2**26
"""Masks per batched forward are chunked so that the stacked source outputs stay under ~256 MiB (float32)."""


class Ablation(str, Enum):
    """What a removed edge carries instead of its source's output."""

    RESAMPLE = "resample"
    """The source's output on the corrupted input (an unpatched corrupted run)."""
    ZERO = "zero"
    """Zero."""
    MEAN = "mean"
    """The clean run's output averaged over the batch, at each position."""


@dataclass(frozen=True)
class _Stage:
    """One step of the forward: the destinations read at it and the sources it writes."""

    kind: NodeKind  # HEAD_INPUT (an attention layer), MLP, or LOGITS
    layer: int
    dst: slice  # destinations read at this stage
    n_below: int  # sources upstream of it (a prefix of the source order)
    out: slice  # sources it writes (empty for the logits)


@dataclass(frozen=True, eq=False)
class Run:
    """A batched patched forward: logits at the metric positions and, when kept, every source's output and
    the input of every stage (in destination order, for gradients)."""

    logits: Float[Tensor, "k batch n vocab"]
    sources: Float[Tensor, "k n_src batch pos d_model"] | None = None
    stage_inputs: tuple[Tensor, ...] | None = None

    @property
    def inputs(self) -> Float[Tensor, "k n_dst batch pos d_model"]:
        """Every destination's input (stage inputs concatenated)."""
        if self.stage_inputs is None:
            raise ValueError("inputs: this run was made with keep=False")
        return torch.cat(self.stage_inputs, dim=1)


@dataclass(frozen=True, eq=False)
class CircuitState:
    """A circuit's unbatched run: its mask, every source's output and every destination's input."""

    mask: Bool[Tensor, "n_src n_dst"]
    sources: Float[Tensor, "n_src batch pos d_model"]
    inputs: Float[Tensor, "n_dst batch pos d_model"]
    logits: Float[Tensor, "batch n vocab"]


class EdgePatcher:
    """The edge-patching engine for one model, task and ablation.

    Shapes: masks are Bool [k, n_src, n_dst] over `patcher.graph`; logits come back at the task's metric
    positions, [k, batch, n, vocab]. Example:
    `p = EdgePatcher(model, task); logits = p.run(p.graph.valid[None])  # the clean run`
    """

    def __init__(self, model: TransformerBridge, task: Task, ablation: Ablation | str = Ablation.RESAMPLE):
        self.weights = NativeWeights.of(model)
        self.graph = ComputeGraph.of(model)
        self.task = task
        self.ablation = _ablation(ablation)
        if task.seq_len > self.weights.W_pos.shape[0]:
            raise ValueError(f"task: sequences of {task.seq_len} tokens exceed the model's n_ctx "
                             f"{self.weights.W_pos.shape[0]}")
        self.device = self.weights.device
        self.positions = task.positions.to(self.device)
        self.stages = _stages(self.graph)
        self.biases = self._stage_biases()
        with torch.no_grad():
            clean = self.forward(self.embed(task.clean), None, keep=True)
            self.clean_sources = clean.sources[0]
            self.clean_inputs = clean.inputs[0]
            self.clean_logits = clean.logits[0]
            self.clean_logits_full = unembed(self.weights, self.clean_inputs[-1])
            self.ablated = self._ablated_sources(task).expand_as(self.clean_sources).contiguous()

    @property
    def n_layers(self) -> int:
        return self.graph.n_layers

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "1 2 batch pos d_model"]:
        """The embedding sources of some tokens, with a leading mask axis of 1."""
        return embed(self.weights, tokens)[None]

    def _ablated_sources(self, task: Task) -> Float[Tensor, "n_src _b pos d_model"]:
        """The value each source carries when its edge is removed (broadcast over the batch by the caller)."""
        if self.ablation is Ablation.ZERO:
            return torch.zeros_like(self.clean_sources[:, :1])
        if self.ablation is Ablation.MEAN:
            return self.clean_sources.mean(dim=1, keepdim=True)
        return self.forward(self.embed(task.corrupted), None, keep=True).sources[0]

    def _stage_biases(self) -> list[Tensor]:
        """The constant part of each stage's input: b_O (and b_out) of every layer below it."""
        w = self.weights
        total = torch.zeros_like(w.b_O[0])
        biases = []
        for stage in self.stages:
            if stage.kind is NodeKind.MLP:
                biases.append(total + w.b_O[stage.layer])
            else:
                biases.append(total.clone())
            if stage.kind is NodeKind.HEAD_INPUT:
                total = total + w.b_O[stage.layer]
            elif stage.kind is NodeKind.MLP:
                total = total + w.b_out[stage.layer]
        return biases

    def forward(
        self,
        emb: Float[Tensor, "_ke 2 batch pos d_model"],
        masks: Bool[Tensor, "_km n_src n_dst"] | None,
        *,
        keep: bool = False,
    ) -> Run:
        """One batched patched forward from the embedding sources (`masks=None`: every edge kept, no ablation).

        `emb` and `masks` broadcast along their first axis (one of them may be 1).
        """
        w = self.weights
        blocks = [emb]
        inputs = []
        for stage, bias in zip(self.stages, self.biases):
            sources = blocks[0] if len(blocks) == 1 else _cat_sources(blocks)
            x = self._stage_input(sources, stage, bias, masks)
            if keep:
                inputs.append(x)
            if stage.kind is NodeKind.HEAD_INPUT:
                H = self.graph.n_heads
                heads = torch.arange(H, device=self.device)
                all_pos = torch.arange(x.shape[-2], device=self.device)
                blocks.append(attend(w, stage.layer, heads, x[:, :H], x[:, H:2 * H], x[:, 2 * H:], all_pos))
            elif stage.kind is NodeKind.MLP:
                blocks.append(mlp(w, stage.layer, x))
            else:
                logits = unembed(w, x[:, 0][..., self.positions, :])
        sources = _cat_sources(blocks) if keep else None
        return Run(logits, sources, tuple(inputs) if keep else None)

    def _stage_input(
        self,
        sources: Float[Tensor, "_k n_below batch pos d_model"],
        stage: _Stage,
        bias: Float[Tensor, " d_model"],
        masks: Bool[Tensor, "_km n_src n_dst"] | None,
    ) -> Float[Tensor, "k n_dst_stage batch pos d_model"]:
        """x_d = bias + Σ_s m[s, d] out_s + Σ_s (1 − m[s, d]) abl_s for the stage's destinations.

        Each term is summed as it is (no `clean − Σ removed (clean − abl)`), so a destination that keeps few
        edges is not the small difference of large sums that its LayerNorm would then amplify.
        """
        n_dst = stage.dst.stop - stage.dst.start
        if masks is None:
            resid = sources.sum(1) + bias
            return resid[:, None].expand(-1, n_dst, *resid.shape[1:])
        kept = masks[:, : stage.n_below, stage.dst].to(sources.dtype).transpose(1, 2)  # [k, n_dst, n_below]
        x = kept @ sources.flatten(2) + (1 - kept) @ self.ablated[: stage.n_below].flatten(1)
        return x.unflatten(2, sources.shape[2:]) + bias

    def run(self, masks: Bool[Tensor, "k n_src n_dst"], *, tokens: Int[Tensor, "batch pos"] | None = None
            ) -> Float[Tensor, "k batch n vocab"]:
        """Logits at the metric positions of each masked circuit, in batched forwards (no gradients).

        Example: `p.run(torch.zeros_like(p.graph.valid)[None])` is the fully ablated run.
        """
        masks = self._check_masks(masks)
        emb = self.embed(self.task.clean if tokens is None else tokens)
        chunk = self.chunk_size()
        with torch.no_grad():
            return torch.cat([self.forward(emb, m).logits for m in masks.split(chunk)])

    def chunk_size(self) -> int:
        """How many masks one batched forward takes."""
        per_mask = self.clean_sources.numel() * 3 + self.clean_inputs.numel()
        return max(1, MAX_CHUNK_FLOATS // max(per_mask, 1))

    def _check_masks(self, masks: Tensor) -> Tensor:
        shape = (self.graph.n_sources, self.graph.n_destinations)
        if masks.dtype is not torch.bool or masks.ndim != 3 or tuple(masks.shape[1:]) != shape:
            raise ValueError(f"masks: expected a bool tensor [k, {shape[0]}, {shape[1]}], "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        return masks.to(self.device)

    # ---- the incremental form (exact ACDC) ----

    def state(self, mask: Bool[Tensor, "n_src n_dst"]) -> CircuitState:
        """The unbatched run of one circuit, kept for `evaluate_column`."""
        mask = self._check_masks(mask[None])[0]
        with torch.no_grad():
            run = self.forward(self.embed(self.task.clean), mask[None], keep=True)
        return CircuitState(mask.clone(), run.sources[0], run.inputs[0], run.logits[0])

    def evaluate_column(
        self, state: CircuitState, d: int, columns: Bool[Tensor, "k n_src"]
    ) -> Float[Tensor, "k batch n vocab"]:
        """Logits of k circuits equal to `state.mask` except for column `d` (the incoming edges of destination
        d), which is `columns[i]` in circuit i.

        Only what those edges can change is recomputed: d's node, then every node reached from it along
        the circuit's kept edges (a removed edge carries the ablated value, which no candidate changes), and
        in the last layer only at the metric positions. Equal (to float rounding) to `run` on the full masks.
        """
        w = self.weights
        with torch.no_grad():
            first = next(i for i, s in enumerate(self.stages) if s.dst.start <= d < s.dst.stop)
            nb = self.stages[first].n_below
            kept = columns[:, :nb].to(state.sources.dtype)
            seed = kept @ state.sources[:nb].flatten(1) + (1 - kept) @ self.ablated[:nb].expand(
                nb, *state.sources.shape[1:]).flatten(1)
            seed = _Value(seed.unflatten(1, state.sources.shape[1:]) + self.biases[first], restricted=False)
            changed: dict[int, _Value] = {}  # source index -> its new output in each candidate
            for i, stage in enumerate(self.stages[first:], start=first):
                restrict = stage.layer >= self.n_layers - 1  # the last layer matters at the metric positions only
                if stage.kind is NodeKind.LOGITS:
                    x = self._new_input(state, i, stage.dst.start, changed, seed, d, restrict=True)
                    if x is None:
                        return state.logits.expand(columns.shape[0], *state.logits.shape)
                    return unembed(w, x)
                if stage.kind is NodeKind.MLP:
                    x = self._new_input(state, i, stage.dst.start, changed, seed, d, restrict=restrict)
                    if x is not None:
                        changed[stage.out.start] = _Value(mlp(w, stage.layer, x), restrict)
                    continue
                self._attention_stage(state, i, changed, seed, d, restrict)
        raise AssertionError("unreachable: the last stage is the logits")

    def _attention_stage(self, state: CircuitState, i: int, changed: dict[int, _Value], seed: _Value,
                         d: int, restrict: bool) -> None:
        """Recompute the heads of one layer whose q, k or v input changed; record their new outputs.
        In the last layer (`restrict`) queries are computed at the metric positions only."""
        stage, H = self.stages[i], self.graph.n_heads
        heads, qkv_inputs = [], []
        for h in range(H):
            dsts = [stage.dst.start + j * H + h for j in range(3)]
            xs = [self._new_input(state, i, dd, changed, seed, d, restrict=restrict and j == 0)
                  for j, dd in enumerate(dsts)]
            if all(x is None for x in xs):
                continue
            heads.append(h)
            qkv_inputs.append([self._at(state.inputs[dd], restrict and j == 0)[None] if x is None else x
                               for j, (dd, x) in enumerate(zip(dsts, xs))])
        if not heads:
            return
        k = max(x.shape[0] for xs in qkv_inputs for x in xs)
        stacked = [torch.stack([xs[j].expand(k, *xs[j].shape[1:]) for xs in qkv_inputs], dim=1) for j in range(3)]
        q_pos = self.positions if restrict else torch.arange(state.inputs.shape[-2], device=self.device)
        out = attend(self.weights, stage.layer, torch.tensor(heads, device=self.device), *stacked, q_pos)
        for j, h in enumerate(heads):
            changed[stage.out.start + h] = _Value(out[:, j], restrict)

    def _at(self, x: Float[Tensor, "*lead pos d_model"], restrict: bool) -> Float[Tensor, "*lead p d_model"]:
        """x at the metric positions when `restrict`, else x."""
        return x[..., self.positions, :] if restrict else x

    def _new_input(self, state: CircuitState, i: int, dst: int, changed: dict[int, _Value], seed: _Value, d: int,
                   *, restrict: bool) -> Tensor | None:
        """Destination dst's input in each candidate, or None when no candidate changes it (at the metric
        positions when `restrict`). Recomputed as a sum of its terms, like `_stage_input`."""
        if dst == d:
            return self._at(seed.value, restrict)
        fed = [s for s in changed if state.mask[s, dst]]
        if not fed:
            return None
        nb = self.stages[i].n_below
        kept = state.mask[:nb, dst].to(state.sources.dtype)
        unchanged = kept.clone()
        unchanged[fed] = 0.0
        sources = self._at(state.sources[:nb], restrict)
        ablated = self._at(self.ablated[:nb], restrict).expand(nb, *sources.shape[1:])
        x = (unchanged @ sources.flatten(1) + (1 - kept) @ ablated.flatten(1)).unflatten(0, sources.shape[1:])
        x = x + self.biases[i]
        for s in fed:
            value = changed[s]
            if value.restricted and not restrict:
                raise AssertionError("a last-layer source feeds a destination needed at every position")
            x = x + (self._at(value.value, True) if restrict and not value.restricted else value.value)
        return x


@dataclass(frozen=True, eq=False)
class _Value:
    """A source's output (or a destination's input) in each of k candidates; `restricted` when it is given at
    the metric positions only."""

    value: Tensor
    restricted: bool


def _cat_sources(blocks: list[Tensor]) -> Tensor:
    """Concatenate source blocks [k_i, n_i, ...] along the source axis, broadcasting the leading axis."""
    k = max(b.shape[0] for b in blocks)
    return torch.cat([b.expand(k, *b.shape[1:]) for b in blocks], dim=1)


def _ablation(ablation: Ablation | str) -> Ablation:
    try:
        return Ablation(ablation)
    except ValueError:
        raise ValueError(f"ablation must be one of {[a.value for a in Ablation]}, got {ablation!r}") from None


def _stages(graph: ComputeGraph) -> list[_Stage]:
    """The forward's stages in order, with the destination and source index ranges of each."""
    stages = []
    H = graph.n_heads
    dst = 0
    src = 2
    for layer in range(graph.n_layers):
        stages.append(_Stage(NodeKind.HEAD_INPUT, layer, slice(dst, dst + 3 * H), src, slice(src, src + H)))
        dst, src = dst + 3 * H, src + H
        if graph.has_mlp:
            stages.append(_Stage(NodeKind.MLP, layer, slice(dst, dst + 1), src, slice(src, src + 1)))
            dst, src = dst + 1, src + 1
    stages.append(_Stage(NodeKind.LOGITS, graph.n_layers, slice(dst, dst + 1), src, slice(src, src)))
    return stages


def patch_edges(
    model: TransformerBridge,
    task: Task,
    masks: Bool[Tensor, "k n_src n_dst"],
    *,
    ablation: Ablation | str = Ablation.RESAMPLE,
) -> Float[Tensor, "k batch n vocab"]:
    """Logits at the task's metric positions of each circuit in `masks` (True = edge kept).

    Example: `patch_edges(model, task, ComputeGraph.of(model).valid[None])` is the clean run.
    """
    return EdgePatcher(model, task, ablation).run(masks)

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
evaluates [k, n_src, n_dst] masks in batched forwards (chunked to bound memory). The incremental form used by
exact ACDC is in `circuits.graph.incremental`.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.engine import Weights, attention_bias
from circuits.graph.forward import attend, embed, mlp, shared_forward, unembed
from circuits.graph.nodes import ComputeGraph, NodeKind
from circuits.tasks.task import Task

MAX_CHUNK_FLOATS = 2**26
"""Masks per batched forward are chunked so that the stacked source outputs stay under ~256 MiB (float32)."""
QKV_COLUMNS_BYTES = 2**28
"""The most memory `EdgePatcher.qkv_columns` keeps (least recently used sets dropped first): a dense walk meets
a new set of alike head inputs each time a commit splits a group, each up to a layer's whole q/k/v weights. The
heads' unembeddings (`EdgePatcher.head_unembedding`) are kept within the same budget."""


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


class EdgePatcher:
    """The edge-patching engine for one model, task and ablation.

    Shapes: masks are Bool [k, n_src, n_dst] over `patcher.graph`; logits come back at the task's metric
    positions, [k, batch, n, vocab]. Example:
    `p = EdgePatcher(model, task); logits = p.run(p.graph.valid[None])  # the clean run`
    """

    def __init__(self, model: TransformerBridge, task: Task, ablation: Ablation | str = Ablation.RESAMPLE):
        self.weights = Weights.of(model)
        self.graph = ComputeGraph.of(model)
        self.task = task
        self.ablation = _ablation(ablation)
        if task.seq_len > self.weights.n_ctx:
            raise ValueError(f"task: sequences of {task.seq_len} tokens exceed the model's n_ctx "
                             f"{self.weights.n_ctx}")
        self.device = self.weights.device
        self.positions = task.positions.to(self.device)
        self.stages = _stages(self.graph)
        self.biases = self._stage_biases()
        # the destinations every circuit reads at the metric positions only (CPU; circuits that read more there
        # start from it: `read_at_metric_positions`), and as a list for the per-destination lookups
        self.metric_only_destinations = torch.tensor(
            [self._reads_metric_positions_only(d) for d in range(self.graph.n_destinations)], dtype=torch.bool)
        self._at_metric = self.metric_only_destinations.tolist()
        self._stage_of = [i for i, stage in enumerate(self.stages) for _ in range(stage.dst.stop - stage.dst.start)]
        self._head_index: dict[tuple[int, ...], Tensor | slice] = {}
        self._qkv_columns = _RecentlyUsed(QKV_COLUMNS_BYTES)
        # the unembedding of `logit_columns` as last read (`_unembedding_of_columns`): the columns, folded, per head
        self._unembedding: tuple[Tensor | None, tuple[Tensor, Tensor] | None, _RecentlyUsed] = (
            None, None, _RecentlyUsed(QKV_COLUMNS_BYTES))
        self.logit_columns: Int[Tensor, " c"] | None = None
        """Where set, the incremental evaluations (`circuits.graph.incremental`) compute only these vocabulary
        columns of the logits (a metric that reads few, `GraphMetric.columns`); `run` always computes all."""
        n_pos = task.seq_len
        causal, dtype = self.weights.causal, self.weights.dtype
        self._query_positions = {False: torch.arange(n_pos, device=self.device), True: self.positions}
        self._attention_bias = {at: attention_bias(q_pos, n_pos, dtype, causal)
                                for at, q_pos in self._query_positions.items()}
        with torch.no_grad():
            resample = self.ablation is Ablation.RESAMPLE
            emb = self.embed(task.clean)
            # the corrupted run (resample ablation's values) as a second row of the same forward
            runs = self.forward(torch.cat([emb, self.embed(task.corrupted)]) if resample else emb, None, keep=True)
            self.clean_sources = runs.sources[0]
            self._clean_stage_inputs = tuple(x[:1] for x in runs.stage_inputs)
            self.clean_logits = runs.logits[0]
            self.clean_logits_full = unembed(self.weights, runs.stage_inputs[-1][0, 0])
            ablated = runs.sources[1] if resample else mean_or_zero_values(self.ablation, self.clean_sources)
            self.ablated = ablated.expand_as(self.clean_sources).contiguous()
            self.ablated_at = self.ablated[..., self.positions, :]

    @property
    def n_layers(self) -> int:
        return self.graph.n_layers

    def clean_inputs(self) -> Float[Tensor, "n_dst batch pos d_model"]:
        """Every destination's input in the clean run (each stage's residual stream, repeated), as a fresh
        tensor (a circuit state updates its inputs in place)."""
        return torch.cat(self._clean_stage_inputs, dim=1)[0]

    def stage_of(self, d: int) -> int:
        """The index of the stage that reads destination d."""
        return self._stage_of[d]

    def at_metric_positions(self, d: int) -> bool:
        """True for destinations read only at the metric positions: the logits, and the queries and MLP input
        of the last layer (the last layer's outputs reach nothing but the logits)."""
        return self._at_metric[d]

    def head_index(self, heads: list[int]) -> Int[Tensor, " h"] | slice:
        """Some heads' indices: a slice where they are consecutive (indexing a weight with it is a view, not a
        copy), else a tensor (made once per set of heads)."""
        key = tuple(heads)
        if key not in self._head_index:
            consecutive = key == tuple(range(key[0], key[0] + len(key)))
            self._head_index[key] = slice(key[0], key[0] + len(key)) if consecutive else torch.tensor(
                key, device=self.device)
        return self._head_index[key]

    def qkv_columns(self, layer: int, heads: tuple[tuple[int, int], ...]
                    ) -> tuple[Float[Tensor, "d_model ne"], Float[Tensor, "n e"]]:
        """The projections (h, which) of one layer side by side, W [d_model, n · d_head] and b [n, d_head]
        (`which` 0, 1, 2: query, key, value; h a key/value head for keys and values), made once per set
        and kept while it is among the recently used (`QKV_COLUMNS_BYTES`).
        Example: `W, b = p.qkv_columns(0, ((0, 0), (0, 1)))` (head 0's query and key)"""
        def make() -> tuple[Tensor, Tensor]:
            w = self.weights
            W = torch.stack([w.qkv_weights(which)[0][layer, h] for h, which in heads])
            b = torch.stack([w.qkv_weights(which)[1][layer, h] for h, which in heads])
            return einops.rearrange(W, "n d e -> d (n e)").contiguous(), b

        return self._qkv_columns.get((layer, heads), make)

    def folded_unembedding(self) -> tuple[Float[Tensor, "d_model c"], Float[Tensor, " c"]]:
        """The unembedding of the columns the evaluations read with the final norm's weight folded in (centred
        over d_model for a LayerNorm), and the constant the norm's bias and b_U add: logits = (x · G) / scale(x) +
        constant, with scale the final norm's (`Norm.scale`). Example: `G, c = p.folded_unembedding()`"""
        columns, folded, heads = self._unembedding_of_columns()
        if folded is None:
            w = self.weights
            norm = w.ln_final
            W_U = w.W_U if columns is None else w.W_U[:, columns]
            b_U = w.b_U if columns is None else w.b_U[columns]
            G = W_U if norm.weight is None else norm.weight[:, None] * W_U
            if norm.centred:
                G = G - G.mean(0, keepdim=True)
            folded = (G.contiguous(), b_U if norm.bias is None else b_U + norm.bias @ W_U)
            self._unembedding = (columns, folded, heads)
        return folded

    def head_unembedding(self, layer: int, head: int) -> Float[Tensor, "d_head c"]:
        """W_O of one head times the folded unembedding (`folded_unembedding`): a head's z read as logits before
        the final norm's division, made once per head while among the recently used (`QKV_COLUMNS_BYTES`).
        Example: `M = p.head_unembedding(1, 3)`"""
        heads = self._unembedding_of_columns()[2]
        return heads.get((layer, head), lambda: self.weights.W_O[layer, head] @ self.folded_unembedding()[0])

    def _unembedding_of_columns(self) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None, _RecentlyUsed]:
        """The unembedding caches, emptied when the columns the evaluations read change."""
        if self._unembedding[0] is not self.logit_columns:
            self._unembedding = (self.logit_columns, None, _RecentlyUsed(QKV_COLUMNS_BYTES))
        return self._unembedding

    def attention_bias(self, at_metric_positions: bool) -> Float[Tensor, "nq pos"]:
        """The attention mask's bias for queries at every position, or at the metric positions only."""
        return self._attention_bias[at_metric_positions]

    def query_positions(self, at_metric_positions: bool) -> Int[Tensor, " nq"]:
        """Every position, or the metric positions only."""
        return self._query_positions[at_metric_positions]

    def _reads_metric_positions_only(self, d: int) -> bool:
        node = self.graph.destinations[d]
        last = node.layer >= self.n_layers - 1
        return node.kind is NodeKind.LOGITS or (last and (node.kind is NodeKind.MLP or node.qkv == "q"))

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "1 n_embed batch pos d_model"]:
        """The embedding sources of some tokens, with a leading mask axis of 1."""
        return embed(self.weights, tokens)[None]

    def _stage_biases(self) -> list[Tensor]:
        """The constant part of each stage's input: b_O (and b_out) of every layer below it (for the MLP of a
        sequential block also its own layer's b_O; a parallel MLP reads the block's input)."""
        w = self.weights
        total = w.W_E.new_zeros(w.d_model)
        block_in = total
        biases = []
        for stage in self.stages:
            if stage.kind is NodeKind.HEAD_INPUT:
                biases.append(total.clone())
                block_in = total
                total = total + w.b_O[stage.layer]
            elif stage.kind is NodeKind.MLP:
                biases.append((block_in if w.parallel else total).clone())
                total = total + w.b_out[stage.layer]
            else:
                biases.append(total.clone())
        return biases

    def forward(
        self,
        emb: Float[Tensor, "_ke n_embed batch pos d_model"],
        masks: Bool[Tensor, "_km n_src n_dst"] | None,
        *,
        keep: bool = False,
    ) -> Run:
        """One batched patched forward from the embedding sources (`masks=None`: every edge kept, no ablation).

        `emb` and `masks` broadcast along their first axis (one of them may be 1).
        """
        w = self.weights
        if masks is None:
            return self._unpatched(emb, keep)
        # every source's output, written stage by stage into one tensor that each stage reads a prefix of
        sources = emb.new_empty(max(emb.shape[0], masks.shape[0]), self.graph.n_sources, *emb.shape[2:])
        sources[:, : emb.shape[1]] = emb
        inputs = []
        for stage, bias in zip(self.stages, self.biases):
            x = self._stage_input(sources[:, : stage.n_below], stage, bias, masks)
            if keep:
                inputs.append(x)
            if stage.kind is NodeKind.HEAD_INPUT:
                H, Hkv = self.graph.n_heads, self.graph.kv_heads
                all_pos = torch.arange(x.shape[-2], device=self.device)
                sources[:, stage.out] = attend(w, stage.layer, x[:, :H], x[:, H:H + Hkv], x[:, H + Hkv:], all_pos)
            elif stage.kind is NodeKind.MLP:
                sources[:, stage.out] = mlp(w, stage.layer, x)
            else:
                logits = unembed(w, x[:, 0][..., self.positions, :])
        return Run(logits, sources if keep else None, tuple(inputs) if keep else None)

    def _unpatched(self, emb: Float[Tensor, "k n_embed batch pos d_model"], keep: bool) -> Run:
        """Every edge kept: the model's own forward (one LayerNorm per layer), each stage's destinations reading
        the residual stream. Its stage inputs are views of one tensor per stage: not for per-destination
        gradients (pass an all-True mask for those)."""
        run = shared_forward(self.weights, emb, self.positions)
        if not keep:
            return Run(run.logits)
        inputs = []
        for stage in self.stages:
            n = stage.dst.stop - stage.dst.start
            if stage.kind is NodeKind.HEAD_INPUT:
                x = run.resid_in[stage.layer]
            elif stage.kind is NodeKind.MLP:
                x = run.mlp_in[stage.layer]
            else:
                x = run.final
            inputs.append(x[:, None].expand(-1, n, *x.shape[1:]))
        return Run(run.logits, run.sources, tuple(inputs))

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
        n = stage.n_below
        kept = masks[:, :n, stage.dst].to(sources.dtype).transpose(1, 2)  # [k, n_dst, n_below]
        x = kept @ sources[:, :n].flatten(2) + (1 - kept) @ self.ablated[:n].flatten(1)
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

    @functools.cached_property
    def feeds(self) -> Bool[Tensor, "n_dst n_src"]:
        """feeds[d, s]: destination d's input feeds source s (its head or MLP; `graph.sources_of_destination`)."""
        g = self.graph
        out = torch.zeros(g.n_destinations, g.n_sources, dtype=torch.bool)
        for d in range(g.n_destinations):
            out[d, g.sources_of_destination(d)] = True
        return out.to(self.device)

    def chunk_size(self) -> int:
        """How many masks one batched forward takes."""
        per_mask = self.clean_sources[0].numel() * (3 * self.graph.n_sources + self.graph.n_destinations)
        return max(1, MAX_CHUNK_FLOATS // max(per_mask, 1))

    def _check_masks(self, masks: Tensor) -> Tensor:
        shape = (self.graph.n_sources, self.graph.n_destinations)
        if masks.dtype is not torch.bool or masks.ndim != 3 or tuple(masks.shape[1:]) != shape:
            raise ValueError(f"masks: expected a bool tensor [k, {shape[0]}, {shape[1]}], "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        return masks.to(self.device)


def mean_or_zero_values(ablation: Ablation, sources: Float[Tensor, "n_src batch pos d_model"]
                        ) -> Float[Tensor, "n_src 1 pos d_model"]:
    """What a removed edge carries under zero or mean ablation (the clean outputs' batch mean at each
    position), broadcast over the batch by the caller. Example: `mean_or_zero_values(Ablation.MEAN, sources)`"""
    if ablation is Ablation.ZERO:
        return torch.zeros_like(sources[:, :1])
    if ablation is Ablation.MEAN:
        return sources.mean(dim=1, keepdim=True)
    raise ValueError(f"ablation: {ablation.value!r} carries the corrupted run's values, not a zero or a mean")


def _ablation(ablation: Ablation | str) -> Ablation:
    try:
        return Ablation(ablation)
    except ValueError:
        raise ValueError(f"ablation must be one of {[a.value for a in Ablation]}, got {ablation!r}") from None


def _stages(graph: ComputeGraph) -> list[_Stage]:
    """The forward's stages in order, with the destination and source index ranges of each."""
    stages = []
    H, n_in = graph.n_heads, graph.inputs_per_layer
    dst = 0
    src = graph.n_embed
    for layer in range(graph.n_layers):
        stages.append(_Stage(NodeKind.HEAD_INPUT, layer, slice(dst, dst + n_in), src, slice(src, src + H)))
        below = src if graph.parallel else src + H  # a parallel MLP reads the block's input
        dst, src = dst + n_in, src + H
        if graph.has_mlp:
            stages.append(_Stage(NodeKind.MLP, layer, slice(dst, dst + 1), below, slice(src, src + 1)))
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


class _RecentlyUsed:
    """Values made on demand and kept while their total size stays within `budget` bytes, the least recently
    used dropped first (the newest is kept even alone above it)."""

    def __init__(self, budget: int):
        self.budget, self.nbytes = budget, 0
        self.values: OrderedDict[tuple, Tensor | tuple[Tensor, ...]] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], Tensor | tuple[Tensor, ...]]) -> Tensor | tuple[Tensor, ...]:
        if key in self.values:
            self.values.move_to_end(key)
            return self.values[key]
        self.values[key] = value = make()
        self.nbytes += _nbytes(value)
        while self.nbytes > self.budget and len(self.values) > 1:
            self.nbytes -= _nbytes(self.values.popitem(last=False)[1])
        return value


def _nbytes(value: Tensor | tuple[Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in (value if isinstance(value, tuple) else (value,)))

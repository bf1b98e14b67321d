"""Edge attribution patching (Syed et al., 2023) and EAP-IG (Hanna et al., 2024).

EAP scores every edge at once from one clean forward + backward and the ablated source outputs (one
corrupted forward for resample ablation):

    score(s → d) = Σ_{batch, pos, d_model} (abl_s − out_s) · ∂metric/∂x_d   (at the clean run)

the first-order estimate of metric(edge patched) − metric(clean), the sign convention of activation
patching. EAP-IG replaces the gradient by its average over `ig_steps` points of the straight path from the
ablated to the clean embeddings (α = 1/m, 2/m, …, 1: the embedding sources are abl + α·(clean − abl), every
other node computed by the model), the input-interpolation form of Hanna et al.; the steps run as batched
forwards and backwards. Where the metric is linear in a destination's input (the logits of a model without
final LayerNorm under logit difference, say) both equal edge patching exactly.

The head inputs' gradients are formed inside the backward (`_NormQKV`): the backward of each layer's norm and
q/k/v product takes every head input's gradient at the residual stream, J_lnᵀ W_d g_d, which the edge scores
need, and returns their sum, which is the backward's own gradient there, instead of computing that sum by a
second product of the same size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from circuits.engine import Weights, embed, unembed
from circuits.engine.run import Record, forward
from circuits.graph.circuit import Circuit
from circuits.graph.metric import GraphMetric, resolve_metric
from circuits.graph.nodes import ComputeGraph, NodeKind
from circuits.graph.patching import MAX_CHUNK_FLOATS, Ablation, _ablation, _stages, mean_or_zero_values
from circuits.graph.result import EdgeResult
from circuits.tasks.metrics import MetricSpec
from circuits.tasks.task import Task
from circuits.validate import check_count, check_finite, check_task


@dataclass(frozen=True, eq=False)
class EAPResult(EdgeResult):
    """Attribution scores for every edge, with the edge-result interface (`EdgeResult`): `values`
    [source, destination] (nan where there is no edge) ≈ metric(edge ablated) − metric(clean); `circuit` holds
    them over all edges; `top_n(n)` selects."""


def eap(
    model: TransformerBridge,
    task: Task,
    *,
    ig_steps: int = 0,
    metric: MetricSpec = None,
    ablation: Ablation | str = Ablation.RESAMPLE,
    progress: bool = True,
) -> EAPResult:
    """EAP scores of every edge (`ig_steps=0`), or EAP-IG with `ig_steps` interpolation steps.

    Cost (EAP): one forward and backward on the clean input and one forward on the corrupted input
    (resample ablation), with no per-edge work but a (sources × destinations) contraction; EAP-IG: one batched
    forward and backward per step (the clean run is the step α = 1) and the corrupted forward. How it grows
    with layers, edges, batch and vocabulary: docs/performance.md.
    `metric`: the one contract (`circuits.tasks.metrics`), the task's by default. EAP-IG shows a progress bar
    over its steps unless `progress=False`.
    Example: `eap(model, task, ig_steps=8).top_n(16).to_networkx()`
    """
    check_task(model, task)
    check_count(ig_steps, "ig_steps")
    ablation = _ablation(ablation)
    w = Weights.of(model)
    g = ComputeGraph.of(model)
    if task.seq_len > w.n_ctx:
        raise ValueError(f"task: sequences of {task.seq_len} tokens exceed the model's n_ctx {w.n_ctx}")
    positions = task.positions.to(w.device)
    clean, corrupted = _read_prefix(w, task)
    clean_emb = embed(w, clean)
    ablated_emb = _ablated_embeddings(w, ablation, clean_emb, corrupted)
    steps = max(ig_steps, 1)  # EAP is the one step α = 1
    alphas = torch.arange(steps, 0, -1, device=clean_emb.device, dtype=clean_emb.dtype) / steps
    per_chunk = _runs_per_chunk(w, *clean_emb.shape[1:3])
    # clean − (1 − α)(clean − ablated): exactly the clean embeddings at α = 1, the first run
    chunks = [clean_emb[None] - (1 - a)[:, None, None, None, None] * (clean_emb - ablated_emb)[None]
              for a in alphas.split(per_chunk)]
    attribution = attribute(
        w, g, chunks, lambda run, emb: source_differences(w, g, run, emb, ablated_emb, ablation, positions),
        positions, task, metric, progress=progress and ig_steps > 0)
    scores, gm = attribution.scores / steps, attribution.metric
    scores = scores.detach().float().cpu()
    check_finite(scores[g.valid], f"metric {gm.name!r}", "edge scores (its value or gradient is not finite)")
    scores = scores.masked_fill(~g.valid, float("nan"))
    method = "eap-ig" if ig_steps else "eap"
    attrs = dict(model=w.description, method=method, metric=gm.name, ablation=ablation.value)
    return EAPResult(
        values=scores, dims=("source", "destination"), labels=(g.source_names, g.destination_names), method=method,
        info=dict(metric=gm.name, ablation=ablation.value, ig_steps=ig_steps),
        circuit=Circuit.full(g, scores, **attrs),
    )


def _read_prefix(w: Weights, task: Task) -> tuple[Tensor, Tensor]:
    """The clean and corrupted tokens up to the last metric position: in a causal model nothing at a later
    position reaches the metric, so no edge score depends on it (bidirectional models keep every position)."""
    if not w.causal:
        return task.clean, task.corrupted
    end = int(task.positions.max()) + 1
    return task.clean[:, :end], task.corrupted[:, :end]


def _ablated_embeddings(w: Weights, ablation: Ablation, clean_emb: Float[Tensor, "n_embed batch pos d_model"],
                        corrupted: Int[Tensor, "batch pos"]) -> Float[Tensor, "n_embed batch pos d_model"]:
    """The embedding sources of the ablated run (EAP-IG's path starts there): the corrupted tokens' for resample
    ablation, the clean ones' batch mean or zero otherwise."""
    if ablation is Ablation.RESAMPLE:
        return embed(w, corrupted)
    return mean_or_zero_values(ablation, clean_emb).expand_as(clean_emb)


def source_differences(
    w: Weights, graph: ComputeGraph, clean: Record, clean_emb: Float[Tensor, "k n_embed batch pos d_model"],
    ablated_emb: Float[Tensor, "n_embed batch pos d_model"], ablation: Ablation, positions: Tensor,
) -> Float[Tensor, "n_src batch pos d_model"]:
    """Ablated minus clean output of every source, in graph order, given the first run of the clean record
    (`clean`, with z, attn_out and mlp kept) and the ablated embeddings. A head's is (z_ablated − z) W_O, one
    product per layer; the last layer's heads' are 0 away from the metric positions (their queries were not
    computed). Resample ablation runs the corrupted forward here, its attention output formed as the clean
    run's plus the sum of its heads' differences (no W_O product of its own); zero and mean ablation take z and
    the MLP outputs' batch mean or zero from the clean run."""
    n_embed, B, P, D = clean_emb.shape[1:]
    H = w.n_heads
    first = {stage.layer: stage.out.start for stage in _stages(graph) if stage.kind is NodeKind.HEAD_INPUT}
    with torch.no_grad():
        diff = clean_emb.new_empty(graph.n_sources, B, P, D)
        torch.sub(ablated_emb, clean_emb[0], out=diff[:n_embed])
        if ablation is Ablation.RESAMPLE:
            def attn_out_from(layer: int, z: Tensor) -> Tensor:
                clean_attn = clean.attn_out[layer][0]
                if z.shape[1] != P:
                    clean_attn = clean_attn[:, positions]
                heads = _head_differences(w, layer, z - clean.z[layer][0], diff[first[layer]: first[layer] + H],
                                          positions)
                return clean_attn + heads

            ablated_mlp = forward(w, ablated_emb.sum(0), record=("mlp",), queries=positions,
                                  attn_out_from=attn_out_from).mlp
        else:
            for layer in range(w.n_layers):
                z = clean.z[layer][0]
                dz = _mean_or_zero(ablation, z) - z
                _head_differences(w, layer, dz, diff[first[layer]: first[layer] + H], positions)
            ablated_mlp = [_mean_or_zero(ablation, m[0]) for m in clean.mlp]
        for layer, m in enumerate(ablated_mlp):
            torch.sub(m, clean.mlp[layer][0], out=diff[first[layer] + H])
    return diff


def _mean_or_zero(ablation: Ablation, x: Float[Tensor, "batch pos *rest"]) -> Float[Tensor, "1 pos *rest"]:
    """A source's value under zero or mean ablation (`mean_or_zero_values`), for any trailing shape."""
    return mean_or_zero_values(ablation, x.flatten(2)[None])[0].view(1, *x.shape[1:])


def _head_differences(w: Weights, layer: int, dz: Float[Tensor, "batch nq head d_head"],
                      out: Float[Tensor, "head batch pos d_model"], positions: Tensor
                      ) -> Float[Tensor, "batch nq d_model"]:
    """Each head's output difference dz W_O into `out` (0 at the positions that are not queries when nq is
    fewer than pos); returns their sum over heads at the queries."""
    H, B, P, D = out.shape
    nq = dz.shape[1]
    flat = dz.permute(2, 0, 1, 3).reshape(H, B * nq, -1)
    if nq == P:
        torch.bmm(flat, w.W_O[layer], out=out.view(H, B * P, D))
        return out.sum(0)
    at = torch.bmm(flat, w.W_O[layer]).view(H, B, nq, D)
    out.zero_().index_copy_(2, positions, at)
    return at.sum(0)


def _runs_per_chunk(w: Weights, batch: int, pos: int) -> int:
    """Runs per batched forward so that the activations autograd keeps (per token and layer: about 8 of
    d_model and the attention scores and pattern of each head; 2 of d_mlp and 3 of d_model per MLP) stay under
    `MAX_CHUNK_FLOATS`."""
    per_token = 8 * w.d_model + 2 * w.n_heads * pos
    if w.has_mlp:
        per_token += 2 * w.W_in.shape[-1] + 3 * w.d_model
    return max(1, MAX_CHUNK_FLOATS // (batch * pos * max(1, w.n_layers) * per_token))


def _full_logits(logits_at: Tensor, task: Task) -> Tensor:
    """[batch, pos, vocab] logits holding `logits_at` at the metric positions (what the KL reference reads)."""
    full = logits_at.new_zeros(task.batch, task.seq_len, logits_at.shape[-1])
    full[:, task.positions.to(full.device)] = logits_at
    return full


@dataclass(frozen=True, eq=False)
class Attribution:
    """Σ over runs of every edge's score (`scores` [n_src, n_dst], 0 where there is no edge), the metric, and
    when asked for, every destination's gradient at its input summed over the runs (`gradients`
    [n_dst, batch, pos, d_model])."""

    scores: Tensor
    metric: GraphMetric
    gradients: Tensor | None = None


def attribute(
    w: Weights,
    graph: ComputeGraph,
    chunks: Sequence[Float[Tensor, "_k n_embed batch pos d_model"]],
    differences: Callable[[Record, Tensor], Float[Tensor, "n_src batch pos d_model"]],
    positions: Int[Tensor, " n"],
    task: Task,
    metric: MetricSpec,
    *,
    keep_gradients: bool = False,
    progress: bool = False,
) -> Attribution:
    """Σ_{runs, batch, pos, d_model} diff_s · ∂metric/∂x_d for every edge, over the unpatched runs from the
    embedding sources in `chunks` (each chunk one batched forward and backward). The first run of the first
    chunk is the clean run: its logits are the metric's reference, and `differences(record, emb)` of its
    record (z, attn_out, mlp and mlp_in kept) and embeddings gives the sources' differences.

    Head inputs are scored in the backward of each layer's norm and q/k/v product (`_NormQKV`), in the last
    chunk (earlier chunks add their q/k/v gradients to a sum); MLP inputs and the logits at the end, in one
    product with every source.
    Example: `attribute(w, g, [embed(w, task.clean)[None]], lambda run, emb: diff, task.positions, task, None)`"""
    n_runs = sum(len(c) for c in chunks)
    first = chunks[0][0]
    scores = first.new_zeros(graph.n_sources, graph.n_destinations)
    heads = _HeadInputScores(w, graph, scores, single=n_runs == 1, keep=keep_gradients)
    rest = None  # Σ over runs of the gradients at the MLP inputs and the final norm's input
    gm = None
    with tqdm(total=n_runs, desc="EAP-IG steps", disable=not progress, leave=False) as bar:
        for i, emb in enumerate(chunks):
            heads.last_chunk = i == len(chunks) - 1
            with torch.enable_grad():
                emb = emb.detach().requires_grad_(True)
                run = forward(w, emb.sum(1), record=("z", "attn_out", "mlp", "mlp_in"), queries=positions,
                              qkv_from=heads.qkv)
                logits = unembed(w, run.final[..., positions, :])
                if gm is None:
                    gm = resolve_metric(task, metric, _full_logits(logits[0].detach(), task))
                    heads.diff = differences(run, emb.detach())
                targets = [*run.mlp_in, run.final]
                grads = torch.autograd.grad(gm.fn(logits).sum(), [emb, *targets], allow_unused=True)[1:]
            grads = [torch.zeros_like(t[0]) if gr is None else gr.sum(0) for gr, t in zip(grads, targets)]
            rest = grads if rest is None else [r + gr for r, gr in zip(rest, grads)]
            bar.update(len(emb))
    dense = _score_mlps_and_logits(graph, heads.diff, torch.stack(rest), scores)
    gradients = None
    if keep_gradients:
        gradients = torch.zeros(graph.n_destinations, *heads.diff.shape[1:], dtype=scores.dtype, device=scores.device)
        for stage in _stages(graph):
            gradients[stage.dst] = (heads.kept[stage.layer] if stage.kind is NodeKind.HEAD_INPUT
                                    else dense[_rest_index(graph, stage)][None])
    return Attribution(scores, gm, gradients)


def _rest_index(graph: ComputeGraph, stage) -> int:
    """Where a stage's input sits among the MLP inputs and the logits (`attribute`'s `rest`)."""
    if stage.kind is NodeKind.MLP:
        return stage.layer
    return graph.n_layers if graph.has_mlp else 0


def _score_mlps_and_logits(graph: ComputeGraph, diff: Float[Tensor, "n_src batch pos d_model"],
                           rest: Float[Tensor, "n_rest batch pos d_model"], scores: Float[Tensor, "n_src n_dst"]
                           ) -> Float[Tensor, "n_rest batch pos d_model"]:
    """Scores into the MLP inputs and the logits (in `scores`), in one product of every source's difference
    with their gradients (`rest`: each MLP's input, then the final norm's); returns `rest`."""
    stages = [s for s in _stages(graph) if s.kind is not NodeKind.HEAD_INPUT]
    products = diff.flatten(1) @ rest.flatten(1).T  # [n_src, n_rest]: the pairs with no edge are dropped below
    for stage in stages:
        scores[: stage.n_below, stage.dst] = products[: stage.n_below, _rest_index(graph, stage), None]
    return rest


class _HeadInputScores:
    """The scores of edges into head inputs, formed in the backward of each layer's ln1 and q/k/v product.

    At each position, with x̂ and σ of the run and γ the norm's gain, the gradient at the residual stream of
    head input d (its q, k or v reading ln1's output) is
        J_lnᵀ W_d g = W̃_d (g/σ) − x̂ (h · g/σ) / d_model,
    where W̃_d = γ ⊙ W_d with each column centred over d_model (LayerNorm only; `Weights.W_QKV_folded`) and
    h = x̂ γ W_d is the q, k or v the run computed minus its bias and the norm's offset times W_d
    (`Weights.b_QKV_folded`). The first term is linear in
    Σ_runs g/σ: one projection to d_model for all runs. The second is a product of per-position scalars with
    x̂, of rank k for k runs. With one run the head inputs' gradients sum to the residual stream's, which the
    backward returns in place of its own product; with several it computes that product per run as usual.
    Two layers' head inputs at a time then meet the differences of the sources below them in one matrix
    product (twice the columns of one layer's: a product with few columns is slow)."""

    def __init__(self, w: Weights, graph: ComputeGraph, scores: Tensor, *, single: bool, keep: bool):
        self.w, self.graph, self.scores, self.single = w, graph, scores, single
        self.stages = {s.layer: s for s in _stages(graph) if s.kind is NodeKind.HEAD_INPUT}
        self.diff: Tensor | None = None
        self.last_chunk = True
        self.summed: dict[int, Tensor] = {}  # Σ g/σ of the earlier chunks, [rows, head inputs, d_head]
        self.rank: dict[int, list[tuple[Tensor, Tensor]]] = {}  # their (h · g/σ, x̂)
        self.kept: dict[int, Tensor] | None = {} if keep else None
        self._pair: Tensor | None = None  # [2, head inputs, rows, d_model]: the upper layer's, then the lower's

    def qkv(self, layer: int, resid: Float[Tensor, "k batch pos d_model"]) -> Float[Tensor, "rows qkv"]:
        """ln1 and the q/k/v product of `layer` (the forward's `qkv_from`), scored in its backward."""
        return _NormQKV.apply(resid, self, layer)

    def backward(self, layer: int, resid: Tensor, qkv: Tensor, grad: Float[Tensor, "rows qkv"]
                 ) -> Float[Tensor, "k batch pos d_model"] | None:
        w, norm = self.w, self.w.ln1.at(layer)
        K, D = resid.shape[0], resid.shape[-1]
        rows = resid[0].numel() // D
        n_in, E = self.stages[layer].dst.stop - self.stages[layer].dst.start, w.W_Q.shape[-1]
        g = grad.reshape(K, rows, n_in, E)
        rank = None
        if norm.kind is not None:
            xhat, sigma = norm.standardise(resid.reshape(K, rows, D))
            g = g / sigma[..., None]
            h = qkv.view(K, rows, n_in, E) - w.b_QKV_folded[layer].view(n_in, E)
            rank = ((h * g).sum(-1), xhat)  # h · g/σ [k, rows, head inputs]
        summed = g.sum(0) if K > 1 else g[0]
        if layer in self.summed:
            summed = summed + self.summed.pop(layer)
        ranks = self.rank.pop(layer, []) + ([rank] if rank is not None else [])
        if not self.last_chunk:
            self.summed[layer], self.rank[layer] = summed, ranks
            return self._plain_backward(layer, norm, resid, grad)
        if self._pair is None:
            self._pair = summed.new_empty(2, n_in, rows, D)
        upper = (self.graph.n_layers - 1 - layer) % 2 == 0  # pairs from the top: (L-1, L-2), (L-3, L-4), ...
        out = self._project(layer, norm, summed, ranks, self._pair[0 if upper else 1])
        if self.kept is not None:
            self.kept[layer] = out.view(n_in, *resid.shape[1:]).clone()
        if not upper:
            self._contract(layer + 1, layer)
        elif layer == 0:
            self._contract(layer, None)
        if self.single and layer > 0:
            return out.sum(0).view_as(resid)
        return self._plain_backward(layer, norm, resid, grad)

    def _project(self, layer: int, norm, summed: Float[Tensor, "rows n_in d_head"], ranks: list[tuple[Tensor, Tensor]],
                 out: Float[Tensor, "n_in rows d_model"]) -> Float[Tensor, "n_in rows d_model"]:
        """Σ_runs J_lnᵀ W_d g_d of every head input d, into `out`: the projection of Σ g/σ through W̃, less the
        rank-k term."""
        n_in, D = out.shape[0], out.shape[-1]
        W = self.w.W_QKV[layer] if norm.kind is None else self.w.W_QKV_folded[layer]
        W_t = W.view(D, n_in, -1).permute(1, 2, 0)  # [head inputs, d_head, d_model], strided
        torch.bmm(summed.transpose(0, 1).contiguous(), W_t, out=out)
        if len(ranks) == 1 and len(ranks[0][0]) == 1:
            hg, xhat = ranks[0]
            out.addcmul_(hg[0].T[..., None], xhat[0], value=-1.0 / D)
        elif ranks:
            hg = torch.cat([r[0] for r in ranks])  # [k, rows, n_in]
            xhat = torch.cat([r[1] for r in ranks])  # [k, rows, d_model]
            out.sub_(torch.bmm(hg.permute(1, 2, 0), xhat.transpose(0, 1)).transpose(0, 1), alpha=1.0 / D)
        return out

    def _contract(self, upper: int, lower: int | None) -> None:
        """The scores of the head inputs of layers `upper` and `lower` (projected into the pair buffer), in one
        product with the differences of the sources below `upper`; the lower layer's columns drop the sources
        of its own layer and the one above."""
        stage = self.stages[upper]
        n, n_in = stage.n_below, stage.dst.stop - stage.dst.start
        pair = self._pair[: 1 if lower is None else 2].view(-1, self._pair[0].numel() // n_in)
        product = self.diff[:n].view(n, -1) @ pair.T
        self.scores[:n, stage.dst] = product[:, :n_in]
        if lower is not None:
            below = self.stages[lower]
            self.scores[: below.n_below, below.dst] = product[: below.n_below, n_in:]

    def _plain_backward(self, layer: int, norm, resid: Tensor, grad: Tensor) -> Tensor | None:
        """The gradient at the residual stream as autograd would form it: one product, then the norm's backward;
        none below layer 0, where it would reach only the embeddings, which no score reads."""
        if layer == 0:
            return None
        return norm.backward(resid, (grad.reshape(-1, grad.shape[-1]) @ self.w.W_QKV[layer].T).view_as(resid))


class _NormQKV(torch.autograd.Function):
    """ln1 and the fused q/k/v product of one layer, as the engine's forward computes them, whose backward
    scores the layer's head inputs (`_HeadInputScores.backward`)."""

    @staticmethod
    def forward(ctx, resid: Tensor, heads: _HeadInputScores, layer: int) -> Tensor:
        w = heads.w
        qkv = torch.addmm(w.b_QKV[layer], w.ln1.at(layer)(resid).reshape(-1, resid.shape[-1]), w.W_QKV[layer])
        ctx.save_for_backward(resid, qkv)
        ctx.heads, ctx.layer = heads, layer
        return qkv

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        resid, qkv = ctx.saved_tensors
        return ctx.heads.backward(ctx.layer, resid, qkv, grad), None, None

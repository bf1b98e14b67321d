"""Edge attribution patching (Syed et al., 2023) and EAP-IG (Hanna et al., 2024).

EAP scores every edge at once from one clean forward + backward and the ablated source outputs (one
corrupted forward for resample ablation):

    score(s → d) = Σ_{batch, pos, d_model} (abl_s − out_s) · ∂metric/∂x_d   (at the clean run)

the first-order estimate of metric(edge patched) − metric(clean), the sign convention of activation
patching. EAP-IG replaces the gradient by its average over `ig_steps` points of the straight path from the
ablated to the clean embeddings (α = 1/m, 2/m, …, 1: the embedding sources are abl + α·(clean − abl), every
other node computed by the model), the input-interpolation form of Hanna et al.; all steps run as one
batched forward and backward. Where the metric is linear in a destination's input (the logits of a model
without final LayerNorm under logit difference, say) both equal edge patching exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from circuits.engine import Weights
from circuits.graph.circuit import Circuit
from circuits.graph.forward import SharedRun, embed, shared_forward
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
    clean_emb = embed(w, task.clean)
    if ig_steps == 0:
        run, grads = factored_gradients(w, g, clean_emb[None], positions, task, metric)
        gm = run.metric
        scores = edge_scores(g, w, _ablation_difference(w, task, ablation, run.shared, positions), grads)
    else:
        scores, gm = integrated_gradient_scores(w, g, clean_emb, _ablated_embeddings(w, task, ablation, clean_emb),
                                                positions, task, metric, ig_steps, ablation, progress=progress)
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


def _ablation_difference(w: Weights, task: Task, ablation: Ablation, clean: SharedRun, positions: Tensor
                         ) -> Float[Tensor, "n_src batch pos d_model"]:
    """Ablated minus clean output of every source (the corrupted run's for resample ablation)."""
    if ablation is Ablation.RESAMPLE:
        with torch.no_grad():
            return clean.source_difference(
                shared_forward(w, embed(w, task.corrupted)[None], positions, metric_queries_only=True))
    sources = torch.cat([b[0] for b in clean.blocks])
    return mean_or_zero_values(ablation, sources) - sources


def _ablated_embeddings(w: Weights, task: Task, ablation: Ablation, clean: Float[Tensor, "n_embed batch pos d_model"]
                        ) -> Float[Tensor, "n_embed batch pos d_model"]:
    """The embedding sources of the ablated run (EAP-IG's path starts there): the corrupted tokens' for resample
    ablation, the clean ones' batch mean or zero otherwise."""
    if ablation is Ablation.RESAMPLE:
        return embed(w, task.corrupted)
    return mean_or_zero_values(ablation, clean).expand_as(clean)


@dataclass(frozen=True, eq=False)
class _GradRun:
    shared: SharedRun
    metric: GraphMetric


def _full_logits(logits_at: Tensor, task: Task) -> Tensor:
    """[batch, pos, vocab] logits holding `logits_at` at the metric positions (what the KL reference reads)."""
    full = logits_at.new_zeros(task.batch, task.seq_len, logits_at.shape[-1])
    full[:, task.positions.to(full.device)] = logits_at
    return full


@dataclass(frozen=True, eq=False)
class DestinationGrads:
    """∂metric/∂(each destination's input) of k unpatched runs, as the backward leaves them. Head inputs: the
    gradient at each head's q, k and v (`qkv[l]`, [k, head inputs, batch, pos, d_head]: q of each head, then k
    and v of each key/value head, before any rotary embedding), with those values (`qkv_values[l]`, same
    shape) and the residual stream that ln1 read (`resid_in[l]`, [k, batch, pos, d_model]); MLP inputs and the
    logits: at the input, summed over the k runs (`mlp_in[l]`, `final`: [batch, pos, d_model]).

    The gradient at a head input (the residual stream) is J_lnᵀ W g; `dense` forms it per run and destination
    (a reference for tests), `edge_scores` summed over the runs at the cost of about one projection."""

    qkv: tuple[Tensor, ...]
    qkv_values: tuple[Tensor, ...]
    resid_in: tuple[Tensor, ...]
    mlp_in: tuple[Tensor, ...]
    final: Tensor

    def dense(self, w: Weights, graph: ComputeGraph) -> Float[Tensor, "n_dst batch pos d_model"]:
        """Every destination's gradient at its input (the residual stream), summed over the k runs."""
        out = []
        for layer in range(graph.n_layers):
            at_ln = torch.einsum("khbpe,hde->khbpd", self.qkv[layer], _qkv_matrices(w, layer))
            out.append(w.ln1.at(layer).backward(self.resid_in[layer][:, None], at_ln).sum(0))
            if graph.has_mlp:
                out.append(self.mlp_in[layer][None])
        out.append(self.final[None])
        return torch.cat(out)


def _qkv_matrices(w: Weights, layer: int) -> Float[Tensor, "head_inputs d_model d_head"]:
    """W_Q of each head, then W_K and W_V of each key/value head: the order of the graph's head inputs."""
    return torch.cat([w.W_Q[layer], w.W_K[layer], w.W_V[layer]])


def factored_gradients(
    w: Weights,
    graph: ComputeGraph,
    emb: Float[Tensor, "k n_embed batch pos d_model"],
    positions: Tensor,
    task: Task,
    metric: MetricSpec,
    clean_logits_at: Tensor | None = None,
) -> tuple[_GradRun, DestinationGrads]:
    """The gradients of every destination of the unpatched runs from embedding sources `emb` (one per row k):
    one forward and one backward, the forward keeping one residual stream per layer instead of one input per
    head. The metric's reference (KL's clean logits) is `clean_logits_at`, or the first row's logits.
    Example: `run, grads = factored_gradients(w, graph, embed(w, task.clean)[None], task.positions, task, None)`"""
    with torch.enable_grad():
        emb = emb.detach().clone().requires_grad_(True)
        run = shared_forward(w, emb, positions, metric_queries_only=True)
        reference = run.logits[0].detach() if clean_logits_at is None else clean_logits_at
        gm = resolve_metric(task, metric, _full_logits(reference, task))
        targets = [t for qkv in run.qkv for t in qkv] + list(run.mlp_in) + [run.final]
        grads = torch.autograd.grad(gm.fn(run.logits).sum(), targets, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr.detach() for gr, t in zip(grads, targets)]
    n = 3 * graph.n_layers
    qkv = tuple(torch.cat(grads[3 * layer: 3 * layer + 3], 1) for layer in range(graph.n_layers))
    values = tuple(torch.cat(run.qkv[layer], 1).detach() for layer in range(graph.n_layers))
    return _GradRun(run, gm), DestinationGrads(
        qkv=qkv, qkv_values=values, resid_in=tuple(r.detach() for r in run.resid_in),
        mlp_in=tuple(gr.sum(0) for gr in grads[n: n + len(run.mlp_in)]), final=grads[-1].sum(0),
    )


def integrated_gradient_scores(
    w: Weights,
    graph: ComputeGraph,
    clean: Float[Tensor, "n_embed batch pos d_model"],
    ablated: Float[Tensor, "n_embed batch pos d_model"],
    positions: Tensor,
    task: Task,
    metric: MetricSpec,
    steps: int,
    ablation: Ablation,
    *,
    progress: bool = False,
) -> tuple[Float[Tensor, "n_src n_dst"], GraphMetric]:
    """Edge scores with the destination gradients averaged over `steps` points α = 1/m … 1 from the `ablated`
    to the `clean` embeddings, in batched forwards, each against the clean run's metric reference. The first
    batch starts at α = 1, the clean run itself: its logits are the reference and its sources the clean side
    of the differences, so no separate clean forward is run.
    Example: `scores, metric = integrated_gradient_scores(w, g, clean, ablated, pos, task, None, 8, ablation)`"""
    alphas = torch.arange(steps, 0, -1, device=clean.device, dtype=clean.dtype) / steps
    per_step = clean.numel() * (4 + 3 * graph.n_layers)
    total, gm, reference, diff = None, None, None, None
    with tqdm(total=steps, desc="EAP-IG steps", disable=not progress, leave=False) as bar:
        for a in alphas.split(max(1, MAX_CHUNK_FLOATS // per_step)):
            # clean − (1 − α)(clean − ablated): exactly the clean embeddings at α = 1
            emb = clean[None] - (1 - a)[:, None, None, None, None] * (clean - ablated)[None]
            run, grads = factored_gradients(w, graph, emb, positions, task, metric, reference)
            if diff is None:
                reference = run.shared.logits[0].detach()
                diff = _ablation_difference(w, task, ablation, run.shared, positions)
            gm = run.metric
            part = edge_scores(graph, w, diff, grads)
            total = part if total is None else total + part
            bar.update(len(a))
    return total / steps, gm


def edge_scores(
    graph: ComputeGraph, w: Weights, diff: Float[Tensor, "n_src batch pos d_model"], grads: DestinationGrads
) -> Float[Tensor, "n_src n_dst"]:
    """Σ_{k, batch, pos, d_model} diff_s · grad_d for every edge (zero where there is none), grad_d the gradient
    at destination d's input summed over the k runs (what `DestinationGrads.dense` computes one run and one
    destination at a time): per attention layer from `_head_input_gradients`, in one matrix product with the
    differences of the sources below it; MLP inputs and the logits take the summed gradient at their input.
    Example: `edge_scores(graph, w, ablated - clean, grads)` ([n_src, n_dst])"""
    scores = torch.zeros(graph.n_sources, graph.n_destinations, dtype=diff.dtype, device=diff.device)
    for stage in _stages(graph):
        n = stage.n_below
        if stage.kind is NodeKind.HEAD_INPUT:
            g = _head_input_gradients(w, stage.layer, grads)
        else:
            g = (grads.final if stage.kind is NodeKind.LOGITS else grads.mlp_in[stage.layer])[None]
        scores[:n, stage.dst] = diff[:n].flatten(1) @ g.flatten(1).T
    return scores


def _head_input_gradients(w: Weights, layer: int, grads: DestinationGrads
                          ) -> Float[Tensor, "head_inputs batch pos d_model"]:
    """Σ_k J_lnᵀ W_d g_d of every head input d of one layer: the gradient at the residual stream that ln1 read,
    with g_d the gradient at d's q, k or v and J_ln the norm's Jacobian at run k.

    At each position, with x̂ and σ of run k and γ the norm's gain,
        J_lnᵀ W_d g = W̃_d (g/σ) − x̂ (h · g/σ) / d_model,
    where W̃_d = γ ⊙ W_d with each column centred over d_model (LayerNorm only) and h = x̂ γ W_d is the
    q, k or v the run computed minus its bias and the norm's offset times W_d. The first term is linear in
    Σ_k g/σ and goes through one projection to d_model for all runs; the second is a product of per-position
    scalars with x̂, of rank k. Neither forms a [run, head input, batch, pos, d_model] tensor."""
    norm = w.ln1.at(layer)
    g = grads.qkv[layer]  # [k, head inputs, batch, pos, d_head]
    K, n_in, B, P, E = g.shape
    if norm.kind is not None:
        xhat, sigma = norm.standardise(grads.resid_in[layer])  # [k, batch, pos, d_model], [k, batch, pos, 1]
        g = g / sigma[:, None]
    summed = g.sum(0).reshape(n_in, B * P, E)
    out = summed.new_empty(n_in, B * P, w.d_model)
    hg = []
    for (W, b), rows in zip((w.qkv_weights(i) for i in range(3)), _head_input_blocks(w)):
        W_tilde, b_tilde = _gained(norm, W[layer], b[layer])
        torch.matmul(summed[rows], W_tilde.transpose(-1, -2), out=out[rows])  # Σ_k W̃_d g/σ
        if norm.kind is not None:
            hg.append(((grads.qkv_values[layer][:, rows] - b_tilde[:, None, None, :]) * g[:, rows]).sum(-1))
    if norm.kind is not None:
        hg = torch.cat(hg, 1)  # h · g/σ, [k, head inputs, batch, pos]
        if K == 1:
            out.view(n_in, B, P, -1).addcmul_(hg[0, ..., None], xhat, value=-1.0 / xhat.shape[-1])
        else:
            rank_k = torch.bmm(hg.permute(2, 3, 1, 0).reshape(B * P, n_in, K),
                               xhat.permute(1, 2, 0, 3).reshape(B * P, K, -1))
            out.sub_(rank_k.transpose(0, 1), alpha=1.0 / xhat.shape[-1])
    return out.view(n_in, B, P, -1)


def _head_input_blocks(w: Weights) -> tuple[slice, slice, slice]:
    """Where the q, k and v inputs sit among a layer's head inputs (the graph's order)."""
    H, Hkv = w.n_heads, w.n_kv_heads
    return slice(0, H), slice(H, H + Hkv), slice(H + Hkv, H + 2 * Hkv)


def _gained(norm, W: Float[Tensor, "h d_model d_head"], b: Float[Tensor, "h d_head"]
            ) -> tuple[Float[Tensor, "h d_model d_head"], Float[Tensor, "h d_head"]]:
    """W̃ = γ ⊙ W, each column centred over d_model for a LayerNorm (the norm's Jacobian without its 1/σ and x̂
    terms, folded into the projection), and the bias of the projection of x̂ γ: b + offset · W."""
    if norm.kind is None:
        return W, b
    gain = norm.gain()
    gain = torch.ones_like(W[0, :, 0]) if gain is None else gain
    offset = norm.offset()
    b_tilde = b if not isinstance(offset, Tensor) else b + torch.einsum("d,hde->he", offset, W)
    if not norm.centred:
        return gain[:, None] * W, b_tilde
    mean = torch.einsum("d,hde->he", gain / W.shape[-2], W)
    return torch.addcmul(-mean[:, None, :], gain[:, None], W), b_tilde

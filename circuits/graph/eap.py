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
    (resample ablation), with no per-edge work but a (sources × destinations) contraction.
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
    clean_emb = embed(w, task.clean)[None]
    if ig_steps == 0:
        run, grads = factored_gradients(w, g, clean_emb, positions, task, metric)
        gm = run.metric
        scores = edge_scores(g, w, _ablation_difference(w, task, ablation, run.shared, positions), grads)
    else:
        with torch.no_grad():
            clean_run = shared_forward(w, clean_emb, positions, metric_queries_only=True)
        diff = _ablation_difference(w, task, ablation, clean_run, positions)
        scores, gm = integrated_gradient_scores(w, g, clean_emb[0], clean_emb[0] + diff[:g.n_embed], diff, positions,
                                                task, metric, ig_steps, clean_run.logits[0], progress=progress)
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
    sources = clean.sources[0]
    return mean_or_zero_values(ablation, sources) - sources


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
    """∂metric/∂(each destination's input) of unpatched runs, kept where contracting them with source
    differences is cheapest. Head inputs: the gradient at the norm's output `at_ln[l]` ([k, head inputs,
    batch, pos, d_model]: q, k, v of each head, pulled back through W_Q, W_K, W_V) with the residual stream
    that LayerNorm read (`resid_in[l]`, [k, batch, pos, d_model]); MLP inputs and the logits: at the input,
    summed over the k runs (`mlp_in[l]`, `final`: [batch, pos, d_model]).

    An edge's score needs diff_s · J_lnᵀ g_d, which equals (J_ln diff_s) · g_d: `edge_scores` applies the
    LayerNorm's Jacobian to the few sources below a layer instead of to its 3 · head destinations."""

    at_ln: tuple[Tensor, ...]
    resid_in: tuple[Tensor, ...]
    mlp_in: tuple[Tensor, ...]
    final: Tensor

    def dense(self, w: Weights, graph: ComputeGraph) -> Float[Tensor, "n_dst batch pos d_model"]:
        """Every destination's gradient at its input (the residual stream), summed over the k runs."""
        out = []
        for layer in range(graph.n_layers):
            out.append(w.ln1.at(layer).backward(self.resid_in[layer][:, None], self.at_ln[layer]).sum(0))
            if graph.has_mlp:
                out.append(self.mlp_in[layer][None])
        out.append(self.final[None])
        return torch.cat(out)


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
    one forward and one backward; each head's q, k and v gradient is carried back through its projection by
    hand, so the forward keeps one residual stream per layer instead of one input per head.
    Example: `run, grads = factored_gradients(w, graph, embed(w, task.clean)[None], task.positions, task, None)`"""
    with torch.enable_grad():
        emb = emb.detach().clone().requires_grad_(True)
        run = shared_forward(w, emb, positions, metric_queries_only=True)
        reference = run.logits[0].detach() if clean_logits_at is None else clean_logits_at
        gm = resolve_metric(task, metric, _full_logits(reference, task))
        targets = [t for qkv in run.qkv for t in qkv] + list(run.mlp_in) + [run.final]
        grads = torch.autograd.grad(gm.fn(run.logits).sum(), targets, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr.detach() for gr, t in zip(grads, targets)]
    at_ln = []
    for layer in range(graph.n_layers):
        g = torch.cat(grads[3 * layer: 3 * layer + 3], 1)  # [k, q heads + k and v heads, batch, pos, d_head]
        W = torch.cat([w.W_Q[layer], w.W_K[layer], w.W_V[layer]])  # [q heads + k and v heads, d_model, d_head]
        K, n_in, B, P, E = g.shape
        at = g.reshape(K, n_in, B * P, E) @ W.transpose(-1, -2)
        at_ln.append(at.view(K, n_in, B, P, -1))
    n = 3 * graph.n_layers
    return _GradRun(run, gm), DestinationGrads(
        at_ln=tuple(at_ln), resid_in=tuple(r.detach() for r in run.resid_in),
        mlp_in=tuple(gr.sum(0) for gr in grads[n: n + len(run.mlp_in)]), final=grads[-1].sum(0),
    )


def integrated_gradient_scores(
    w: Weights,
    graph: ComputeGraph,
    clean: Float[Tensor, "n_embed batch pos d_model"],
    ablated: Float[Tensor, "n_embed batch pos d_model"],
    diff: Float[Tensor, "n_src batch pos d_model"],
    positions: Tensor,
    task: Task,
    metric: MetricSpec,
    steps: int,
    clean_logits_at: Tensor,
    *,
    progress: bool = False,
) -> tuple[Float[Tensor, "n_src n_dst"], GraphMetric]:
    """Edge scores with the destination gradients averaged over `steps` points α = 1/m … 1 from the ablated
    to the clean embeddings, in batched forwards (each against the clean run's metric reference).
    Example: `scores, metric = integrated_gradient_scores(w, g, clean, ablated, diff, pos, task, None, 8, ref)`"""
    alphas = torch.arange(1, steps + 1, device=clean.device, dtype=clean.dtype) / steps
    per_step = clean.numel() * (4 + 3 * graph.n_layers)
    total, gm = None, None
    with tqdm(total=steps, desc="EAP-IG steps", disable=not progress, leave=False) as bar:
        for a in alphas.split(max(1, MAX_CHUNK_FLOATS // per_step)):
            emb = ablated[None] + a[:, None, None, None, None] * (clean - ablated)[None]
            run, grads = factored_gradients(w, graph, emb, positions, task, metric, clean_logits_at)
            gm = run.metric
            part = edge_scores(graph, w, diff, grads)
            total = part if total is None else total + part
            bar.update(len(a))
    return total / steps, gm


def edge_scores(
    graph: ComputeGraph, w: Weights, diff: Float[Tensor, "n_src batch pos d_model"], grads: DestinationGrads
) -> Float[Tensor, "n_src n_dst"]:
    """Σ_{k, batch, pos, d_model} diff_s · grad_d for every edge (zero where there is none): per attention
    layer, the source differences below it go through each run's LayerNorm Jacobian and meet the gradients at
    the LayerNorm's output in one matrix product; MLP inputs and the logits take the gradient at their input.
    Example: `edge_scores(graph, w, ablated - clean, grads)` ([n_src, n_dst])"""
    scores = torch.zeros(graph.n_sources, graph.n_destinations, dtype=diff.dtype, device=diff.device)
    for stage in _stages(graph):
        n = stage.n_below
        if stage.kind is NodeKind.HEAD_INPUT:
            pushed = w.ln1.at(stage.layer).jvp(grads.resid_in[stage.layer], diff[:n])  # [k, n, batch, pos, d]
            at_ln = grads.at_ln[stage.layer]  # [k, 3 · head, batch, pos, d]
            scores[:n, stage.dst] = pushed.transpose(0, 1).reshape(n, -1) @ at_ln.transpose(0, 1).reshape(
                at_ln.shape[1], -1).T
        else:
            g = grads.final if stage.kind is NodeKind.LOGITS else grads.mlp_in[stage.layer]
            scores[:n, stage.dst] = diff[:n].flatten(1) @ g.reshape(-1, 1)
    return scores

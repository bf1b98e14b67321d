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

from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.graph.circuit import Circuit, top_edges
from circuits.graph.metric import resolve_metric
from circuits.graph.patching import Ablation, EdgePatcher
from circuits.results import LabelledResult
from circuits.tasks.task import Metric, Task


@dataclass(frozen=True, eq=False)
class EAPResult(LabelledResult):
    """Attribution scores for every edge: `values` [source, destination] (nan where there is no edge) ≈
    metric(edge ablated) − metric(clean). `circuit` holds them over all edges; `top_n(n)` selects."""

    circuit: Circuit | None = None

    def top(self, k: int = 5, *, by_abs: bool = True) -> list[tuple[tuple[str, ...], float]]:
        """The k scored edges with the largest (absolute) scores; unscored (nan) entries are skipped."""
        return top_edges(self.values, self.circuit.graph, k, by_abs=by_abs)

    def top_n(self, n: int) -> Circuit:
        """The n edges with the largest |score|."""
        return self.circuit.top_n(n)

    def to_networkx(self) -> nx.DiGraph:
        """Every edge with its score (shared DiGraph schema)."""
        return self.circuit.to_networkx()


def eap(
    model: TransformerBridge,
    task: Task,
    *,
    ig_steps: int = 0,
    metric: str | Metric | Callable[[Tensor], Tensor] | None = None,
    ablation: Ablation | str = Ablation.RESAMPLE,
) -> EAPResult:
    """EAP scores of every edge (`ig_steps=0`), or EAP-IG with `ig_steps` interpolation steps.

    `metric` defaults to the task's. Example: `eap(model, task, ig_steps=8).top_n(16).to_networkx()`
    """
    if not isinstance(ig_steps, int) or ig_steps < 0:
        raise ValueError(f"ig_steps must be an integer >= 0, got {ig_steps!r}")
    patcher = EdgePatcher(model, task, ablation)
    gm = resolve_metric(task, metric, patcher.clean_logits_full)
    if ig_steps == 0:
        grads = destination_gradients(patcher, gm.fn, patcher.embed(task.clean))[0]
    else:
        grads = integrated_gradients(patcher, gm.fn, ig_steps)
    diff = patcher.ablated - patcher.clean_sources
    scores = torch.einsum("sbpm,dbpm->sd", diff.expand_as(patcher.clean_sources), grads)
    g = patcher.graph
    scores = scores.detach().float().cpu().masked_fill(~g.valid, float("nan"))
    method = "eap-ig" if ig_steps else "eap"
    attrs = dict(model=patcher.weights.description, method=method, metric=gm.name, ablation=patcher.ablation.value)
    return EAPResult(
        values=scores, dims=("source", "destination"), labels=(g.source_names, g.destination_names), method=method,
        info=dict(metric=gm.name, ablation=patcher.ablation.value, ig_steps=ig_steps),
        circuit=Circuit.full(g, scores, **attrs),
    )


def destination_gradients(
    patcher: EdgePatcher,
    metric: Callable[[Tensor], Tensor],
    emb: Float[Tensor, "k 2 batch pos d_model"],
) -> Float[Tensor, "k n_dst batch pos d_model"]:
    """∂metric/∂x_d for every destination of the unpatched run from embedding sources `emb` (one per row k)."""
    with torch.enable_grad():
        emb = emb.detach().clone().requires_grad_(True)
        run = patcher.forward(emb, None, keep=True)
        values = metric(run.logits)
        grads = torch.autograd.grad(values.sum(), run.stage_inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, run.stage_inputs)]
    return torch.cat(grads, dim=1).detach()


def integrated_gradients(
    patcher: EdgePatcher, metric: Callable[[Tensor], Tensor], steps: int
) -> Float[Tensor, "n_dst batch pos d_model"]:
    """The destination gradients averaged over `steps` points α = 1/m … 1 from the ablated to the clean
    embeddings, in batched forwards."""
    clean = patcher.embed(patcher.task.clean)[0]
    ablated = patcher.ablated[:2].expand_as(clean)
    alphas = torch.arange(1, steps + 1, device=patcher.device, dtype=clean.dtype) / steps
    total = None
    chunk = max(1, patcher.chunk_size() // 2)
    for a in alphas.split(chunk):
        emb = ablated[None] + a[:, None, None, None, None] * (clean - ablated)[None]
        g = destination_gradients(patcher, metric, emb).sum(0)
        total = g if total is None else total + g
    return total / steps

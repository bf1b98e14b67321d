"""Small helpers shared by test files (importable as `helpers`: pytest puts this folder on sys.path) and by
the benchmarks (`tests.helpers`, from the repository root)."""

from __future__ import annotations

import torch

from circuits.graph.metric import resolve_metric
from circuits.graph.patching import EdgePatcher


def scale_matrices(model, factor: float):
    """`model` with every 2-D parameter (the weight matrices) multiplied by `factor`, in place: at the init std of
    0.02 a random Hugging Face model's output barely depends on its input, so patches move the metric near rounding."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(factor)
    return model


def perturb_norms_and_biases(model, seed: int = 0) -> None:
    """Give LayerNorm weights/biases and every bias non-trivial values (init leaves them 1 and 0), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def reference_acdc(model, task, *, threshold, metric=None, ablation="resample", order="latest_first",
                   start=None, destinations=None):
    """The plain ACDC algorithm: for each destination from the logits back, for each incoming edge in turn,
    one full forward of the patched model (from the embeddings, every edge mask applied); remove the edge
    when the loss rises by less than `threshold`. A destination whose head/MLP no longer has an outgoing
    edge is dropped without a forward. Returns (mask, n_forwards). `start` (a mask, default every edge) and
    `destinations` (default all, visited from the last) run it on part of a walk (the benchmarks' samples)."""
    p = EdgePatcher(model, task, ablation)
    loss = resolve_metric(task, metric, p.clean_logits_full).loss
    g = p.graph
    mask = (g.valid if start is None else start).clone()
    current = float(loss(p.run(mask[None]))[0])
    n_forwards = 1
    for d in reversed(range(g.n_destinations)) if destinations is None else destinations:
        nodes = g.sources_of_destination(d)
        if nodes and not mask[nodes].any():
            mask[:, d] = False
            continue
        sources = mask[:, d].nonzero().flatten().tolist()
        for s in sources[::-1] if order == "latest_first" else sources:
            trial = mask.clone()
            trial[s, d] = False
            value = float(loss(p.run(trial[None]))[0])
            n_forwards += 1
            if value - current < threshold:
                mask, current = trial, value
    return mask, n_forwards

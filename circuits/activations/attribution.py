"""Attribution patching: the first-order estimate of every component's patching effect at once."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from circuits.activations import engine
from circuits.activations.patching import Backend, Direction
from circuits.activations.readout import Reader
from circuits.activations.result import PatchResult, make_result
from circuits.activations.sites import (
    Site,
    check_heads,
    check_positions,
    parse_site,
    result_axes,
    site_heads,
    token_labels,
)
from circuits.tasks import Task
from circuits.tasks.metrics import MetricSpec, checked_scalar, resolve
from circuits.validate import check_finite, check_task


def attribution_patch(
    model: TransformerBridge,
    task: Task,
    site: Site | str,
    *,
    per_position: bool = True,
    direction: Direction = "denoising",
    heads: list[tuple[int, int]] | None = None,
    positions: list[int] | Int[Tensor, " n"] | None = None,
    metric: MetricSpec = None,
    backend: Backend = "auto",
    progress: bool = True,
) -> PatchResult:
    """Estimate `activation_patch` to first order: (source − base activation) · ∂metric/∂activation.

    The gradient is taken on the run being patched (denoising: the corrupted run; noising: the clean run) and
    summed over each component's entries and the batch, so `effect` ≈ metric(patched) − metric(unpatched),
    the sign of activation patching (exact when the metric is linear in the activation). Cost: one forward +
    backward on the run being patched and one forward on the other, whatever the number of components.
    Same axes, labels and result type as `activation_patch`; `raw` = unpatched metric + estimate.
    `metric`: the task's (None), "logit_diff", "logprob", "kl", or a callable of the logits at the metric
    positions [batch, n, vocab] → scalar, as for `activation_patch`.
    Note: with the KL metric the gradient at the clean run is zero, so noising estimates are all 0.
    A progress bar over the two stages (the runs with the backward pass, then the contraction) unless
    `progress=False`.

    Example: `attribution_patch(model, task, "z").top(5)`
    """
    check_task(model, task)
    site = parse_site(model, site)
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction: expected 'denoising' or 'noising', got {direction!r}")
    resolved = resolve(task, metric)
    task, custom = resolved.task, resolved.on_full_logits() if resolved.is_custom else None
    L, P = model.cfg.n_layers, task.seq_len
    H = site_heads(model, site)
    pos_list = check_positions(positions, P)
    head_list = check_heads(heads, L, H)
    if heads is not None and not site.per_head:
        raise ValueError(f"heads: site {site.value!r} is not per head; heads applies to z, q, k, v and pattern")
    if backend == "auto":
        backend = "hooks" if engine.unsupported(model) else "weights"
    if backend not in ("weights", "hooks"):
        raise ValueError(f"backend: expected 'auto', 'weights' or 'hooks', got {backend!r}")
    grab = _weights_grads if backend == "weights" else _hook_grads
    with tqdm(total=2, desc=f"attribution {site.value}", disable=not progress, leave=False) as bar:
        base_acts, grads, src_acts, clean_m, corrupted_m = grab(model, task, site, direction, custom)
        bar.update()
        scores = torch.stack([_contract(site, d, g) for d, g in zip(
            [s - b for s, b in zip(src_acts, base_acts)], grads)]).cpu()  # [layer, (head,) pos]
        bar.update()
    check_finite(scores, "metric", "components' first-order estimates (its value or gradient is not finite)")
    mask = torch.zeros(P, dtype=torch.bool)
    mask[pos_list if pos_list is not None else slice(None)] = True
    scores = scores.masked_fill(~mask, math.nan) if per_position else (scores * mask).sum(-1)
    if head_list is not None:
        keep = torch.zeros(L, H, dtype=torch.bool)
        for layer, head in head_list:
            keep[layer, head] = True
        scores = scores.masked_fill(~keep.view(L, H, *([1] * (scores.ndim - 2))), math.nan)
    unpatched = corrupted_m if direction == "denoising" else clean_m
    dims, labels = result_axes(site, per_position, L, H, token_labels(model, task.clean[0]))
    return make_result(
        unpatched + scores, method="attribution_patch", dims=dims, labels=labels, site=site.value,
        direction=direction, metric=resolved.name, clean=clean_m,
        corrupted=corrupted_m, info={"backend": backend, "per_position": per_position},
    )


def _contract(site: Site, delta: Tensor, grad: Tensor) -> Tensor:
    """Σ over batch and the activation's own dims: [pos] for resid sites, [head, pos] for heads,
    [head, dest] for the pattern."""
    prod = delta * grad
    if site is Site.PATTERN:  # [batch, head, dest, src]
        return prod.sum(dim=(0, 3))
    if site.per_head:  # [batch, pos, head, d_head]
        return prod.sum(dim=(0, 3)).T
    return prod.sum(dim=(0, 2))  # [batch, pos, d_model]


def _runs(task: Task, direction: str) -> tuple[Tensor, Tensor]:
    return (task.corrupted, task.clean) if direction == "denoising" else (task.clean, task.corrupted)


def _weights_grads(model, task, site, direction, custom):
    w = engine.weights_of(model)
    dev = w.W_E.device
    base_tokens, src_tokens = (t.to(dev) for t in _runs(task, direction))
    with torch.no_grad():
        src = engine.run(w, src_tokens)
    with torch.enable_grad():
        base = _run_with_grad(w, base_tokens)
        clean_final = (src if direction == "denoising" else base).final.detach()
        reader = Reader.for_task(w, task, clean_final, custom)
        value = reader.score(base.final[:, reader.read_pos])
        acts = base.site(site.value)
        grads = torch.autograd.grad(value, acts, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]
    with torch.no_grad():
        other = reader.score(src.final[:, reader.read_pos])
    base_m, src_m = float(value.detach()), float(other)
    clean_m, corrupted_m = (src_m, base_m) if direction == "denoising" else (base_m, src_m)
    return [a.detach() for a in acts], grads, src.site(site.value), clean_m, corrupted_m


def _run_with_grad(w: engine.Weights, tokens: Tensor) -> engine.Run:
    """`engine.run` with the embeddings marked as requiring grad, so every activation is in the graph."""
    leaf = w.W_E.detach().requires_grad_(True)
    return engine.run(replace(w, W_E=leaf), tokens)


def _hook_grads(model, task, site, direction, custom):
    names = [site.hook_name(layer) for layer in range(model.cfg.n_layers)]
    base_tokens, src_tokens = _runs(task, direction)
    with torch.no_grad():
        src_logits, src_cache = model.run_with_cache(src_tokens, names_filter=lambda n: n in names)
    src_acts = [src_cache[n] for n in names]
    saved: dict[str, Tensor] = {}

    def save(act: Tensor, hook) -> Tensor:
        saved[hook.name] = act
        return act

    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, save) for n in names]):
        logits = model(base_tokens)
        clean_logits = (src_logits if direction == "denoising" else logits).detach()
        score = (lambda x: checked_scalar(custom(x))) if custom is not None else (lambda x: task.score(x, clean_logits))
        value = score(logits)
        acts = [saved[_canonical(model, n)] if n not in saved else saved[n] for n in names]
        grads = torch.autograd.grad(value, acts, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]
    with torch.no_grad():
        other = float(score(src_logits))
    base_m = float(value.detach())
    clean_m, corrupted_m = (other, base_m) if direction == "denoising" else (base_m, other)
    return [a.detach() for a in acts], grads, src_acts, clean_m, corrupted_m


def _canonical(model: TransformerBridge, name: str) -> str:
    return model.hook_dict[name].name

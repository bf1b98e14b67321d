"""Activation patching, batched: many components' patched runs in one vectorised forward."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from circuits.activations import engine, hooked
from circuits.activations.readout import Reader, task_metric
from circuits.activations.result import PatchResult, make_result
from circuits.activations.site_patch import patched_resid
from circuits.activations.sites import (
    Components,
    Site,
    check_heads,
    check_positions,
    enumerate_components,
    parse_site,
    result_axes,
    site_heads,
    token_labels,
)
from circuits.tasks import Task
from circuits.tasks.metrics import MetricSpec, resolve
from circuits.validate import check_finite, check_number, check_task

Direction = Literal["denoising", "noising"]
Backend = Literal["auto", "weights", "hooks"]


def activation_patch(
    model: TransformerBridge,
    task: Task,
    site: Site | str,
    *,
    per_position: bool = True,
    direction: Direction = "denoising",
    heads: list[tuple[int, int]] | None = None,
    positions: list[int] | Int[Tensor, " n"] | None = None,
    batch_limit: int | None = None,
    progress: bool = True,
    metric: MetricSpec = None,
    backend: Backend = "auto",
    memory_mb: float | int = 512,
) -> PatchResult:
    """Patch each component of `site` from one run into the other and score the task's metric.

    Denoising runs the corrupted input and patches in clean activations; noising runs the clean input and
    patches in corrupted ones. Components: every layer (× head for z, q, k, v, pattern) × position when
    `per_position` (the destination position for `pattern`), else all positions (those in `positions`) at
    once. Result values: [layer, pos] / [layer] for resid_pre, resid_mid, resid_post, attn_out;
    [layer, head, pos] / [layer, head] for z, q, k, v (k and v: key/value heads under grouped-query
    attention); [layer, head, dest_pos] / [layer, head] for pattern;
    normalised (0 = corrupted baseline, 1 = clean) with the raw metric in `.raw`. `heads` ((layer, head)
    pairs) and `positions` restrict the components (the rest are NaN).

    The components of a layer run together, stacked along the batch in chunks of at most `batch_limit`
    (default: what fits in `memory_mb`; on a CPU also 2-8 MiB of residual stream per chunk: enough work per
    operation for small models, within the caches for large ones), resuming from the cached residual stream
    at that layer. The `weights` backend (every architecture `circuits.engine` runs; `auto` picks it) computes the
    forward from the model's weights, recomputes only positions at or after the patch, updates attention for
    a single changed position in O(d_head) per query (see `key_update`), reads only the logits the metric
    reads, and runs nothing for a component whose patch writes the base run's own value (bitwise: e.g. every
    position before the first token where clean and corrupted differ); `hooks` runs the bridge itself with
    one temporary hook per stacked forward. `metric`: the task's (None), "logit_diff", "logprob", "kl", or a
    callable of the logits at the metric positions [batch, n, vocab] → scalar (`circuits.tasks.metrics`).

    Example: `activation_patch(model, induction_task(32, 17, 50), "z").top(5)`
    """
    check_task(model, task)
    site = parse_site(model, site)
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction: expected 'denoising' or 'noising', got {direction!r}")
    resolved = resolve(task, metric)
    task, custom = resolved.task, resolved.on_full_logits() if resolved.is_custom else None
    if batch_limit is not None and (isinstance(batch_limit, bool) or not isinstance(batch_limit, int)
                                    or batch_limit < 1):
        raise ValueError(f"batch_limit: expected a positive integer, got {batch_limit!r}")
    check_number(memory_mb, "memory_mb", positive=True)
    L, P = model.cfg.n_layers, task.seq_len
    H = site_heads(model, site)
    pos_list = check_positions(positions, P)
    head_list = check_heads(heads, L, H)
    if backend == "auto":
        backend = "hooks" if engine.unsupported(model) else "weights"
    if backend not in ("weights", "hooks"):
        raise ValueError(f"backend: expected 'auto', 'weights' or 'hooks', got {backend!r}")
    comps = enumerate_components(site, L, H, P, per_position=per_position, heads=head_list, positions=pos_list)
    if heads is not None and not site.per_head:
        raise ValueError(f"heads: site {site.value!r} is not per head; heads applies to z, q, k, v and pattern")
    shape = (L, H, P) if site.per_head else (L, P)
    shape = shape if per_position else shape[:-1]
    run = _run_weights if backend == "weights" else _run_hooks
    raw, clean_m, corrupted_m = run(model, task, site, comps, direction, custom, batch_limit, memory_mb, progress,
                                    torch.full(shape, math.nan))
    check_finite(raw[_computed(comps, shape)], "metric", "patched runs")
    dims, labels = result_axes(site, per_position, L, H, token_labels(model, task.clean[0]))
    return make_result(
        raw, method="activation_patch", dims=dims, labels=labels, site=site.value, direction=direction,
        metric=resolved.name, clean=clean_m, corrupted=corrupted_m,
        info={"backend": backend, "per_position": per_position},
    )


def _computed(comps: list[Components], shape: tuple[int, ...]) -> Tensor:
    """Which entries of the result the components fill (the rest are NaN by `heads`/`positions`)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for c in comps:
        for idx in c.index:
            mask[idx] = True
    return mask


def _chunk_size(batch_limit: int | None, memory_mb: float | int, per_component_bytes: int) -> int:
    fit = max(1, int(memory_mb * 2**20 // max(per_component_bytes, 1.0)))
    return min(fit, batch_limit) if batch_limit is not None else fit


def _chunks(comps: list[Components], size: Callable[[Components], int], progress: bool, desc: str):
    """Each layer's components in chunks of `size(c)`, behind a progress bar."""
    parts = [c.chunk(i, i + n) for c in comps for n in [size(c)] for i in range(0, len(c), n)]
    return tqdm(parts, desc=desc, disable=not progress, leave=False)


# On a CPU a chunk's recomputed residual streams total at least 2 MiB (they stay in the L2 caches) and at most
# 8 MiB (the intermediates, a few times that, stay below the 32 MiB up to which `settle_allocator` has freed
# memory reused); in between, enough rows for about 2**29 multiply-adds per layer, which amortises the fixed
# cost of a layer's ~50 operations (the measurements behind these bounds: docs/performance.md).
_CPU_CHUNK_BYTES = (2 * 2**20, 8 * 2**20)
_CPU_CHUNK_MACS = 2**29
_SINGLE_ROW_SITES = (Site.RESID_PRE, Site.RESID_MID, Site.RESID_POST, Site.ATTN_OUT, Site.Z, Site.Q, Site.PATTERN)


def _entered_block(site: Site, layer: int) -> int:
    """The first block whose input a patch of `site` at `layer` changes: that block for resid_pre, the next one
    for every other site (its output feeds the residual stream after the block reads it)."""
    return layer if site is Site.RESID_PRE else layer + 1


def _cache_chunk(site: Site, c: Components, w: engine.Weights, batch: int, keep: int, n_read: int) -> int:
    """Components per chunk whose recomputed residual streams total the bytes `_chunk_bytes` sets: a
    per-position patch that first enters the last block recomputes only the read positions there, others every
    position."""
    d_model = w.W_E.shape[1]
    first = _entered_block(site, c.layer)
    single = c.pos is not None and site in _SINGLE_ROW_SITES
    rows = n_read if single and first >= w.n_layers - 1 else keep
    return max(1, _chunk_bytes(w) // (4 * batch * rows * d_model))


def _chunk_bytes(w: engine.Weights) -> int:
    """Residual-stream bytes per chunk: rows for `_CPU_CHUNK_MACS` multiply-adds per layer, within
    `_CPU_CHUNK_BYTES`."""
    d_model = w.W_E.shape[1]
    d_mlp = w.W_in.shape[-1] if w.has_mlp else 0
    macs_per_row = 4 * d_model**2 + 2 * d_model * d_mlp  # q, k, v, o and the MLP
    low, high = _CPU_CHUNK_BYTES
    return min(high, max(low, _CPU_CHUNK_MACS * 4 * d_model // macs_per_row))


def _run_weights(model, task, site, comps, direction, custom, batch_limit, memory_mb, progress, out):
    w = engine.weights_of(model)
    device = w.W_E.device
    P = task.seq_len
    # under causal attention later positions cannot reach the metric
    keep = P if custom is not None or not w.causal else int(task.positions.max()) + 1
    with torch.no_grad():
        clean, corrupted = engine.run_pair(w, task.clean[:, :keep].to(device), task.corrupted[:, :keep].to(device))
        reader = Reader.for_task(w, task, clean.final, custom)
        clean_m = float(reader.score(clean.final[:, reader.read_pos]))
        corrupted_m = float(reader.score(corrupted.final[:, reader.read_pos]))
        base, src = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
        base_m = corrupted_m if direction == "denoising" else clean_m
        live = []
        for c in comps:  # per-position components past `keep` leave the metric exactly unchanged
            for idx, p in zip(c.index, c.pos.tolist() if c.pos is not None else []):
                if p >= keep:
                    out[idx] = base_m
            c = _truncate(c, keep)
            same = _writes_base_value(site, c, base, src)  # so do patches that write the base run's own value
            for idx in [i for i, unchanged in zip(c.index, same.tolist()) if unchanged]:
                out[idx] = base_m
            live.append(_position_major(c.take(torch.nonzero(~same).flatten())))
        resume = engine.Resume(w, base, reader.read_pos)
        d_mlp = w.W_in.shape[-1] if w.has_mlp else 0
        per_comp = 4 * task.batch * keep * (12 * w.W_E.shape[1] + 3 * w.n_heads * keep + 2 * d_mlp)
        limit = _chunk_size(batch_limit, memory_mb, per_comp)

        def size(c: Components) -> int:
            if device.type != "cpu":
                return limit
            return min(limit, _cache_chunk(site, c, w, task.batch, keep, len(reader.read_pos)))

        for c in _chunks([c for c in live if len(c)], size, progress, f"patching {site.value}"):
            scores = reader.score(patched_resid(resume, src, site, c)).cpu()
            for idx, s in zip(c.index, scores):
                out[idx] = s
    return out, clean_m, corrupted_m


def _writes_base_value(site: Site, c: Components, base: engine.Run, src: engine.Run) -> Bool[Tensor, " k"]:
    """Which components' patch replaces the base run's activation by an equal one (bitwise, over the batch and
    every patched position): their patched run is the base run itself, so their metric is the baseline. This
    holds wherever clean and corrupted agree, e.g. at positions before the first differing token (attention
    is causal) and, in the embeddings' block, at every position whose tokens agree."""
    new, old = src.site(site.value)[c.layer], base.site(site.value)[c.layer]
    if site is Site.PATTERN:  # [batch, head, dest, src] -> [batch, dest, head, src]: positions first
        new, old = new.transpose(1, 2), old.transpose(1, 2)
    same = (new == old).flatten(3 if site.per_head else 2).all(-1).all(0)  # [pos, head] or [pos]
    if not site.per_head:
        same = same[:, None]
    heads = (torch.zeros(len(c), dtype=torch.long) if c.heads is None else c.heads).to(same.device)
    if c.pos is not None:
        return same[c.pos.to(same.device), heads].cpu()
    return same[c.pos_mask.to(same.device)].all(0)[heads].cpu()


def _position_major(c: Components) -> Components:
    """Per-position components ordered by position (heads of one position together), so that a chunk spans few
    positions: its suffix starts late."""
    if c.pos is None or c.heads is None:
        return c
    return c.take(torch.argsort(c.pos, stable=True))


def _truncate(c: Components, keep: int) -> Components:
    """The components touching positions < keep, with position masks cut to `keep`."""
    cut = replace(c, pos_mask=c.pos_mask[:keep])
    return cut if c.pos is None else cut.take(torch.nonzero(c.pos < keep).flatten())


def _run_hooks(model, task, site, comps, direction, custom, batch_limit, memory_mb, progress, out):
    device = next(model.parameters()).device
    clean_logits, clean_cache = hooked.cache_site(model, task.clean.to(device), site)
    corr_logits, corr_cache = hooked.cache_site(model, task.corrupted.to(device), site)
    score = task_metric(task, clean_logits, custom)
    with torch.no_grad():
        clean_m, corrupted_m = float(score(clean_logits)), float(score(corr_logits))
    base, src = (corr_cache, clean_cache) if direction == "denoising" else (clean_cache, corr_cache)
    P = task.seq_len
    cfg = model.cfg
    per_comp = 4 * task.batch * P * (2 * cfg.d_vocab + 16 * cfg.d_model + 3 * cfg.n_heads * P + 2 * (cfg.d_mlp or 0))
    limit = _chunk_size(batch_limit, memory_mb, per_comp)
    for c in _chunks(comps, lambda _: limit, progress, f"patching {site.value}"):
        scores = hooked.patch_chunk(model, site, c, base, src, score).cpu()
        for idx, s in zip(c.index, scores):
            out[idx] = s
    return out, clean_m, corrupted_m

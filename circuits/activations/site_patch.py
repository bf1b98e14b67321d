"""One chunk of patched runs on the weights engine: replace a site's activation for K components at one layer
and resume the forward from there (stacked along a leading component axis).

Per-position patches of resid_*, attn_out, z, q and pattern change the residual stream at a single position,
so the next block recomputes only that position's q, k, v (`Resume.from_single`); everything else resumes
from the patched layer's resid_mid or resid_pre.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.activations import engine
from circuits.activations.sites import Components, Site
from circuits.engine.primitives import hidden_keys


def patched_resid(r: engine.Resume, src: engine.Run, site: Site, c: Components
                  ) -> Float[Tensor, "k batch n d_model"] | engine.FinalRows:
    """The residual stream at the read positions of every patched run in `c` (base run `r.base`, source `src`);
    `FinalRows` when each run changes one position of the last residual stream only."""
    if site.per_head:
        return _head_site(r, src, site, c)
    return _layer_site(r, src, site, c)


def _rows(act: Float[Tensor, "batch pos *rest"], p: Int[Tensor, " k"]) -> Float[Tensor, "k batch *rest"]:
    return act[:, p].movedim(1, 0)


def _layer_site(r: engine.Resume, src: engine.Run, site: Site, c: Components) -> Tensor | engine.FinalRows:
    base, layer = r.base, c.layer
    if c.pos is not None:
        p = c.pos.to(base.final.device)
        if site is Site.RESID_PRE:
            return r.from_single(layer, "pre", p, _rows(src.resid_pre[layer], p))
        if site is Site.RESID_POST:
            return r.from_single(layer + 1, "pre", p, _rows(src.resid_post[layer], p))
        if site is Site.RESID_MID:
            return r.from_single(layer, "mid", p, _rows(src.resid_mid[layer], p))
        row = _rows(base.resid_pre[layer], p) + _rows(src.attn_out[layer], p)
        return r.from_single(layer, "mid", p, row)
    mask = c.pos_mask.to(base.final.device)[:, None]
    new = torch.where(mask, src.site(site.value)[layer], base.site(site.value)[layer])[None]
    if site is Site.RESID_PRE:
        return r.from_resid(layer, new)
    if site is Site.RESID_POST:
        return r.from_resid(layer + 1, new)
    if site is Site.RESID_MID:
        return r.from_mid_all(layer, new)
    return r.from_mid_all(layer, base.resid_pre[layer] + new)


def _per_head(act: Float[Tensor, "batch pos head d"], h: Int[Tensor, " k"]) -> Float[Tensor, "k batch pos d"]:
    return act[:, :, h].movedim(2, 0)


def _head_site(r: engine.Resume, src: engine.Run, site: Site, c: Components) -> Tensor | engine.FinalRows:
    base, layer, w = r.base, c.layer, r.w
    dev = base.final.device
    h = c.heads.to(dev)
    P = base.final.shape[-2]
    pos = torch.arange(P, device=dev)
    if c.pos is not None:
        p = c.pos.to(dev)
        at_p = (pos[None, :] == p[:, None])[:, None, :, None]  # k 1 pos 1
        if site is Site.Z:
            return _from_head_row(r, layer, h, p, src.z[layer][:, p, h].movedim(1, 0))
        if site is Site.Q:
            q_row = src.q[layer][:, p, h].movedim(1, 0)
            pattern = _row_pattern(w, q_row, _per_head(base.k[layer], h), p)
            return _from_head_row(r, layer, h, p, torch.einsum("kbs,kbsd->kbd", pattern, _per_head(base.v[layer], h)))
        if site is Site.PATTERN:
            row = src.pattern[layer][:, h, p].movedim(1, 0)
            return _from_head_row(r, layer, h, p, torch.einsum("kbs,kbsd->kbd", row, _per_head(base.v[layer], h)))
        mask = at_p
    else:
        mask = c.pos_mask.to(dev)[None, None, :, None]
    if site is Site.Z:
        z_new = torch.where(mask, _per_head(src.z[layer], h), _per_head(base.z[layer], h))
        return _from_head_all(r, layer, h, z_new)
    if site is Site.PATTERN:
        pat = torch.where(mask, src.pattern[layer][:, h].movedim(1, 0), base.pattern[layer][:, h].movedim(1, 0))
        return _from_head_all(r, layer, h, pat @ _per_head(base.v[layer], h))
    qkv = {}
    for name in "qkv":
        b = _per_head(base.site(name)[layer], h)
        qkv[name] = torch.where(mask, _per_head(src.site(name)[layer], h), b) if name == site.value else b
    pattern = engine.attention_pattern(w, qkv["q"], qkv["k"], pos)
    return _from_head_all(r, layer, h, pattern @ qkv["v"])


def _row_pattern(w: engine.Weights, q_row: Float[Tensor, "k batch d"], k_h: Float[Tensor, "k batch pos d"],
                 p: Int[Tensor, " k"]) -> Float[Tensor, "k batch pos"]:
    """One query's causal attention pattern per component (query k at position p[k])."""
    scores = torch.einsum("kbd,kbsd->kbs", q_row, k_h) / w.attn_scale
    masked = hidden_keys(p, k_h.shape[-2])[:, None, :]
    return scores.masked_fill(masked, float("-inf")).softmax(-1).masked_fill(masked, 0.0)


def _from_head_row(r: engine.Resume, layer: int, h: Int[Tensor, " k"], p: Int[Tensor, " k"],
                   z_row: Float[Tensor, "k batch d_head"]) -> Tensor | engine.FinalRows:
    """Resume after head h[k] outputs `z_row[k]` at position p[k] only."""
    base = r.base
    delta = z_row - base.z[layer][:, p, h].movedim(1, 0)
    mid = _rows(base.resid_mid[layer], p) + torch.einsum("kbd,kdm->kbm", delta, r.w.W_O[layer, h])
    return r.from_single(layer, "mid", p, mid)


def _from_head_all(r: engine.Resume, layer: int, h: Int[Tensor, " k"], z_new: Float[Tensor, "k batch pos d_head"]
                   ) -> Tensor:
    """Resume after head h[k] outputs `z_new[k]` (every position)."""
    delta = z_new - _per_head(r.base.z[layer], h)
    mid = r.base.resid_mid[layer] + torch.einsum("kbpd,kdm->kbpm", delta, r.w.W_O[layer, h])
    return r.from_mid_all(layer, mid)

"""One chunk of patched runs on the weights engine: replace a site's activation for K components at one layer
and resume the forward from there (stacked along a leading component axis).

Per-position patches of resid_*, attn_out, z, q and pattern change the residual stream at a single position,
so the next block recomputes only that position's q, k, v (`Resume.from_single`); everything else resumes
from the patched layer's resid_mid or resid_pre. Queries and keys are patched before their rotary embedding
(TransformerLens's hook_q and hook_k); under grouped-query attention a k or v component is a key/value head
and its patch reaches every query head of its group.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.activations import engine
from circuits.activations.sites import Components, Site
from circuits.engine import hidden_keys, rotate


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


def _per_head(act: Float[Tensor, "batch pos head d"], h: Int[Tensor, "*kg"]
              ) -> Float[Tensor, "*kg batch pos d"]:
    """act's heads h (one per component, or a group per component) moved to the front."""
    return act[:, :, h].movedim((2, *range(3, 2 + h.ndim)), tuple(range(h.ndim)))


def _query_heads(w: engine.Weights, site: Site, h: Int[Tensor, " k"]) -> Int[Tensor, "k g"]:
    """The query heads each component's patch reaches: the key/value head's group for k and v under
    grouped-query attention (components are key/value heads there), the head itself otherwise."""
    if site in (Site.K, Site.V):
        return h[:, None] * w.group_size + torch.arange(w.group_size, device=h.device)
    return h[:, None]


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
        v_h = _per_head(engine.kv_of(w, base.v[layer]), h)
        if site is Site.Q:
            q_row = engine.rotate_rows(w, src.q[layer][:, p, h].movedim(1, 0), p)
            pattern = _row_pattern(w, q_row, _per_head(engine.kv_of(w, base.k_rot[layer]), h), p)
            return _from_head_row(r, layer, h, p, torch.einsum("kbs,kbsd->kbd", pattern, v_h))
        if site is Site.PATTERN:
            row = src.pattern[layer][:, h, p].movedim(1, 0)
            return _from_head_row(r, layer, h, p, torch.einsum("kbs,kbsd->kbd", row, v_h))
        mask = at_p[:, None]  # k 1 1 pos 1
    else:
        mask = c.pos_mask.to(dev)[None, None, None, :, None]
    qh = _query_heads(w, site, h)  # k g
    if site is Site.Z:
        z_new = torch.where(mask, _per_head(src.z[layer], qh), _per_head(base.z[layer], qh))
        return _from_head_all(r, layer, qh, z_new)
    if site is Site.PATTERN:
        pat = torch.where(mask, src.pattern[layer][:, qh].movedim((1, 2), (0, 1)),
                          base.pattern[layer][:, qh].movedim((1, 2), (0, 1)))
        return _from_head_all(r, layer, qh, pat @ _per_head(engine.kv_of(w, base.v[layer]), qh))
    kv = qh // w.group_size  # the key/value head each query head reads
    new = torch.where(mask, _per_head(src.site(site.value)[layer], h[:, None]),
                      _per_head(base.site(site.value)[layer], h[:, None]))  # k 1 batch pos d, before rotary
    q = rotate(w.rotary, new, pos) if site is Site.Q else _per_head(base.q_rot[layer], qh)
    k = rotate(w.rotary, new, pos) if site is Site.K else _per_head(base.k_rot[layer], kv)
    v = new if site is Site.V else _per_head(base.v[layer], kv)
    pattern = engine.attention_pattern(w, q, k, pos)
    return _from_head_all(r, layer, qh, pattern @ v)


def _row_pattern(w: engine.Weights, q_row: Float[Tensor, "k batch d"], k_h: Float[Tensor, "k batch pos d"],
                 p: Int[Tensor, " k"]) -> Float[Tensor, "k batch pos"]:
    """One query's attention pattern per component (query k at position p[k]; causal or not as the model is)."""
    scores = torch.einsum("kbd,kbsd->kbs", q_row, k_h) / w.attn_scale
    masked = hidden_keys(p, k_h.shape[-2], w.causal)[:, None, :]
    return scores.masked_fill(masked, float("-inf")).softmax(-1).masked_fill(masked, 0.0)


def _from_head_row(r: engine.Resume, layer: int, h: Int[Tensor, " k"], p: Int[Tensor, " k"],
                   z_row: Float[Tensor, "k batch d_head"]) -> Tensor | engine.FinalRows:
    """Resume after head h[k] outputs `z_row[k]` at position p[k] only."""
    base = r.base
    delta = z_row - base.z[layer][:, p, h].movedim(1, 0)
    mid = _rows(base.resid_mid[layer], p) + torch.einsum("kbd,kdm->kbm", delta, r.w.W_O[layer, h])
    return r.from_single(layer, "mid", p, mid)


def _from_head_all(r: engine.Resume, layer: int, qh: Int[Tensor, "k g"], z_new: Float[Tensor, "k g batch pos d_head"]
                   ) -> Tensor:
    """Resume after query heads qh[k] output `z_new[k]` (every position)."""
    delta = z_new - _per_head(r.base.z[layer], qh)
    mid = r.base.resid_mid[layer] + torch.einsum("kgbpd,kgdm->kbpm", delta, r.w.W_O[layer, qh])
    return r.from_mid_all(layer, mid)

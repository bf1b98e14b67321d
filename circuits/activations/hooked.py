"""Batched patching through the bridge's hooks: the fallback for architectures the weights engine lacks.

The K components of one layer run as one forward on K stacked copies of the batch, resuming at that layer
(`start_at_layer`) from the cached residual stream; one hook writes each copy's patch (in place, as
transformer_lens's own patch setters do). Hooks live in a
`model.hooks(...)` context that also covers the metric, so they are removed whatever raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.activations.sites import Components, Site, site_heads


def cache_site(model: TransformerBridge, tokens: Tensor, site: Site) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and the site's activations (plus every resid_pre) of one run, by hook name."""
    names = {site.hook_name(layer) for layer in range(model.cfg.n_layers)}
    names |= {Site.RESID_PRE.hook_name(layer) for layer in range(model.cfg.n_layers)}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return logits, {n: cache[n] for n in names}


def _mask(site: Site, c: Components, k: int, n_pos: int, n_heads: int, device: torch.device) -> Tensor:
    """Which entries of the site's activation each component replaces, shaped to broadcast against
    [k, batch, ...] in the hook's layout."""
    if c.pos is not None:
        pos = torch.nn.functional.one_hot(c.pos, n_pos).bool()  # k pos
    else:
        pos = c.pos_mask[None, :].expand(k, n_pos)
    if not site.per_head:
        return pos[:, None, :, None].to(device)
    head = torch.nn.functional.one_hot(c.heads, n_heads).bool()  # k head
    if site is Site.PATTERN:  # [batch, head, dest, src]
        return (head[:, :, None] & pos[:, None, :])[:, None, :, :, None].to(device)
    return (pos[:, :, None] & head[:, None, :])[:, None, :, :, None].to(device)  # [batch, pos, head, d]


def patch_chunk(model: TransformerBridge, site: Site, c: Components, base: dict[str, Tensor],
                src: dict[str, Tensor], metric: Callable[[Tensor], Tensor]) -> Tensor:
    """The metric of each of the K patched runs of `c`, from one stacked forward resuming at `c.layer`."""
    k = len(c)
    name = site.hook_name(c.layer)
    resid = base[Site.RESID_PRE.hook_name(c.layer)]
    batch, n_pos = resid.shape[:2]
    mask = _mask(site, c, k, n_pos, site_heads(model, site), resid.device)
    source = src[name]

    def patch(act: Tensor, hook: object) -> Tensor:
        # in place: on the bridge some hooks (resid_mid = ln2's input) alias the residual stream, and a
        # returned new tensor would reach only the next reader, not the stream itself
        stacked = act.view(k, batch, *act.shape[1:])
        stacked.copy_(torch.where(mask, source[None], stacked))
        return act

    x = resid.repeat(k, 1, 1)
    with torch.no_grad(), model.hooks(fwd_hooks=[(name, patch)]):
        logits = model(x, start_at_layer=c.layer)
        return metric(logits.reshape(k, batch, *logits.shape[1:]))

"""Patching sites: which activation, its hook, the components it splits into, and the axes of a result."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.results import head_labels, layer_labels, position_labels


class Site(str, Enum):
    """An activation that patching replaces, named as in TransformerLens's hooks."""

    RESID_PRE = "resid_pre"
    """The residual stream entering a block (`blocks.{l}.hook_resid_pre`)."""
    RESID_MID = "resid_mid"
    """The residual stream between attention and MLP (`blocks.{l}.hook_resid_mid`); models with MLPs only."""
    RESID_POST = "resid_post"
    """The residual stream leaving a block (`blocks.{l}.hook_resid_post`)."""
    ATTN_OUT = "attn_out"
    """The attention layer's output, all heads and b_O (`blocks.{l}.hook_attn_out`)."""
    Z = "z"
    """Each head's output before W_O (`blocks.{l}.attn.hook_z`); patching z patches the head's output."""
    Q = "q"
    """Each head's queries (`blocks.{l}.attn.hook_q`)."""
    K = "k"
    """Each head's keys (`blocks.{l}.attn.hook_k`)."""
    V = "v"
    """Each head's values (`blocks.{l}.attn.hook_v`)."""
    PATTERN = "pattern"
    """Each head's attention pattern [dest, src] (`blocks.{l}.attn.hook_pattern`); per position = per destination."""

    @property
    def per_head(self) -> bool:
        return self in (Site.Z, Site.Q, Site.K, Site.V, Site.PATTERN)

    def hook_name(self, layer: int) -> str:
        if self.per_head:
            return f"blocks.{layer}.attn.hook_{self.value}"
        return f"blocks.{layer}.hook_{self.value}"


def valid_sites(model: TransformerBridge) -> list[Site]:
    """The sites that exist in `model` (resid_mid only where there are MLPs after the attention, not in
    parallel blocks; none in a 0-layer model, whose embeddings are patched through the graph's tok_embed →
    logits edge: `circuits.graph.patch_edges`)."""
    if model.cfg.n_layers == 0:
        return []
    return [s for s in Site if not (s is Site.RESID_MID and (model.cfg.attn_only or _parallel(model)))]


def _parallel(model: TransformerBridge) -> bool:
    return bool(getattr(model.cfg, "parallel_attn_mlp", False))


def site_heads(model: TransformerBridge, site: Site) -> int:
    """The number of heads a per-head site splits into: key/value heads for k and v under grouped-query
    attention (one key/value head is shared by its group of query heads), query heads otherwise."""
    cfg = model.cfg
    if site in (Site.K, Site.V):
        return int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return int(cfg.n_heads)


def parse_site(model: TransformerBridge, site: Site | str) -> Site:
    """`site` as a Site, or a ValueError naming the valid ones for this model."""
    valid = valid_sites(model)
    if not valid:
        raise ValueError("model: a 0-layer model has no patching sites (every site is per layer); patch its "
                         "embeddings through the graph instead (acdc, eap, patch_edges on the tok_embed → logits edge)")
    names = ", ".join(s.value for s in valid)
    try:
        parsed = Site(site)
    except ValueError:
        raise ValueError(f"site: {site!r} is not a patching site; valid sites for this model: {names}") from None
    if parsed not in valid and _parallel(model):
        raise ValueError(f"site: {parsed.value!r} does not exist in this model (its attention and MLP run in "
                         f"parallel from the block's input); valid sites: {names}")
    if parsed not in valid:
        raise ValueError(
            f"site: {parsed.value!r} does not exist in this model (it is attention-only, so resid_mid equals "
            f"resid_post); valid sites: {names}"
        )
    return parsed


@dataclass(frozen=True)
class Components:
    """The components patched at one layer: `heads[k]` (per-head sites) and `pos[k]` (per-position patching),
    or `pos is None` with `pos_mask` the positions patched together. `index[k]` locates each in the result."""

    layer: int
    heads: Int[Tensor, " k"] | None
    pos: Int[Tensor, " k"] | None
    pos_mask: Tensor
    index: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.index)

    def take(self, order: Int[Tensor, " n"]) -> Components:
        """The components at indices `order` (a subset or a reordering), each keeping its result index."""
        return Components(self.layer, None if self.heads is None else self.heads[order],
                          None if self.pos is None else self.pos[order], self.pos_mask,
                          [self.index[i] for i in order.tolist()])

    def chunk(self, start: int, stop: int) -> Components:
        sl = slice(start, stop)
        return Components(self.layer, None if self.heads is None else self.heads[sl],
                          None if self.pos is None else self.pos[sl], self.pos_mask, self.index[sl])


def enumerate_components(
    site: Site, n_layers: int, n_heads: int, n_pos: int, *, per_position: bool,
    heads: list[tuple[int, int]] | None, positions: list[int] | None,
) -> list[Components]:
    """The components of `site` per layer, in result order; `index` entries index the result tensor."""
    pos_list = list(range(n_pos)) if positions is None else positions
    pos_mask = torch.zeros(n_pos, dtype=torch.bool)
    pos_mask[pos_list] = True
    out = []
    for layer in range(n_layers):
        if site.per_head:
            hs = [h for h in range(n_heads) if heads is None or (layer, h) in heads]
        else:
            hs = [None]
        index: list[tuple[int, ...]] = []
        hk: list[int] = []
        pk: list[int] = []
        for h in hs:
            for p in pos_list if per_position else [None]:
                index.append(tuple(i for i in (layer, h, p) if i is not None))
                hk.append(-1 if h is None else h)
                pk.append(-1 if p is None else p)
        if not index:
            continue
        out.append(Components(
            layer,
            torch.tensor(hk) if site.per_head else None,
            torch.tensor(pk) if per_position else None,
            pos_mask, index,
        ))
    return out


def result_axes(site: Site, per_position: bool, n_layers: int, n_heads: int,
                pos_labels: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """The dims and tick labels of a patching result for `site`."""
    dims: list[str] = ["layer"]
    labels: list[tuple[str, ...]] = [layer_labels(n_layers)]
    if site.per_head:
        dims.append("head")
        labels.append(head_labels(n_heads))
    if per_position:
        dims.append("dest_pos" if site is Site.PATTERN else "pos")
        labels.append(pos_labels)
    return tuple(dims), tuple(labels)


def token_labels(model: TransformerBridge, tokens: Int[Tensor, " pos"]) -> tuple[str, ...]:
    """Position labels `i:token` from the model's tokenizer (`model.bpe` or `model.tokenizer`), else `i`."""
    strs = None
    bpe = getattr(model, "bpe", None)
    try:
        if bpe is not None:
            strs = bpe.to_str_tokens(tokens)
        elif getattr(model, "tokenizer", None) is not None:
            strs = [str(s) for s in model.to_str_tokens(tokens)]
    except Exception:  # a tokenizer that cannot decode these ids: fall back to indices
        strs = None
    return position_labels(strs, len(tokens))


def check_positions(positions: list[int] | Tensor | None, n_pos: int, name: str = "positions") -> list[int] | None:
    """Positions as a sorted list of distinct ints in [0, n_pos), or a ValueError naming the bad ones."""
    if positions is None:
        return None
    pos = [int(p) for p in (positions.tolist() if isinstance(positions, Tensor) else positions)]
    bad = [p for p in pos if not 0 <= p < n_pos]
    if bad:
        raise ValueError(f"{name}: positions must lie in [0, {n_pos}) for these {n_pos}-token inputs; got {bad}")
    if not pos:
        raise ValueError(f"{name}: expected at least one position")
    return sorted(set(pos))


def check_heads(heads: list[tuple[int, int]] | None, n_layers: int, n_heads: int) -> list[tuple[int, int]] | None:
    """Heads as (layer, head) pairs in range, or a ValueError."""
    if heads is None:
        return None
    out = []
    for item in heads:
        try:
            layer, head = (int(i) for i in item)
        except (TypeError, ValueError):
            raise ValueError(f"heads: expected (layer, head) pairs, got {item!r}") from None
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"heads: ({layer}, {head}) is out of range for {n_layers} layers × {n_heads} heads")
        out.append((layer, head))
    if not out:
        raise ValueError("heads: expected at least one (layer, head) pair")
    return out

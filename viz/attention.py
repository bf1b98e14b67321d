"""Attention patterns: one head, or a grid of heads, with the token strings on both axes."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

from viz.labelled import as_array, draw_facets, draw_heatmap
from viz.theme import probability_colour


def draw_attention(
    pattern: Float[Tensor, "*heads dest src"],
    tokens: Sequence[str],
    *,
    heads: Sequence[str] | None = None,
    title: str = "attention pattern",
    facet_cols: int = 4,
) -> go.Figure:
    """Attention probabilities, destination (query) positions down, source (key) positions across.

    `pattern` is [dest, src] for one head or [head, dest, src] for a grid (one panel per head, named by
    `heads`, e.g. ["L0H2", "L1H1"]); `tokens` are the sequence's token strings, used as tick labels on both
    axes (repeated tokens stay separate positions). One colour scale, fixed to [0, 1].
    Example: `draw_attention(cache["blocks.1.attn.hook_pattern"][0], model.to_str_tokens(tokens[0]))`
    """
    z = as_array(pattern)
    n_dest, n_src = z.shape[-2:]
    if len(tokens) != n_src or n_dest > n_src:
        raise ValueError(f"tokens: expected {n_src} token strings for a [.., {n_dest}, {n_src}] pattern, "
                         f"got {len(tokens)}")
    dest_tokens = list(tokens)[n_src - n_dest:]
    if z.ndim == 2:
        if heads is not None and len(heads) != 1:
            raise ValueError(f"heads: a 2-axis pattern is one head, got {len(heads)} names")
        name = f"{title} · {heads[0]}" if heads else title
        return draw_heatmap(z, dest_tokens, tokens, row_dim="destination", col_dim="source", title=name,
                            value_name="attention", colour=probability_colour())
    if z.ndim != 3:
        raise ValueError(f"pattern: expected [dest, src] or [head, dest, src], got shape {tuple(z.shape)}")
    heads = [f"H{i}" for i in range(z.shape[0])] if heads is None else list(heads)
    if len(heads) != z.shape[0]:
        raise ValueError(f"heads: expected {z.shape[0]} names, got {len(heads)}")
    return draw_facets(z, ("head", "destination", "source"), (heads, dest_tokens, list(tokens)), title=title,
                       facet_cols=facet_cols, value_name="attention", colour=probability_colour())

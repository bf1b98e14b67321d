"""The attention mask (causal, or none for bidirectional attention), shared by both forward engines and the
one-key update."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def hidden_keys(q_pos: Int[Tensor, " nq"], n_keys: int) -> Bool[Tensor, "nq n_keys"]:
    """True where key j lies after the query at q_pos[i] (j > q_pos[i]): the keys that query cannot see.
    Example: `hidden_keys(torch.arange(3), 3)` (strictly upper triangular)"""
    return torch.arange(n_keys, device=q_pos.device)[None, :] > q_pos[:, None]


def causal_bias(q_pos: Int[Tensor, " nq"], n_keys: int, dtype: torch.dtype, *, causal: bool = True
                ) -> Float[Tensor, "nq n_keys"]:
    """0 where a query may attend to a key (key position <= query position), -inf elsewhere; all 0 when
    `causal` is False (bidirectional attention: every query sees every key).
    Example: `scores + causal_bias(torch.arange(P), P, scores.dtype)`"""
    if not causal:
        return torch.zeros(len(q_pos), n_keys, dtype=dtype, device=q_pos.device)
    return torch.zeros(len(q_pos), n_keys, dtype=dtype, device=q_pos.device).masked_fill_(
        hidden_keys(q_pos, n_keys), float("-inf"))

"""Attention-pattern scores of every head on repeated sequences: previous-token and induction attention.

These are measured from a forward pass (not from the weights), as in Olsson et al. (2022), and returned as the
same `HeadScores` result [layer, head] as the weight-only scores of `circuits.weights` (`previous_token_scores`,
`induction_scores` there read the weights alone; `method` tells the two apart):
- previous-token score of a head: mean attention from position i to position i−1, over every i ≥ 1;
- induction score of a head: on [BOS, x_1..x_T, x_1..x_T], the mean attention from the second-half
  position of x_k (position T+k) to the token after x_k's earlier copy (position k+1), for k = 1..T−1.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.results import HeadScores


def attention_patterns(
    model: TransformerBridge, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "layer batch head query key"]:
    """Every layer's attention pattern on `tokens`, stacked (no gradients; the model is not modified).

    Example: `attention_patterns(model, tokens).shape == (n_layers, batch, n_heads, pos, pos)`
    """
    if model.cfg.n_layers == 0:
        raise ValueError("model: a 0-layer model has no attention heads")
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n in names)
    return torch.stack([cache[name].float().cpu() for name in names])


def previous_token_scores(model: TransformerBridge, tokens: Int[Tensor, "batch pos"]) -> HeadScores:
    """Mean attention from each position i ≥ 1 to i−1, per head, on `tokens`.

    Example: `previous_token_scores(m, t).values[0, 2]`
    """
    patterns = attention_patterns(model, tokens)
    values = patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, 3))
    return HeadScores.of(values, "attention_previous_token_scores", measured_on=tuple(tokens.shape))


def induction_scores(model: TransformerBridge, tokens: Int[Tensor, "batch pos"], half_len: int) -> HeadScores:
    """Mean attention from position T+k to k+1 (k = 1..T−1) on [BOS, x, x] rows with |x| = T = `half_len`.

    Example: `induction_scores(model, repeated_random_tokens(64, 20, 64), 20).values[1]`
    """
    if tokens.shape[1] != 2 * half_len + 1:
        raise ValueError(
            f"tokens: expected [BOS, x, x] rows of length 2·half_len + 1 = {2 * half_len + 1}, got {tokens.shape[1]}"
        )
    patterns = attention_patterns(model, tokens)
    # query T+k reads key k+1: the diagonal at offset −(T−1), first T−1 entries after the first half
    stripe = patterns.diagonal(offset=-(half_len - 1), dim1=-2, dim2=-1)  # entry j: query T−1+j → key j
    values = stripe[..., 2 : half_len + 1].mean(dim=(1, 3))  # queries T+1 .. 2T−1 → keys 2 .. T
    return HeadScores.of(values, "attention_induction_scores", measured_on=tuple(tokens.shape), half_len=half_len)


def heads_above(scores: HeadScores | Float[Tensor, "layer head"], threshold: float) -> list[list]:
    """[[layer, head, score], ...] of every head whose score exceeds `threshold`, best first."""
    scores = scores.values if isinstance(scores, HeadScores) else scores
    found = [[layer, head, round(float(scores[layer, head]), 4)]
             for layer in range(scores.shape[0]) for head in range(scores.shape[1])
             if scores[layer, head] > threshold]
    return sorted(found, key=lambda row: -row[2])

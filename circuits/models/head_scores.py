"""Attention-pattern scores of every head on repeated sequences: previous-token and induction attention.

These are measured from a forward pass (not from the weights), as in Olsson et al. (2022), and returned as the
same `HeadScores` result [layer, head] as the weight-only scores of `circuits.weights` (`previous_token_scores`,
`induction_scores` there read the weights alone; `method` tells the two apart):
- previous-token score of a head: mean attention from position i to position i−1, over every i ≥ 1;
- induction score of a head: on [BOS, x_1..x_T, x_1..x_T], the mean attention from the second-half
  position of x_k (position T+k) to the token after x_k's earlier copy (position k+1), for k = 1..T−1 whose
  token x_k occurs once in x (on distinct random tokens, every k; on real code a repeated x_k has more than one
  earlier copy, and the mean skips it);
- attention by offset: the mean attention from the second-copy queries T+1..2T to the key at each offset q − key,
  which shows a head's shape whatever it is (an induction head peaks at offset T−1, a previous-token head at 1,
  an induction circuit built on a head that looks d tokens back instead of one peaks at T−1−d).
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


def _check_repeated(tokens: Tensor, half_len: int) -> None:
    if tokens.shape[1] != 2 * half_len + 1:
        raise ValueError(
            f"tokens: expected [BOS, x, x] rows of length 2·half_len + 1 = {2 * half_len + 1}, got {tokens.shape[1]}"
        )
    if not torch.equal(tokens[:, 1 : half_len + 1], tokens[:, half_len + 1 :]):
        raise ValueError("tokens: expected [BOS, x, x] rows whose second half repeats the first")


def unique_in_first_copy(tokens: Int[Tensor, "batch pos"], half_len: int) -> Tensor:
    """[batch, T] bool: whether x_k (k = 1..T) occurs exactly once in the row's first copy x."""
    x = tokens[:, 1 : half_len + 1]
    return (x[:, :, None] == x[:, None, :]).sum(-1) == 1


def induction_scores(model: TransformerBridge, tokens: Int[Tensor, "batch pos"], half_len: int) -> HeadScores:
    """Mean attention from position T+k to k+1 on [BOS, x, x] rows with |x| = T = `half_len`, over k = 1..T−1
    whose token x_k occurs once in x (all k on distinct tokens; a repeated x_k has several earlier copies).

    Example: `induction_scores(model, repeated_random_tokens(64, 20, 64), 20).values[1]`
    """
    _check_repeated(tokens, half_len)
    keep = unique_in_first_copy(tokens, half_len)[:, : half_len - 1].float()  # [batch, k = 1..T−1]
    if not keep.any():
        raise ValueError("tokens: no x_k with a single earlier copy to score (every token of x repeats within x)")
    patterns = attention_patterns(model, tokens)
    # query T+k reads key k+1: the diagonal at offset −(T−1), first T−1 entries after the first half
    stripe = patterns.diagonal(offset=-(half_len - 1), dim1=-2, dim2=-1)  # entry j: query T−1+j → key j
    stripe = stripe[..., 2 : half_len + 1]  # [layer, batch, head, k]: queries T+1 .. 2T−1 → keys 2 .. T
    values = (stripe * keep[None, :, None]).sum(dim=(1, 3)) / keep.sum()
    return HeadScores.of(values, "attention_induction_scores", measured_on=tuple(tokens.shape), half_len=half_len,
                         scored_positions=int(keep.sum()))


def attention_by_offset(
    model: TransformerBridge, tokens: Int[Tensor, "batch pos"], half_len: int
) -> Float[Tensor, "layer head offset"]:
    """Mean attention from the second-copy queries T+1..2T of [BOS, x, x] rows to the key at each offset
    q − key (0 .. 2T): entry [l, h, d] is head (l, h)'s mean attention to the key d tokens back.

    Example: `attention_by_offset(model, tokens, 20)[1, 0, 19]` is L1H0's induction score with k = 1..T counted
    """
    _check_repeated(tokens, half_len)
    patterns = attention_patterns(model, tokens)
    pos = tokens.shape[1]
    queries = torch.arange(half_len + 1, pos)
    offsets = queries[:, None] - torch.arange(pos)[None, :]  # [query, key]
    rows = patterns[:, :, :, queries]  # [layer, batch, head, query, key]
    one_hot = torch.nn.functional.one_hot(offsets.clamp_min(0), pos).float() * (offsets >= 0)[..., None]
    return torch.einsum("lbhqk,qkd->lhd", rows, one_hot) / (rows.shape[1] * len(queries))


def heads_above(scores: HeadScores | Float[Tensor, "layer head"], threshold: float) -> list[list]:
    """[[layer, head, score], ...] of every head whose score exceeds `threshold`, best first."""
    scores = scores.values if isinstance(scores, HeadScores) else scores
    found = [[layer, head, round(float(scores[layer, head]), 4)]
             for layer in range(scores.shape[0]) for head in range(scores.shape[1])
             if scores[layer, head] > threshold]
    return sorted(found, key=lambda row: -row[2])

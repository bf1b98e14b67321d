"""Head signatures from weights alone: copying, previous-token, induction; and a classification of every head.

- copying score: Σλ / Σ|λ| over the eigenvalues λ of the head's full OV circuit W_E·W_V·W_O·W_U (1: the
  head raises the logit of the token it attends to; −1: it suppresses it). The eigenvalues of the rank-d_head
  product come from the d_head × d_head matrix B·A of its factors (FactoredMatrix.eigenvalues).
- previous-token score: the mean attention from position i to i−1 (i = 1 … n_ctx−1) of the head's
  `positional_attention`, the pattern its QK circuit gives from position alone, read as the model reads its
  input: the average token plus the position, through the head's LayerNorm with the typical 1/σ of the
  embeddings at that position, and with the query and key biases. The same quantity as the activation-based
  score of `circuits.models.head_scores.previous_token_scores` on uniform random tokens of length n_ctx.
- induction score: the largest K-composition z-score from a previous-token head in an earlier layer, counted
  only for heads with a positive copying score (0 otherwise).
Copying and K-composition read the weights with LayerNorm centring and weights folded in by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.engine import Weights
from circuits.results import HeadScores, LabelledResult, head_labels, head_name, layer_labels
from circuits.weights._common import (
    _CENTRED_NORMS,
    check_layer_head,
    learned_positions,
    ln_bias,
    ln_weight,
    norm_type,
    require_attention,
    require_learned_positions,
    stacked,
    token_embedding,
)
from circuits.weights.circuits import attention_scale, full_ov_circuit
from circuits.weights.composition import composition_scores

LABELS: tuple[str, ...] = ("previous_token", "induction", "copying", "none")
SIGNATURES: tuple[str, ...] = ("previous_token", "previous_token_margin", "copying", "induction")


@dataclass(frozen=True, eq=False)
class HeadClassification(LabelledResult):
    """Evidence [layer, head, signature] and a label per head.

    Signatures: previous_token (mean attention to i−1 from position alone), previous_token_margin (that
    attention minus the most attention any other relative position gets), copying, induction.
    `head_labels[layer][head]` is one of LABELS; `heads(label)` lists the (layer, head) pairs with that label.
    `info["rule"]` states the rule and its thresholds; `info["induction_source"]` the previous-token head
    behind each induction score.
    """

    head_labels: tuple[tuple[str, ...], ...] = ()

    def heads(self, label: str) -> list[tuple[int, int]]:
        """The (layer, head) pairs labelled `label` (one of LABELS). Example: `result.heads("induction")`"""
        if label not in LABELS:
            raise ValueError(f"label must be one of {list(LABELS)}, got {label!r}")
        return [(lay, h) for lay, row in enumerate(self.head_labels) for h, lab in enumerate(row) if lab == label]


def _head_result(values: Tensor, method: str, **info) -> HeadScores:
    return HeadScores.of(values, method, **info)


def _copying_score(eigenvalues: Tensor) -> float:
    total = eigenvalues.abs().sum()
    return 0.0 if total == 0 else float(eigenvalues.sum().real / total)


def copying_scores(model: TransformerBridge, *, fold_layernorm: bool = True) -> HeadScores:
    """Σλ/Σ|λ| over the eigenvalues of each head's full OV circuit, [layer, head] in [−1, 1].

    A head whose full OV circuit is exactly zero scores 0. Example: `copying_scores(model).values[1]`
    """
    require_attention(model, "copying_scores")
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    with torch.no_grad():
        values = torch.tensor([
            [_copying_score(full_ov_circuit(model, lay, h, fold_layernorm=fold_layernorm).eigenvalues)
             for h in range(H)] for lay in range(L)
        ], device=Weights.of(model).device)
    return _head_result(values, "copying_scores", fold_layernorm=fold_layernorm)


def positional_input(model: TransformerBridge, layer: int) -> Float[Tensor, "n_ctx d_model"]:
    """What block `layer`'s attention reads at each position from the embeddings of an average token.

    Row i is LN(ē + W_pos[i]) with ē = mean_t W_E[t], where the LayerNorm (none, "LN" or "LNPre") divides by
    σ_i = (E_t ‖C·(W_E[t] + W_pos[i])‖² / d_model + eps)^½, the root-mean-square over the vocabulary of the
    centred residual at that position (computed in closed form), then applies its weight and bias. It reads
    the embeddings only: for layer ≥ 1 the earlier layers' outputs are left out.
    Example: `positional_input(model, 0) @ model.W_Q[0, 2]`
    """
    check_layer_head(model, layer)
    W_E, W_pos = token_embedding(model), learned_positions(model, "positional_input")
    x = W_E.mean(0) + W_pos
    nt = norm_type(model)
    if nt is None:
        return x
    if nt in _CENTRED_NORMS:
        W_E, W_pos, x = (v - v.mean(-1, keepdim=True) for v in (W_E, W_pos, x))
    mean_square = W_E.pow(2).sum(-1).mean() + 2 * W_pos @ W_E.mean(0) + W_pos.pow(2).sum(-1)  # E_t ‖e_t + p_i‖²
    x = x / (mean_square / W_E.shape[1] + model.cfg.eps).sqrt()[:, None]
    w, b = ln_weight(model, layer), ln_bias(model, layer)
    if w is not None:
        x = x * w
    return x if b is None else x + b


def positional_attention(model: TransformerBridge, layer: int, head: int) -> Float[Tensor, "query key"]:
    """The causal attention pattern a head gives from position alone, [n_ctx, n_ctx], read from its weights.

    Queries and keys are `positional_input` (an average token at each position, through the head's
    LayerNorm with the typical σ of that position) times W_Q + b_Q and W_K + b_K; scores are divided by the
    attention scale and softmaxed over keys 0 … i. On the zoo model attn2l-induction this reproduces the
    previous-token attention measured on random tokens within 0.05 (tests/test_weights_zoo.py).
    Example: `positional_attention(model, 0, 3).diagonal(-1).mean()`
    """
    check_layer_head(model, layer, head)
    require_learned_positions(model, "positional_attention")
    with torch.no_grad():
        x = positional_input(model, layer)
        q = x @ stacked(model, "W_Q")[layer, head] + stacked(model, "b_Q")[layer, head]
        k = x @ stacked(model, "W_K")[layer, head] + stacked(model, "b_K")[layer, head]
        scores = q @ k.T / attention_scale(model)
        n = scores.shape[0]
        causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        return scores.masked_fill(~causal, -torch.inf).softmax(-1)


def offset_profile(pattern: Float[Tensor, "query key"]) -> Float[Tensor, " offset"]:
    """Mean attention at each relative position o = i − j (o = 0 … n−1) over the queries i ≥ max(o, 1).

    Query 0 (which can only attend to itself) is left out. Example: `offset_profile(positional_attention(m, 0, 3))`
    """
    n = pattern.shape[0]
    return torch.stack([pattern.diagonal(-o)[1 if o == 0 else 0:].mean() for o in range(n)])


def uniform_previous_attention(n_ctx: int) -> float:
    """Mean attention to i−1 of a position-blind head (uniform over keys 0 … i): mean over i ≥ 1 of 1/(i+1)."""
    return sum(1 / (i + 1) for i in range(1, n_ctx)) / (n_ctx - 1)


def previous_token_scores(model: TransformerBridge) -> HeadScores:
    """Mean attention to position i−1 of each head's `positional_attention`, [layer, head] in [0, 1].

    `info["margin"]` [layer, head]: that attention minus the largest mean attention any other relative
    position gets (`offset_profile`; > 0 when the previous position is the head's favourite);
    `info["uniform"]`: the score of a position-blind head (`uniform_previous_attention(n_ctx)`).
    Example: `previous_token_scores(model).values.argmax()`
    """
    require_attention(model, "previous_token_scores")
    require_learned_positions(model, "previous_token_scores")
    if model.cfg.n_ctx < 3:
        raise ValueError(f"model: previous-token scores need n_ctx ≥ 3, got {model.cfg.n_ctx}")
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    profiles = torch.stack([torch.stack([offset_profile(positional_attention(model, lay, h)) for h in range(H)])
                            for lay in range(L)])  # [layer, head, offset]
    others = torch.cat([profiles[..., :1], profiles[..., 2:]], dim=-1)
    return _head_result(profiles[..., 1], "previous_token_scores", margin=profiles[..., 1] - others.max(-1).values,
                        uniform=uniform_previous_attention(int(model.cfg.n_ctx)))


def _is_previous_token(prev: HeadScores, lift: float) -> Tensor:
    return (prev.info["margin"] > 0) & (prev.values >= lift * prev.info["uniform"])


def induction_scores(
    model: TransformerBridge, *, previous_token_lift: float = 2.0, fold_layernorm: bool = True
) -> HeadScores:
    """Max K-composition z-score from any earlier previous-token head, for heads with positive copying score.

    A head counts as previous-token under the rule of `classify_heads` (its previous position is its most
    attended relative position, with at least `previous_token_lift` times a position-blind head's
    attention). Heads with no such source, or with copying score ≤ 0, score 0. `info["source"]` names the
    source head per head. Example: `induction_scores(model).values[1]`
    """
    require_attention(model, "induction_scores")
    require_learned_positions(model, "induction_scores")
    prev = previous_token_scores(model)
    copy = copying_scores(model, fold_layernorm=fold_layernorm)
    return _induction_from(model, _is_previous_token(prev, previous_token_lift), copy, fold_layernorm)


def _induction_from(model: TransformerBridge, is_prev: Tensor, copy: HeadScores, fold_layernorm: bool) -> HeadScores:
    comp = composition_scores(model, "K", fold_layernorm=fold_layernorm)
    z = torch.where(comp.mask & is_prev[:, :, None, None], comp.zscores, torch.full_like(comp.zscores, -torch.inf))
    best, where = z.flatten(0, 1).max(0)  # over sources → [lb, hb]
    H = is_prev.shape[1]
    ok = torch.isfinite(best) & (copy.values > 0)
    values = torch.where(ok, best, torch.zeros_like(best))
    source = tuple(tuple(head_name(int(i) // H, int(i) % H) if bool(ok[lb, hb]) else "" for hb, i in enumerate(row))
                   for lb, row in enumerate(where))
    return _head_result(values, "induction_scores", fold_layernorm=fold_layernorm, source=source)


def classify_heads(
    model: TransformerBridge,
    *,
    previous_token_lift: float = 2.0,
    induction_zscore_threshold: float = 5.0,
    copying_threshold: float = 0.7,
    fold_layernorm: bool = True,
) -> HeadClassification:
    """Label every head from its weight signatures, with the evidence.

    Rule (first that applies):
      - "previous_token": in the head's `positional_attention`, the previous position i−1 gets more mean
        attention than any other relative position (margin > 0), and at least `previous_token_lift` times what
        a position-blind head gives it (`uniform_previous_attention(n_ctx)`). Relative, not an absolute
        attention level: the attention a previous-token head gives i−1 falls with the number of keys (on
        attn2l-induction, 0.61 at 41 tokens and 0.39 at 64 for the same head), while "i−1 is its favourite
        position" does not depend on length;
      - "induction": its induction score (K-composition z-score from a previous-token head in an earlier
        layer, copying score > 0) ≥ `induction_zscore_threshold`;
      - "copying": its copying score ≥ `copying_threshold`;
      - else "none".
    `fold_layernorm` applies to the copying and K-composition scores; the positional reading always goes
    through the model's LayerNorm. Example: `classify_heads(model).heads("induction")`
    """
    require_learned_positions(model, "classify_heads")
    prev = previous_token_scores(model)
    copy = copying_scores(model, fold_layernorm=fold_layernorm)
    is_prev = _is_previous_token(prev, previous_token_lift)
    ind = _induction_from(model, is_prev, copy, fold_layernorm)
    L, H = prev.values.shape

    def label(lay: int, h: int) -> str:
        if is_prev[lay, h]:
            return "previous_token"
        if ind.values[lay, h] >= induction_zscore_threshold:
            return "induction"
        if copy.values[lay, h] >= copying_threshold:
            return "copying"
        return "none"

    evidence = torch.stack([prev.values, prev.info["margin"], copy.values, ind.values], dim=-1)
    return HeadClassification(
        values=evidence,
        dims=("layer", "head", "signature"),
        labels=(layer_labels(L), head_labels(H), SIGNATURES),
        method="classify_heads",
        info=dict(
            rule=dict(previous_token_lift=previous_token_lift, uniform_previous_attention=prev.info["uniform"],
                      induction_zscore=induction_zscore_threshold, copying=copying_threshold),
            induction_source=ind.info["source"],
            fold_layernorm=fold_layernorm,
        ),
        head_labels=tuple(tuple(label(lay, h) for h in range(H)) for lay in range(L)),
    )

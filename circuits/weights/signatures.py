"""Head signatures from weights alone: copying, previous-token, induction; and a classification of every head.

- copying score: Σλ / Σ|λ| over the eigenvalues λ of the head's full OV circuit W_E·W_V·W_O·W_U (1: the
  head raises the logit of the token it attends to; −1: it suppresses it). The eigenvalues of the rank-d_head
  product come from the d_head × d_head matrix B·A of its factors (FactoredMatrix.eigenvalues).
- previous-token score: the attention that the position-position QK circuit alone gives to position i−1,
  averaged over query positions i = 1 … n_ctx−1 (causal softmax over keys 0 … i).
- induction score: the largest K-composition z-score from a previous-token head in an earlier layer, counted
  only for heads with a positive copying score (0 otherwise).
All three read the weights with LayerNorm centring and weights folded in (not the input-dependent 1/σ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.results import LabelledResult, head_labels, head_name, layer_labels
from circuits.weights._common import require_attention
from circuits.weights.circuits import full_ov_circuit, full_qk_circuit
from circuits.weights.composition import composition_scores

LABELS: tuple[str, ...] = ("previous_token", "induction", "copying", "none")
SIGNATURES: tuple[str, ...] = ("previous_token", "copying", "induction")


@dataclass(frozen=True, eq=False)
class HeadScores(LabelledResult):
    """One score per head, [layer, head]."""


@dataclass(frozen=True, eq=False)
class HeadClassification(LabelledResult):
    """Evidence [layer, head, signature] (signatures: previous_token, copying, induction) and a label per head.

    `head_labels[layer][head]` is one of LABELS; `heads(label)` lists the (layer, head) pairs with that label.
    `info["thresholds"]` records the rule; `info["induction_source"]` the previous-token head behind each
    induction score.
    """

    head_labels: tuple[tuple[str, ...], ...] = ()

    def heads(self, label: str) -> list[tuple[int, int]]:
        if label not in LABELS:
            raise ValueError(f"label must be one of {list(LABELS)}, got {label!r}")
        return [(lay, h) for lay, row in enumerate(self.head_labels) for h, lab in enumerate(row) if lab == label]


def _head_result(values: Tensor, method: str, **info) -> HeadScores:
    L, H = values.shape
    return HeadScores(values=values, dims=("layer", "head"), labels=(layer_labels(L), head_labels(H)),
                      method=method, info=info)


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
        ], device=model.W_E.device)
    return _head_result(values, "copying_scores", fold_layernorm=fold_layernorm)


def _previous_token_attention(scores: Float[Tensor, "query key"]) -> float:
    n = scores.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    pattern = scores.masked_fill(~causal, -torch.inf).softmax(-1)
    return float(pattern.diagonal(offset=-1).mean())


def previous_token_scores(model: TransformerBridge, *, fold_layernorm: bool = True) -> HeadScores:
    """Mean attention to position i−1 under the position-position QK circuit alone, [layer, head] in [0, 1].

    Example: `previous_token_scores(model).values.argmax()`
    """
    require_attention(model, "previous_token_scores")
    if model.cfg.n_ctx < 2:
        raise ValueError(f"model: previous-token scores need n_ctx ≥ 2, got {model.cfg.n_ctx}")
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    with torch.no_grad():
        values = torch.tensor([
            [_previous_token_attention(
                full_qk_circuit(model, lay, h, query="position", key="position", fold_layernorm=fold_layernorm).AB)
             for h in range(H)] for lay in range(L)
        ], device=model.W_E.device)
    return _head_result(values, "previous_token_scores", fold_layernorm=fold_layernorm)


def induction_scores(
    model: TransformerBridge, *, previous_token_threshold: float = 0.5, fold_layernorm: bool = True
) -> HeadScores:
    """Max K-composition z-score from any earlier previous-token head, for heads with positive copying score.

    A head a counts as previous-token when `previous_token_scores ≥ previous_token_threshold`. Heads with no
    such source, or with copying score ≤ 0, score 0. `info["source"]` names the source head per head.
    Example: `induction_scores(model).top(2)`
    """
    require_attention(model, "induction_scores")
    prev = previous_token_scores(model, fold_layernorm=fold_layernorm)
    copy = copying_scores(model, fold_layernorm=fold_layernorm)
    return _induction_from(model, prev, copy, previous_token_threshold, fold_layernorm)


def _induction_from(
    model: TransformerBridge, prev: HeadScores, copy: HeadScores, previous_token_threshold: float, fold_layernorm: bool
) -> HeadScores:
    comp = composition_scores(model, "K", fold_layernorm=fold_layernorm)
    is_prev = prev.values >= previous_token_threshold  # [la, ha]
    z = torch.where(comp.mask & is_prev[:, :, None, None], comp.zscores, torch.full_like(comp.zscores, -torch.inf))
    best, where = z.flatten(0, 1).max(0)  # over sources → [lb, hb]
    H = prev.values.shape[1]
    ok = torch.isfinite(best) & (copy.values > 0)
    values = torch.where(ok, best, torch.zeros_like(best))
    source = tuple(tuple(head_name(int(i) // H, int(i) % H) if bool(ok[lb, hb]) else "" for hb, i in enumerate(row))
                   for lb, row in enumerate(where))
    return _head_result(values, "induction_scores", previous_token_threshold=previous_token_threshold,
                        fold_layernorm=fold_layernorm, source=source)


def classify_heads(
    model: TransformerBridge,
    *,
    previous_token_threshold: float = 0.5,
    induction_zscore_threshold: float = 5.0,
    copying_threshold: float = 0.7,
    fold_layernorm: bool = True,
) -> HeadClassification:
    """Label every head from its weight signatures, with the evidence.

    Rule (first that applies): "previous_token" if its previous-token score ≥ `previous_token_threshold`;
    "induction" if its induction score (K-composition z-score from a previous-token head, copying > 0) ≥
    `induction_zscore_threshold`; "copying" if its copying score ≥ `copying_threshold`; else "none".
    Example: `classify_heads(model).heads("induction")`
    """
    prev = previous_token_scores(model, fold_layernorm=fold_layernorm)
    copy = copying_scores(model, fold_layernorm=fold_layernorm)
    ind = _induction_from(model, prev, copy, previous_token_threshold, fold_layernorm)
    L, H = prev.values.shape

    def label(lay: int, h: int) -> str:
        if prev.values[lay, h] >= previous_token_threshold:
            return "previous_token"
        if ind.values[lay, h] >= induction_zscore_threshold:
            return "induction"
        if copy.values[lay, h] >= copying_threshold:
            return "copying"
        return "none"

    evidence = torch.stack([prev.values, copy.values, ind.values], dim=-1)
    return HeadClassification(
        values=evidence,
        dims=("layer", "head", "signature"),
        labels=(layer_labels(L), head_labels(H), SIGNATURES),
        method="classify_heads",
        info=dict(
            thresholds=dict(previous_token=previous_token_threshold, induction_zscore=induction_zscore_threshold,
                            copying=copying_threshold),
            induction_source=ind.info["source"],
            fold_layernorm=fold_layernorm,
        ),
        head_labels=tuple(tuple(label(lay, h) for h in range(H)) for lay in range(L)),
    )

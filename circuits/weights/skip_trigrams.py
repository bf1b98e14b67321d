"""Skip-trigrams of a head read from its token QK and OV circuits: "source … destination → output".

A head at destination token d attends to an earlier source token s with pre-softmax score QK[d, s] and then
raises the logit of output token o by OV[s, o]. Adding a constant to a row of QK (over keys) or of OV (over
outputs) changes neither the pattern nor the output distribution, so both rows are centred first; the
score of (s, d, o) is relu(QK_c[d, s]) · relu(OV_c[s, o]): large when d attends to s more than to a typical
token and s then promotes o more than a typical token. Exact as a reading of a 1-layer model's head
(positional terms and biases left out); in deeper models it reads only the path from the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.results import LabelledResult, head_name
from circuits.weights._common import check_layer_head, require_learned_positions
from circuits.weights.circuits import full_ov_circuit, full_qk_circuit


@dataclass(frozen=True, eq=False)
class SkipTrigrams(LabelledResult):
    """The top skip-trigrams of one head: `values` [rank] scores, `triples` [rank, 3] (source, destination, output)."""

    triples: Tensor | None = None

    def as_tuples(self) -> list[tuple[int, int, int, float]]:
        return [(*(int(t) for t in row), float(v)) for row, v in zip(self.triples, self.values)]


def skip_trigram_scores(model: TransformerBridge, layer: int, head: int) -> tuple[Tensor, Tensor]:
    """The centred, rectified QK [destination, source] and OV [source, output] tables (d_vocab × d_vocab each)."""
    check_layer_head(model, layer, head)
    require_learned_positions(model, "skip_trigram_scores")
    with torch.no_grad():
        qk = full_qk_circuit(model, layer, head).AB
        ov = full_ov_circuit(model, layer, head).AB
    qk = (qk - qk.mean(-1, keepdim=True)).clamp(min=0)
    ov = (ov - ov.mean(-1, keepdim=True)).clamp(min=0)
    return qk, ov


def skip_trigrams(model: TransformerBridge, layer: int, head: int, k: int = 20) -> SkipTrigrams:
    """The k highest-scoring (source, destination, output) triples of a head, best first.

    Materialises the two d_vocab × d_vocab tables (not the d_vocab³ cube): the top k of a product of
    non-negative factors lies among the top k of each factor, so only d_vocab·k² candidates are scored.
    Example: `skip_trigrams(model, 0, 3, k=10).as_tuples()`
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    qk, ov = skip_trigram_scores(model, layer, head)
    V = qk.shape[0]
    kk = min(k, V)
    dest_val, dest_idx = qk.T.topk(kk, dim=-1)  # per source: best destinations [V, kk]
    out_val, out_idx = ov.topk(kk, dim=-1)  # per source: best outputs [V, kk]
    cand = dest_val[:, :, None] * out_val[:, None, :]  # [source, kk, kk]
    n = min(k, cand.numel())
    top_val, flat = cand.flatten().topk(n)
    s, i, j = torch.unravel_index(flat, cand.shape)
    triples: Int[Tensor, "rank 3"] = torch.stack([s, dest_idx[s, i], out_idx[s, j]], dim=-1)
    labels = tuple(f"{a} … {b} → {c}" for a, b, c in triples.tolist())
    return SkipTrigrams(
        values=top_val,
        dims=("rank",),
        labels=(labels,),
        method="skip_trigrams",
        info=dict(head=head_name(layer, head), score="relu(QK_c[dest, src]) * relu(OV_c[src, out])"),
        triples=triples,
    )

"""Full QK and OV circuits through the embeddings, and the direct-path bigram table, as FactoredMatrix objects.

Conventions (row-vector, as in transformer_lens): a residual vector x reads a head as x·W_Q, x·W_V;
the OV circuit of a head is W_V·W_O [d_model, d_model]; its QK circuit W_Q·W_Kᵀ. With
`fold_layernorm=True` (the default) each reading matrix has its LayerNorm's centring and weight folded
in, C·diag(w)·W (what `process_weights(fold_ln=True)` does); the input-dependent 1/σ of LayerNorm and
the biases are left out (they are not functions of the weights alone). For a model without LayerNorm
the flag changes nothing. RMSNorm folds its weight only (it does not centre); the embeddings are the ones the
model adds (Gemma's scaled by √d_model) and under grouped-query attention each head reads its key/value head's
W_K and W_V. A model with rotary position embeddings has OV circuits here but no QK circuit through the
embeddings (`full_qk_circuit` refuses it).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix, TransformerBridge

from circuits.engine import Weights
from circuits.weights._common import (
    check_choice,
    check_layer_head,
    fold_reader,
    learned_positions,
    require_learned_positions,
    stacked,
    token_embedding,
    unembed,
)

_SIDES = ("token", "position")


def attention_scale(model: TransformerBridge) -> float:
    """The divisor of q·k in the model's attention: cfg.attn_scale when set (> 0), else √d_head."""
    cfg = model.cfg
    if getattr(cfg, "use_attn_scale", True) and getattr(cfg, "attn_scale", -1.0) > 0:
        return float(cfg.attn_scale)
    return math.sqrt(cfg.d_head)


def _embedding(model: TransformerBridge, side: str) -> Float[Tensor, "n d_model"]:
    return token_embedding(model) if side == "token" else Weights.of(model).W_pos  # refused under rotary above


def _head_reader(model: TransformerBridge, name: str, layer: int, head: int, fold_layernorm: bool) -> Tensor:
    W = stacked(model, name)[layer, head]
    return fold_reader(model, W, layer) if fold_layernorm else W


def full_ov_circuit(model: TransformerBridge, layer: int, head: int, *, fold_layernorm: bool = True) -> FactoredMatrix:
    """The full OV circuit W_E·W_V·W_O·W_U of one head, [d_vocab (token attended to), d_vocab (logit)].

    Entry [s, t] is the direct effect on the logit of t of attending (with weight 1) to token s, through
    this head alone. Returned factored with inner dimension d_head; `.AB` materialises it.
    Example: `full_ov_circuit(model, 1, 3).AB[s].topk(5)`
    """
    check_layer_head(model, layer, head)
    A = _embedding(model, "token") @ _head_reader(model, "W_V", layer, head, fold_layernorm)
    B = stacked(model, "W_O")[layer, head] @ unembed(model, fold_layernorm)
    return FactoredMatrix(A, B)


def full_qk_circuit(
    model: TransformerBridge,
    layer: int,
    head: int,
    *,
    query: str = "token",
    key: str = "token",
    fold_layernorm: bool = True,
) -> FactoredMatrix:
    """The QK circuit read through the embeddings: X_q·W_Q·W_Kᵀ·X_kᵀ / scale, [n_query, n_key].

    `query`/`key` pick "token" (X = W_E, d_vocab rows) or "position" (X = W_pos, n_ctx rows), giving the
    token-token, position-position and mixed terms of the attention score; the sum of the four terms is
    the score of (token + position) inputs, apart from LayerNorm's 1/σ and the biases. Divided by the
    model's attention scale (√d_head), so entries are in the units of the pre-softmax scores.
    Example: `full_qk_circuit(model, 0, 2, query="position", key="position").AB`
    """
    check_layer_head(model, layer, head)
    check_choice("query", query, _SIDES)
    check_choice("key", key, _SIDES)
    require_learned_positions(model, "full_qk_circuit")
    A = _embedding(model, query) @ _head_reader(model, "W_Q", layer, head, fold_layernorm) / attention_scale(model)
    B = (_embedding(model, key) @ _head_reader(model, "W_K", layer, head, fold_layernorm)).T
    return FactoredMatrix(A, B)


def bigram_table(model: TransformerBridge, *, position: int | None = None) -> FactoredMatrix:
    """The direct path embed → final LayerNorm → unembed as logits, [d_vocab (current), d_vocab (next)].

    Row t holds the logits that the direct path gives when the residual stream is W_E[t] (plus W_pos[position]
    when `position` is given). The final norm is applied exactly to that vector (LayerNorm's centring, the 1/σ
    of the vector itself, weight and bias; RMSNorm's 1/rms and weight) and the unembedding bias is included, so
    for a 0-layer model with `position=p` row t equals the model's logits at position p of any input with token
    t there. In a model with attention layers the real direct path is divided by the σ of the whole residual
    stream, so the table is the embedding's own reading of the unembedding (exact only for n_layers=0).
    Factored with inner dimension d_model + 1 (the extra dimension carries the biases).
    Example: `bigram_table(model).AB.softmax(-1)` (a next-token distribution per token)
    """
    W_E = token_embedding(model)
    if position is not None:
        n_ctx = int(model.cfg.n_ctx)
        if not isinstance(position, int) or not 0 <= position < n_ctx:
            raise ValueError(f"position must be None or an integer in [0, {n_ctx}), got {position!r}")
        W_E = W_E + learned_positions(model, "bigram_table(position=...)")[position]
    w = Weights.of(model)
    W_U, bias = w.W_U, w.b_U
    final = w.ln_final  # applied exactly to each row: x̂ (its own 1/σ), then weight and bias, factored out
    x = W_E if final.kind is None else final.standardise(W_E)[0]
    if final.weight is not None:
        W_U = final.weight[:, None] * W_U
    if final.bias is not None:
        bias = bias + final.bias @ w.W_U
    A = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    B = torch.cat([W_U, bias.to(W_U)[None, :]], dim=0)
    return FactoredMatrix(A, B)

"""Weight access shared by the weight-only analyses: detached stacked weights, LayerNorm folding, argument checks.

Every weight is read through the engine's reader (`circuits.engine.Weights.of`), the one place that resolves a
checkpoint's conventions: Gemma's norm weights (1 + w) and embedding scale, key/value heads shared under
grouped-query attention, biases the checkpoint lacks. Rotary position embeddings have no weight-only
reading of the query-key side: the analyses that need one refuse such a model (`require_learned_positions`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.engine import Weights
from circuits.engine.primitives import expand_kv, scaled_embedding

_CENTRED_NORMS = ("LN", "LNPRE")
_PER_KV_HEAD = ("W_K", "W_V", "b_K", "b_V")


def n_layers(model: TransformerBridge) -> int:
    return int(model.cfg.n_layers)


def norm_type(model: TransformerBridge) -> str | None:
    nt = model.cfg.normalization_type
    return None if nt is None else str(nt).upper()


def check_layer_head(model: TransformerBridge, layer: int, head: int | None = None) -> None:
    """Raise a ValueError naming `layer`/`head` and their allowed range when out of range."""
    L, H = n_layers(model), int(model.cfg.n_heads)
    if L == 0:
        raise ValueError("layer: this model has no attention layers (n_layers=0)")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < L:
        raise ValueError(f"layer must be an integer in [0, {L}) (range(0, {L})), got {layer!r}")
    if head is not None and (not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < H):
        raise ValueError(f"head must be an integer in [0, {H}) (range(0, {H})), got {head!r}")


def check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def require_attention(model: TransformerBridge, what: str) -> None:
    if n_layers(model) == 0:
        raise ValueError(f"{what}: model has no attention layers (n_layers=0); it needs at least one")


def centre(W: Float[Tensor, "... d_model d"]) -> Float[Tensor, "... d_model d"]:
    """(I − 11ᵀ/d_model) W: what LayerNorm's mean subtraction does to a matrix that reads the residual stream."""
    return W - W.mean(dim=-2, keepdim=True)


def _norm(model: TransformerBridge, layer: int | None):
    w = Weights.of(model)
    return w.ln_final if layer is None else w.ln1.at(layer)


def ln_weight(model: TransformerBridge, layer: int | None) -> Tensor | None:
    """The norm weight before block `layer`'s attention (`None`: the final norm) as the model multiplies by it
    (Gemma's 1 + w), or None if absent."""
    return _norm(model, layer).weight


def ln_bias(model: TransformerBridge, layer: int | None) -> Tensor | None:
    """The norm bias before block `layer`'s attention (`None`: the final norm), or None if absent."""
    return _norm(model, layer).bias


def token_embedding(model: TransformerBridge) -> Float[Tensor, "d_vocab d_model"]:
    """W_E as the model adds it to the residual stream: times its embedding scale (Gemma's √d_model, the
    scale `circuits.engine.embed` applies)."""
    w = Weights.of(model)
    return scaled_embedding(w, w.W_E)


def learned_positions(model: TransformerBridge, what: str) -> Float[Tensor, "n_ctx d_model"]:
    """W_pos; a ValueError naming `what` for a model with rotary position embeddings (it has none)."""
    require_learned_positions(model, what)
    return Weights.of(model).W_pos


def require_learned_positions(model: TransformerBridge, what: str) -> None:
    """Refuse (ValueError naming `what`) a model with rotary position embeddings: there a query-key score
    depends on the two positions through a rotation, so no circuit read from the weights alone gives it."""
    if Weights.of(model).rotary is not None:
        raise ValueError(
            f"model: {what} reads the query-key side or the position embeddings from the weights, but this model "
            "uses rotary position embeddings (its scores depend on where query and key sit, and it has no W_pos); "
            "the OV side (full_ov_circuit, copying_scores, V-composition) does not depend on positions")


def fold_reader(
    model: TransformerBridge, W: Float[Tensor, "*batch d_model d"], layer: int | None
) -> Float[Tensor, "*batch d_model d"]:
    """C·diag(w)·W: fold LayerNorm `layer`'s centring and weight (not its input-dependent 1/σ) into a reading matrix.

    `layer=None` is the final LayerNorm. A model without LayerNorm returns W unchanged. This is what
    transformer_lens's `process_weights(fold_ln=True)` does to W_Q/W_K/W_V and W_U.
    """
    w = ln_weight(model, layer)
    if w is not None:
        W = W * w[:, None]
    if norm_type(model) in _CENTRED_NORMS:
        W = centre(W)
    return W


def stacked(model: TransformerBridge, name: str) -> Tensor:
    """A detached stacked weight (`W_Q`, `W_K`, `W_V` [L,H,d_model,d_head], `W_O` [L,H,d_head,d_model], ...). Keys
    and values (weights and biases) have one entry per query head: under grouped-query attention head h's is
    its key/value head's (h // group size), as the model computes it."""
    w = Weights.of(model)
    t = getattr(w, name)
    return expand_kv(w, t, axis=1) if name in _PER_KV_HEAD else t


def read_weights(
    model: TransformerBridge, name: str, fold_layernorm: bool
) -> Float[Tensor, "layer head d_model d_head"]:
    """W_Q, W_K or W_V of every layer, with each layer's ln1 folded in when `fold_layernorm`."""
    W = stacked(model, name)
    if not fold_layernorm or norm_type(model) is None:
        return W
    return torch.stack([fold_reader(model, W[layer], layer) for layer in range(W.shape[0])])


def unembed(model: TransformerBridge, fold_layernorm: bool) -> Float[Tensor, "d_model d_vocab"]:
    W_U = Weights.of(model).W_U
    return fold_reader(model, W_U, None) if fold_layernorm else W_U

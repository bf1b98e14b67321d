"""Weight access shared by the weight-only analyses: detached stacked weights, LayerNorm folding, argument checks."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge

_CENTRED_NORMS = ("LN", "LNPRE")
_SUPPORTED_NORMS = (None, "LN", "LNPRE")


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


def ln_weight(model: TransformerBridge, layer: int | None) -> Tensor | None:
    """The LayerNorm weight before block `layer`'s attention (`None`: the final LayerNorm), or None if absent."""
    if norm_type(model) is None:
        return None
    ln = model.ln_final if layer is None else model.blocks[layer].ln1
    w = getattr(ln, "w", None)
    return None if w is None else w.detach()


def ln_bias(model: TransformerBridge, layer: int | None) -> Tensor | None:
    if norm_type(model) is None:
        return None
    ln = model.ln_final if layer is None else model.blocks[layer].ln1
    b = getattr(ln, "b", None)
    return None if b is None else b.detach()


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
    """A detached stacked weight (`W_Q`, `W_K`, `W_V` [L,H,d_model,d_head], `W_O` [L,H,d_head,d_model], ...)."""
    return getattr(model, name).detach()


def read_weights(
    model: TransformerBridge, name: str, fold_layernorm: bool
) -> Float[Tensor, "layer head d_model d_head"]:
    """W_Q, W_K or W_V of every layer, with each layer's ln1 folded in when `fold_layernorm`."""
    W = stacked(model, name)
    if not fold_layernorm or norm_type(model) is None:
        return W
    return torch.stack([fold_reader(model, W[layer], layer) for layer in range(W.shape[0])])


def unembed(model: TransformerBridge, fold_layernorm: bool) -> Float[Tensor, "d_model d_vocab"]:
    W_U = model.W_U.detach()
    return fold_reader(model, W_U, None) if fold_layernorm else W_U

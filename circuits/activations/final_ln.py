"""The final normalisation of a bridge, for direct logit attribution and the logit lens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge


@dataclass(frozen=True, eq=False)
class FinalNorm:
    """ln_final as (kind, weight, bias, eps): kind "LN" centres and divides by sqrt(var + eps), "RMS" divides by
    sqrt(mean(x²) + eps), None is the identity. A folded LayerNorm (LNPre/RMSPre) has weight 1 and bias 0.
    Example: `FinalNorm.of(model).apply(resid)`"""

    kind: str | None
    weight: Tensor
    bias: Tensor
    eps: float

    @classmethod
    def of(cls, model: TransformerBridge) -> FinalNorm:
        norm = model.cfg.normalization_type
        kind = None if norm is None else ("RMS" if norm.upper().startswith("RMS") else "LN")
        if norm is not None and norm.upper() not in ("LN", "LNPRE", "RMS", "RMSPRE"):
            raise ValueError(f"model: unsupported normalization_type {norm!r} for the final LayerNorm")
        sd = model.state_dict()
        d = model.cfg.d_model
        ref = model.W_U
        weight = sd.get("ln_final.weight", torch.ones(d, dtype=ref.dtype, device=ref.device)).detach()
        bias = sd.get("ln_final.bias", torch.zeros(d, dtype=ref.dtype, device=ref.device)).detach()
        return cls(kind, weight, bias, float(model.cfg.eps))

    def centre(self, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
        """x minus its mean over d_model for LayerNorm (the linear part of the normalisation)."""
        return x - x.mean(-1, keepdim=True) if self.kind == "LN" else x

    def scale(self, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead 1"]:
        """The divisor the normalisation computes from x (hook_scale): recomputed from x itself."""
        if self.kind is None:
            return torch.ones_like(x[..., :1])
        c = self.centre(x)
        return (c.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def apply(self, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
        """The normalisation with the scale recomputed from x."""
        if self.kind is None:
            return x
        return self.centre(x) / self.scale(x) * self.weight + self.bias

"""The normalisations of the supported architectures, with the maps edge attribution needs.

`Norm` is one normalisation (per layer or stacked over layers): LayerNorm ("LN": centre, divide by
sqrt(var + eps), weight and bias), LNPre (LN without weight or bias), RMSNorm ("RMS": divide by
sqrt(mean(x²) + eps), then a weight), RMSPre (without the weight), or None (the identity). LNPre and the RMS
norms compute in float32 whatever the input's dtype, as the bridges' modules for them do (native and Hugging
Face LLaMA-family), so that the engine's forward is the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

KINDS = (None, "LN", "LNPre", "RMS", "RMSPre")


@dataclass(frozen=True, eq=False)
class Norm:
    """A normalisation: `kind` in KINDS, `weight`/`bias` ([d_model], or [layer, d_model] when stacked; None when
    the kind has none), `eps`. Example: `w.ln1.at(0)(resid)`"""

    kind: str | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")

    def at(self, layer: int) -> Norm:
        """One layer's normalisation from a stacked one."""
        return Norm(self.kind, None if self.weight is None else self.weight[layer],
                    None if self.bias is None else self.bias[layer], self.eps)

    @property
    def centred(self) -> bool:
        """True for LayerNorm-type norms (they subtract the mean)."""
        return self.kind in ("LN", "LNPre")

    def __call__(self, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
        if self.kind is None:
            return x
        if self.kind == "LN":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        x32 = x.to(torch.float32)
        if self.kind == "LNPre":
            x32 = x32 - x32.mean(-1, keepdim=True)
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y if self.weight is None else self.weight * y

    def scale(self, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead 1"]:
        """The divisor the normalisation computes from x (what `hook_scale` records): sqrt(var + eps) for
        LayerNorm, sqrt(mean(x²) + eps) for RMSNorm, 1 without a norm."""
        if self.kind is None:
            return torch.ones_like(x[..., :1])
        c = x - x.mean(-1, keepdim=True) if self.centred else x
        return (c.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def linear_part(self, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
        """x with the norm's linear map applied but not its division: centred (LN) and times the weight."""
        if self.kind is None:
            return x
        c = x - x.mean(-1, keepdim=True) if self.centred else x
        return c if self.weight is None else c * self.weight

    def gain(self) -> Tensor | None:
        """The norm's multiplicative weight ([d_model]; None where it has none): y = gain · x̂ + offset."""
        return self.weight

    def offset(self) -> Tensor | float:
        """The norm's additive bias (0 where it has none)."""
        return 0.0 if self.bias is None else self.bias

    def backward(self, x: Float[Tensor, "*xlead d_model"], grad_out: Float[Tensor, "*lead d_model"]
                 ) -> Float[Tensor, "*lead d_model"]:
        """The gradient at the input `x` given the gradient at the output (`x` broadcasts against `grad_out`):
        (g − [mean g] − x̂·mean(g·x̂)) / σ with g = grad_out·weight, x̂ = (x − [μ])/σ; the bracketed terms are
        LayerNorm's only. Example: `w.ln1.at(0).backward(resid, grad_at_ln_out)`"""
        if self.kind is None:
            return grad_out
        xhat, sigma = self.standardise(x)
        g = grad_out if self.weight is None else grad_out * self.weight
        gc = g - g.mean(-1, keepdim=True) if self.centred else g
        return (gc - xhat * (g * xhat).mean(-1, keepdim=True)) / sigma

    def standardise(self, x: Float[Tensor, "*lead d_model"]
                    ) -> tuple[Float[Tensor, "*lead d_model"], Float[Tensor, "*lead 1"]]:
        """x̂ = (x − [μ])/σ and σ, so that the norm is gain · x̂ + offset (the biased variance, as the norms use;
        written out because `Tensor.var` is several times slower on CPU). Not for the identity (kind None)."""
        c = x - x.mean(-1, keepdim=True) if self.centred else x
        sigma = ((c * c).mean(-1, keepdim=True) + self.eps).sqrt()
        return c / sigma, sigma

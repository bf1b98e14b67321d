"""Path expansion of 0-, 1- and 2-layer attention-only models: the logits as a sum of paths from the embeddings.

With the attention patterns and LayerNorm scales of an input held fixed (read from one cached forward
pass), an attention-only model is linear in its embeddings. The logits then split exactly into:
  - "direct": the embeddings (W_E[tokens] + W_pos) straight to the unembedding;
  - "L{l}H{h}": one head reading the embeddings through its OV circuit, straight to the unembedding;
  - "L0H{a}>L1H{b}": a virtual head, layer-1 head b reading layer-0 head a's output through V-composition;
  - "bias": everything that does not depend on the tokens: b_U, the LayerNorm biases, b_V and b_O, and
    their paths through the later layers.
Every LayerNorm is applied as the linear map x ↦ C·x·diag(w)/σ with the σ of that input (hook_scale), so the
identity is exact, with and without LayerNorm, up to float32 rounding (tests: 1e-5 of max |logit|).
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.engine import Weights
from circuits.results import LabelledResult, head_name
from circuits.validate import check_tokens
from circuits.weights._common import (
    learned_positions,
    ln_bias,
    ln_weight,
    n_layers,
    norm_type,
    stacked,
    token_embedding,
)

MAX_LAYERS = 2


@dataclass(frozen=True, eq=False)
class PathExpansion(LabelledResult):
    """Logit contributions [term, batch, pos, vocab]; `values.sum(0)` are the model's logits."""

    @property
    def terms(self) -> tuple[str, ...]:
        return self.labels[0]

    def term(self, name: str) -> Float[Tensor, "batch pos vocab"]:
        """One term's logits by name ("direct", "L0H1", "L0H1>L1H2", "bias")."""
        if name not in self.terms:
            raise ValueError(f"name must be one of {list(self.terms)}, got {name!r}")
        return self.values[self.terms.index(name)]

    @property
    def logits(self) -> Float[Tensor, "batch pos vocab"]:
        return self.values.sum(0)


def _check_model(model: TransformerBridge) -> None:
    if not model.cfg.attn_only:
        raise ValueError(
            "model: path_expansion is defined for attention-only models (cfg.attn_only=True) with 0, 1 or 2 "
            "layers; this model has MLP layers"
        )
    if n_layers(model) > MAX_LAYERS:
        raise ValueError(
            f"model: path_expansion is defined for attention-only models with n_layers in [0, 1, 2]; "
            f"this one has n_layers={n_layers(model)}"
        )
    if norm_type(model) not in (None, "LN", "LNPRE"):
        raise ValueError(
            f"model: normalization_type must be None, 'LN' or 'LNPre', got {model.cfg.normalization_type!r}"
        )


class _LinearisedNorm:
    """LayerNorm with the scale of one input frozen: x ↦ C·x·w/σ (linear part) and b (constant part)."""

    def __init__(self, model: TransformerBridge, layer: int | None, scale: Tensor | None):
        self.w, self.b = ln_weight(model, layer), ln_bias(model, layer)
        self.centre = norm_type(model) is not None
        self.scale = scale  # [batch, pos, 1] or None

    def linear(self, x: Float[Tensor, "... batch pos d_model"]) -> Float[Tensor, "... batch pos d_model"]:
        if self.centre:
            x = (x - x.mean(-1, keepdim=True)) / self.scale
        return x if self.w is None else x * self.w

    def constant(self, d_model: int) -> Float[Tensor, " d_model"]:
        return self.b if self.b is not None else torch.zeros(d_model)


def _hook_names(model: TransformerBridge) -> list[str]:
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers(model))]
    if norm_type(model) is not None:
        names += [f"blocks.{layer}.ln1.hook_scale" for layer in range(n_layers(model))] + ["ln_final.hook_scale"]
    return names


def _heads_read(
    model: TransformerBridge, layer: int, pattern: Tensor, norm: _LinearisedNorm, sources: Tensor
) -> Float[Tensor, "src head batch pos d_model"]:
    """Each head of `layer` reading each source [src, batch, pos, d_model] through LN (linear part) and OV."""
    W_V, W_O = stacked(model, "W_V")[layer], stacked(model, "W_O")[layer]
    v = einops.einsum(norm.linear(sources), W_V, "s b k m, h m d -> s h b k d")
    z = einops.einsum(pattern, v, "b h q k, s h b k d -> s h b q d")
    return einops.einsum(z, W_O, "s h b q d, h d m -> s h b q m")


def _layer_constant(model: TransformerBridge, layer: int, pattern: Tensor, norm: _LinearisedNorm) -> Tensor:
    """The token-independent output of a layer: b_O plus each head's (b_ln·W_V + b_V)·W_O weighted by Σ pattern."""
    W_V, W_O = stacked(model, "W_V")[layer], stacked(model, "W_O")[layer]
    b_V, b_O = stacked(model, "b_V")[layer], stacked(model, "b_O")[layer]
    per_head = einops.einsum(norm.constant(W_V.shape[1]).to(W_V), W_V, "m, h m d -> h d") + b_V
    out = einops.einsum(pattern.sum(-1), per_head, W_O, "b h q, h d, h d m -> b q m")
    return out + b_O


def path_expansion(model: TransformerBridge, tokens: Int[Tensor, "batch pos"]) -> PathExpansion:
    """Decompose the logits of an attention-only model with ≤ 2 layers into direct, head, virtual-head and bias terms.

    Attention patterns and LayerNorm scales come from one forward pass on `tokens` (hooks removed after);
    everything else from the weights. `result.values.sum(0)` equals `model(tokens)` (1e-5 of max |logit|,
    float32). Raises ValueError for a model with MLPs or more than 2 layers.
    Example: `pe = path_expansion(model, tokens); pe.term("L0H2>L1H1")[0, -1].topk(3)`
    """
    check_tokens(model, tokens, "tokens")
    _check_model(model)
    L, H = n_layers(model), int(model.cfg.n_heads)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=_hook_names(model))

        def scale(name: str) -> Tensor | None:
            return cache[name] if norm_type(model) is not None else None

        P = tokens.shape[1]
        embed = (token_embedding(model)[tokens] + learned_positions(model, "path_expansion")[:P])[None]  # [1, b, p, m]
        names, resid = ["direct"], [embed]
        const = torch.zeros_like(embed)
        if L >= 1:
            pattern0 = cache["blocks.0.attn.hook_pattern"]
            norm0 = _LinearisedNorm(model, 0, scale("blocks.0.ln1.hook_scale"))
            heads0 = _heads_read(model, 0, pattern0, norm0, embed)[0]  # [h, b, p, m]
            const = const + _layer_constant(model, 0, pattern0, norm0)
            names += [head_name(0, h) for h in range(H)]
            resid.append(heads0)
        if L == 2:
            pattern1 = cache["blocks.1.attn.hook_pattern"]
            norm1 = _LinearisedNorm(model, 1, scale("blocks.1.ln1.hook_scale"))
            sources = torch.cat([embed, heads0, const])  # direct, each layer-0 head, layer-0 constant
            read = _heads_read(model, 1, pattern1, norm1, sources)  # [src, h1, b, p, m]
            names += [head_name(1, h) for h in range(H)]
            resid.append(read[0])
            names += [f"{head_name(0, a)}>{head_name(1, b)}" for a in range(H) for b in range(H)]
            resid.append(einops.rearrange(read[1 : 1 + H], "a b ... -> (a b) ..."))
            const = const + read[1 + H].sum(0, keepdim=True) + _layer_constant(model, 1, pattern1, norm1)
        final = _LinearisedNorm(model, None, scale("ln_final.hook_scale"))
        W_U = Weights.of(model).W_U
        resid = torch.cat(resid + [const])
        values = final.linear(resid) @ W_U
        values[-1] += final.constant(W_U.shape[0]).to(W_U) @ W_U + Weights.of(model).b_U
    names.append("bias")
    B = tokens.shape[0]
    return PathExpansion(
        values=values,
        dims=("term", "batch", "pos", "vocab"),
        labels=(tuple(names), tuple(str(i) for i in range(B)), tuple(str(i) for i in range(P)),
                tuple(str(i) for i in range(values.shape[-1]))),
        method="path_expansion",
        info=dict(n_layers=L, layernorm=norm_type(model), patterns="from one forward pass on tokens"),
    )

"""Building attention-only transformer_lens bridges from a config, with no download."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformer_lens import TransformerBridge
from transformer_lens.config import TransformerBridgeConfig


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a native bridge model: everything `build` needs to recreate it (weights aside).

    `n_layers=0` is supported: the model is embed → (final LayerNorm) → unembed.
    `d_mlp=None` means attention-only.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    layernorm: bool = True
    d_mlp: int | None = None
    act_fn: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"spec: unknown fields {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def _check_positive(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def build(spec: ModelSpec, *, seed: int = 0) -> TransformerBridge:
    """Build a native `TransformerBridge` for `spec` with seeded random weights.

    A 0-layer model is made by booting a 1-layer model and removing its block: `boot_native` itself
    divides by `n_layers` and fails for 0. The result is a bridge whose forward is
    embed + pos_embed → ln_final → unembed, with the usual hook names (`hook_embed`, `hook_pos_embed`,
    `ln_final.hook_scale`, ...) and no `blocks.*` hooks.

    Example: `model = build(ModelSpec(2, 64, 4, 16, 50, 32))`
    """
    _check_positive(d_model=spec.d_model, n_heads=spec.n_heads, d_head=spec.d_head,
                    d_vocab=spec.d_vocab, n_ctx=spec.n_ctx)
    if not isinstance(spec.n_layers, int) or spec.n_layers < 0:
        raise ValueError(f"n_layers must be a non-negative integer, got {spec.n_layers!r}")
    attn_only = spec.d_mlp is None
    cfg = TransformerBridgeConfig(
        n_layers=max(spec.n_layers, 1),
        d_model=spec.d_model,
        n_ctx=spec.n_ctx,
        d_head=spec.d_head,
        n_heads=spec.n_heads,
        d_vocab=spec.d_vocab,
        attn_only=attn_only,
        d_mlp=spec.d_mlp if spec.d_mlp is not None else 4 * spec.d_model,
        act_fn=spec.act_fn if not attn_only else None,
        normalization_type="LN" if spec.layernorm else None,
        seed=seed,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TransformerBridge.boot_native(cfg)
    if spec.n_layers == 0:
        _strip_blocks(model)
    model.eval()
    model.spec = spec  # our record of how to rebuild it (used by save/load)
    return model


def _strip_blocks(model: TransformerBridge) -> None:
    """Remove every block of a native bridge, leaving embed → ln_final → unembed."""
    model.original_model.layers = nn.ModuleList([])
    model.blocks = nn.ModuleList([])
    model.cfg.n_layers = 0
    stale = [name for name in model.hook_dict if name.startswith("blocks.")]
    for name in stale:
        del model.hook_dict[name]


def attn_only(
    n_layers: int,
    d_model: int,
    n_heads: int,
    d_head: int,
    d_vocab: int,
    n_ctx: int,
    *,
    layernorm: bool = True,
    seed: int = 0,
) -> TransformerBridge:
    """An attention-only `TransformerBridge` (pre-LayerNorm unless `layernorm=False`), seeded weights.

    `n_layers=0` gives the direct path alone (embed → unembed); see `build`.

    Example: `model = attn_only(2, 64, 4, 16, d_vocab=50, n_ctx=32)`
    """
    return build(ModelSpec(n_layers, d_model, n_heads, d_head, d_vocab, n_ctx, layernorm=layernorm), seed=seed)


def spec_of(model: TransformerBridge) -> ModelSpec:
    """The `ModelSpec` of a native bridge built by this package (or inferred from its config)."""
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    cfg = model.cfg
    if getattr(cfg, "architecture", None) != "TransformerLensNative":
        raise ValueError("model: only native bridges (built by circuits.models) can be described by a ModelSpec")
    return ModelSpec(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
        d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx, layernorm=cfg.normalization_type is not None,
        d_mlp=None if cfg.attn_only else cfg.d_mlp, act_fn=None if cfg.attn_only else cfg.act_fn,
    )


def is_attn_only(model: TransformerBridge) -> bool:
    """True when the model has no MLP blocks."""
    return bool(model.cfg.attn_only)


def has_layernorm(model: TransformerBridge) -> bool:
    """True when the model normalises (LN or RMS) before attention and before the unembedding."""
    return model.cfg.normalization_type is not None

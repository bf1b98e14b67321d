"""The one weight reader: a supported bridge's weights as one `Weights`, and the reasons a model is refused.

Every fast path (activation patching, attribution, edge patching, ACDC, EAP, faithfulness) reads a model
through `Weights.of(model)`: one cache entry per model (`circuits.model_cache`, kind "engine"), one list of
supported architectures (`ARCHITECTURES`), one function that says why a model is refused (`unsupported`).
The weights are stacked TransformerLens-style from the bridge's own stacked properties (`W_Q`, `W_K`, `W_V`,
`W_O`, `W_in`, `W_gate`, `W_out`, `W_E`, `W_U`) and its state dict (biases and norms, zero or None where the
checkpoint has none), so each architecture differs only in the few facts listed per row of `ARCHITECTURES`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.allocator import settle_allocator
from circuits.engine.norm import Norm
from circuits.model_cache import cached_read

NATIVE = "TransformerLensNative"
GPT2 = "GPT2LMHeadModel"
NEOX = "GPTNeoXForCausalLM"
LLAMA = "LlamaForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
MISTRAL = "MistralForCausalLM"
GEMMA = "GemmaForCausalLM"

ARCHITECTURES = {
    NATIVE: "native bridges (boot_native / circuits.models): LN, LNPre, RMS, RMSPre or no norm; learned or rotary "
            "positions; causal or bidirectional; grouped-query attention; plain or gated MLPs",
    GPT2: "GPT-2: LayerNorm, learned positions, gelu_new MLP",
    NEOX: "GPT-NeoX / Pythia: parallel attention and MLP, partial rotary embeddings",
    LLAMA: "LLaMA: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU",
    QWEN2: "Qwen2: LLaMA with q/k/v biases",
    MISTRAL: "Mistral: LLaMA with a sliding window no shorter than the context",
    GEMMA: "Gemma (1): RMSNorm with (1 + w), rotary embeddings, multi-query or grouped-query attention with "
           "head_dim independent of d_model, GeGLU, embeddings scaled by sqrt(d_model)",
}
"""The architectures the engine runs (`model.cfg.architecture`), each with what it has."""

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True, eq=False)
class Rotary:
    """Rotary position embeddings: `cos`, `sin` [n_ctx, rotary_dim] as the model computes them, applied to the
    first rotary_dim dimensions of each query and key; `interleaved` pairs dimensions (2i, 2i+1) (native
    bridges), otherwise (i, i + rotary_dim/2) (Hugging Face's rotate_half)."""

    cos: Float[Tensor, "n_ctx rotary_dim"]
    sin: Float[Tensor, "n_ctx rotary_dim"]
    interleaved: bool

    @property
    def dim(self) -> int:
        return self.cos.shape[-1]


@dataclass(frozen=True, eq=False)
class Weights:
    """A supported bridge's weights, stacked TransformerLens-style. `W_K`/`W_V` have one head per key/value
    head (fewer than `W_Q`'s under grouped-query attention); `W_pos` is None with rotary positions (`rotary`
    set); the MLP weights are None for attention-only models (`W_gate` also for ungated MLPs); biases the
    checkpoint lacks are zero. Example: `w = Weights.of(model); w.W_Q.shape`"""

    architecture: str
    W_E: Float[Tensor, "vocab d_model"]
    embed_scale: float
    W_pos: Float[Tensor, "n_ctx d_model"] | None
    rotary: Rotary | None
    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer kv_head d_model d_head"]
    W_V: Float[Tensor, "layer kv_head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_Q: Float[Tensor, "layer head d_head"]
    b_K: Float[Tensor, "layer kv_head d_head"]
    b_V: Float[Tensor, "layer kv_head d_head"]
    b_O: Float[Tensor, "layer d_model"]
    ln1: Norm
    ln2: Norm | None
    ln_final: Norm
    W_in: Float[Tensor, "layer d_model d_mlp"] | None
    W_gate: Float[Tensor, "layer d_model d_mlp"] | None
    b_in: Float[Tensor, "layer d_mlp"] | None
    W_out: Float[Tensor, "layer d_mlp d_model"] | None
    b_out: Float[Tensor, "layer d_model"] | None
    act: Callable[[Tensor], Tensor] | None
    W_U: Float[Tensor, "d_model vocab_out"]
    b_U: Float[Tensor, " vocab_out"]
    attn_scale: float
    causal: bool
    parallel: bool
    n_ctx: int
    summary: str

    def __repr__(self) -> str:
        return f"Weights({self.summary})"

    @functools.cached_property
    def description(self) -> str:
        """`summary` with a fingerprint of the weights: `attn-only 2L×4H d_model=64 #1a2b3c4d`."""
        return f"{self.summary} #{fingerprint(self)}"

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.W_K.shape[1]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1]

    @property
    def has_mlp(self) -> bool:
        return self.W_in is not None

    @property
    def has_pos_embed(self) -> bool:
        return self.W_pos is not None

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    def qkv_weights(self, which: int
                    ) -> tuple[Float[Tensor, "layer h d_model d_head"], Float[Tensor, "layer h d_head"]]:
        """(W, b) of the queries (`which` 0), keys (1) or values (2)."""
        return ((self.W_Q, self.b_Q), (self.W_K, self.b_K), (self.W_V, self.b_V))[which]

    def features(self) -> list[str]:
        """What this model uses beyond a causal pre-LayerNorm transformer with learned positions and plain
        MLPs (for the methods that run only some of it). Example: `Weights.of(llama).features()`"""
        out = []
        if self.rotary is not None:
            out.append("rotary positions")
        if self.group_size > 1:
            out.append("grouped-query attention")
        if self.parallel:
            out.append("parallel attention and MLP")
        if not self.causal:
            out.append("bidirectional attention")
        if self.embed_scale != 1.0:
            out.append("scaled embeddings")
        return out

    @functools.cached_property
    def W_QKV(self) -> Float[Tensor, "layer d_model qkv"]:
        """Queries', keys' and values' weights side by side ([d_model, (head + 2 kv_head) · d_head] per layer,
        heads inner), so that one product gives all three, as the model computes them."""
        L, _, m, d = self.W_Q.shape
        return torch.cat([self.W_Q, self.W_K, self.W_V], 1).permute(0, 2, 1, 3).reshape(L, m, -1)

    @functools.cached_property
    def b_QKV(self) -> Float[Tensor, "layer qkv"]:
        return torch.cat([self.b_Q, self.b_K, self.b_V], 1).flatten(1)

    @functools.cached_property
    def W_QKV_folded(self) -> Float[Tensor, "layer d_model qkv"]:
        """`W_QKV` with ln1's gain folded in (γ ⊙ W), each column centred over d_model for a LayerNorm: the
        product that maps ln1's standardised input x̂ to q, k, v less `b_QKV_folded` (transformer_lens's
        `fold_ln` of ln1). Edge attribution's gradients at the residual stream go through it."""
        gain = self.ln1.weight
        W = self.W_QKV if gain is None else gain[..., None] * self.W_QKV
        return W - W.mean(1, keepdim=True) if self.ln1.centred else W

    @functools.cached_property
    def b_QKV_folded(self) -> Float[Tensor, "layer qkv"]:
        """`b_QKV` plus ln1's offset times `W_QKV` (the bias of `W_QKV_folded`)."""
        bias = self.ln1.bias
        return self.b_QKV if bias is None else self.b_QKV + torch.einsum("lm,lmq->lq", bias, self.W_QKV)

    @functools.cached_property
    def W_KV(self) -> Float[Tensor, "layer d_model kv_head_d"]:
        """Keys' and values' weights side by side ([d_model, 2 · kv_head · d_head] per layer), for one product."""
        L, H, m, d = self.W_K.shape
        return torch.cat([self.W_K, self.W_V], 1).permute(0, 2, 1, 3).reshape(L, m, 2 * H * d)

    @functools.cached_property
    def b_KV(self) -> Float[Tensor, "layer kv_head_d"]:
        return torch.cat([self.b_K, self.b_V], 1).flatten(1)

    @classmethod
    def of(cls, model: TransformerBridge) -> Weights:
        """A supported bridge's weights, cached per model while its parameters are unchanged (see
        `circuits.model_cache`; after writes through `.data` call `Weights.read`); raises ValueError naming
        what is unsupported."""
        settle_allocator()  # patched runs reuse freed memory instead of faulting it in again
        return cached_read(model, "engine", cls.read)

    @classmethod
    def read(cls, model: TransformerBridge) -> Weights:
        """Read (copy, detached) a supported bridge's weights now, bypassing the cache of `of`."""
        problems = unsupported(model)
        if problems:
            raise ValueError("model: the engine does not support " + "; ".join(problems)
                             + " (hook-based methods still run on it)")
        with torch.no_grad():
            return _read(model)


def unsupported(model: TransformerBridge) -> list[str]:
    """Why the engine cannot run `model`, one reason per missing feature (empty when it can).
    Example: `unsupported(model) == []`"""
    cfg = model.cfg
    arch = getattr(cfg, "architecture", None)
    if arch not in ARCHITECTURES:
        # the features a refused architecture is known to have, so that the reason says what is missing
        return [f"architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})", *_unsupported_features(model)]
    problems = []
    norm = _norm_kind(cfg.normalization_type)
    if norm == "?":
        problems.append(f"normalization_type={cfg.normalization_type!r}")
    kind = (getattr(cfg, "positional_embedding_type", None) or "standard").lower()
    if kind not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    problems += _unsupported_features(model)
    if cfg.attention_dir not in ("causal", "bidirectional"):
        problems.append(f"attention_dir={cfg.attention_dir!r}")
    if int(getattr(cfg, "n_layers", 0)) == 0:
        return problems  # nothing below applies to an embed → unembed model
    if arch == NATIVE:
        if not cfg.attn_only and _native_blocks(model)[0].mlp.__class__.__name__ == "NativeMLP" \
                and getattr(_native_blocks(model)[0].mlp, "ln", None) is not None:
            problems.append("act_fn='solu_ln' (a LayerNorm inside the MLP)")
    else:
        hf = model.original_model.config
        if arch == GPT2 and (not getattr(hf, "scale_attn_weights", True)
                             or getattr(hf, "scale_attn_by_inverse_layer_idx", False)):
            problems.append("GPT-2 attention scaling other than 1/sqrt(d_head)")
        act = getattr(hf, "hidden_act", None) or getattr(hf, "activation_function", None)
        if act not in ACTIVATIONS:
            problems.append(f"MLP activation {act!r}")
        if arch == NEOX and float(getattr(hf, "attention_bias", True)) is False:
            problems.append("GPT-NeoX without attention biases")
    return problems


def _unsupported_features(model: TransformerBridge) -> list[str]:
    """The features of any bridge the engine does not compute: soft-capping, a sliding window shorter than the
    context, norms on the attention and MLP outputs (Gemma 2's and 3's post-norms)."""
    cfg = model.cfg
    problems = []
    if float(getattr(cfg, "attn_scores_soft_cap", -1.0)) > 0 or float(getattr(cfg, "output_logits_soft_cap", -1.0)) > 0:
        problems.append("soft-capping")
    hf = getattr(getattr(model, "original_model", None), "config", None)
    window = getattr(hf, "sliding_window", None)
    if isinstance(window, int) and getattr(hf, "use_sliding_window", True) and window < cfg.n_ctx:
        problems.append(f"sliding-window attention (window {window} < n_ctx {cfg.n_ctx})")
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and any(hasattr(blocks[0], n) for n in ("ln1_post", "ln2_post")):
        problems.append("norms on the attention and MLP outputs (post-norms)")
    return problems


def _norm_kind(normalization_type: str | None) -> str | None:
    if normalization_type is None:
        return None
    return {"LN": "LN", "LNPRE": "LNPre", "RMS": "RMS", "RMSPRE": "RMSPre"}.get(str(normalization_type).upper(), "?")


def final_norm(model: TransformerBridge) -> Norm:
    """The final norm of any bridge with a LayerNorm- or RMS-type (or no) normalisation, as a `Norm` (also for
    models the engine refuses: DLA and the logit lens run on them through hooks). Example: `final_norm(m)(x)`"""
    cfg = model.cfg
    kind = _norm_kind(cfg.normalization_type)
    if kind == "?":
        raise ValueError(f"model: unsupported normalization_type {cfg.normalization_type!r} for the final norm")
    if getattr(cfg, "final_rms", False) and cfg.architecture == NATIVE:
        kind = "RMSPre" if kind in ("RMSPre", "LNPre") else "RMS"
    if kind is None:
        return Norm(None, None, None, float(cfg.eps))
    sd = model.state_dict()
    weight, bias = sd.get("ln_final.weight"), sd.get("ln_final.bias")
    weight = None if kind in ("LNPre", "RMSPre") or weight is None else weight.detach() + _norm_offset(cfg)
    bias = None if kind != "LN" or bias is None else bias.detach().clone()
    if kind == "LN" and bias is None:
        bias = torch.zeros_like(weight)
    return Norm(kind, weight, bias, float(cfg.eps))


def _norm_offset(cfg) -> float:
    """What the model adds to its stored norm weights: 1 where the norm multiplies by (1 + w) (Gemma: the state
    dict holds w), else 0."""
    return 1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else 0.0


def _embed_scale(model: TransformerBridge) -> float:
    """The factor the model multiplies its token embeddings by (Gemma: sqrt(d_model), as the embedding module
    holds it, in its dtype's rounding), 1 for the others."""
    if model.cfg.architecture == NATIVE:
        return 1.0
    scale = getattr(model.original_model.get_input_embeddings(), "embed_scale", None)
    return 1.0 if scale is None else float(torch.as_tensor(scale).to(model.W_E.dtype))


def _native_blocks(model: TransformerBridge):
    return model.original_model.layers


def _read(model: TransformerBridge) -> Weights:
    cfg = model.cfg
    arch = cfg.architecture
    sd = model.state_dict()
    L, H, m = cfg.n_layers, cfg.n_heads, cfg.d_model
    ref = model.W_E.detach()

    def get(name: str) -> Tensor | None:
        t = sd.get(name)
        return None if t is None else t.detach().clone()

    def stacked(name: str) -> Tensor:
        return getattr(model, name).detach().clone()

    def stack_bias(fmt: str, shape: tuple[int, ...]) -> Tensor:
        parts = [get(fmt.format(layer)) for layer in range(L)]
        return torch.stack([ref.new_zeros(shape) if p is None else p.reshape(shape) for p in parts]) if L else \
            ref.new_zeros(0, *shape)

    def norm(name: str) -> Norm:
        """Block norm `name` (ln1 or ln2) of every layer, stacked."""
        kind = _norm_kind(cfg.normalization_type)
        if kind is None or L == 0:
            return Norm(kind, None, None, float(cfg.eps))
        w = [get(f"blocks.{layer}.{name}.weight") for layer in range(L)]
        b = [get(f"blocks.{layer}.{name}.bias") for layer in range(L)]
        weight = None if kind in ("LNPre", "RMSPre") or w[0] is None else torch.stack(w) + _norm_offset(cfg)
        bias = None if kind != "LN" or b[0] is None else torch.stack(b)
        if kind == "LN" and bias is None:
            bias = torch.zeros_like(weight)
        return Norm(kind, weight, bias, float(cfg.eps))

    n_kv = model.W_K.shape[1] if L else H
    d = cfg.d_head
    mlp = not cfg.attn_only and L > 0
    gated = mlp and bool(getattr(cfg, "gated_mlp", False))
    rotary = _rotary(model) if (getattr(cfg, "positional_embedding_type", None) or "standard").lower() == "rotary" \
        else None
    empty = ref.new_zeros(0, H, m, d)
    return Weights(
        architecture=arch,
        W_E=ref.clone(),
        embed_scale=_embed_scale(model),
        W_pos=None if rotary is not None else stacked("W_pos"),
        rotary=rotary,
        W_Q=stacked("W_Q") if L else empty, W_K=stacked("W_K") if L else empty,
        W_V=stacked("W_V") if L else empty, W_O=stacked("W_O") if L else empty.transpose(-1, -2),
        b_Q=stack_bias("blocks.{}.attn.q.bias", (H, d)), b_K=stack_bias("blocks.{}.attn.k.bias", (n_kv, d)),
        b_V=stack_bias("blocks.{}.attn.v.bias", (n_kv, d)), b_O=stack_bias("blocks.{}.attn.o.bias", (m,)),
        ln1=norm("ln1"), ln2=norm("ln2") if mlp else None, ln_final=final_norm(model),
        W_in=stacked("W_in") if mlp else None, W_gate=stacked("W_gate") if gated else None,
        b_in=stack_bias("blocks.{}.mlp.in.bias", (model.W_in.shape[-1],)) if mlp else None,
        W_out=stacked("W_out") if mlp else None,
        b_out=stack_bias("blocks.{}.mlp.out.bias", (m,)) if mlp else None,
        act=_activation(model) if mlp else None,
        W_U=model.W_U.detach().clone(),
        b_U=get("unembed.bias") if get("unembed.bias") is not None else ref.new_zeros(model.W_U.shape[1]),
        attn_scale=_attn_scale(model),
        causal=cfg.attention_dir == "causal",
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)) and mlp,
        n_ctx=int(cfg.n_ctx),
        summary=summary(model),
    )


def _attn_scale(model: TransformerBridge) -> float:
    cfg = model.cfg
    if cfg.architecture == NATIVE and cfg.n_layers:
        return float(_native_blocks(model)[0].attn.scale)
    if getattr(cfg, "use_attn_scale", True) and float(getattr(cfg, "attn_scale", -1.0)) > 0:
        return float(cfg.attn_scale)
    return math.sqrt(cfg.d_head)


def _activation(model: TransformerBridge) -> Callable[[Tensor], Tensor]:
    if model.cfg.architecture == NATIVE:
        return _native_blocks(model)[0].mlp.act
    hf = model.original_model.config
    return ACTIVATIONS[getattr(hf, "hidden_act", None) or getattr(hf, "activation_function", None)]


def _rotary(model: TransformerBridge) -> Rotary:
    """The model's own cos/sin tables at positions 0..n_ctx-1."""
    cfg = model.cfg
    if cfg.architecture == NATIVE:
        rot = model.original_model.rotary
        dtype = model.W_E.dtype
        return Rotary(rot.cos_cached.to(dtype).clone(), rot.sin_cached.to(dtype).clone(), interleaved=True)
    module = next(mod for mod in model.original_model.modules() if type(mod).__name__.endswith("RotaryEmbedding"))
    x = model.W_E.new_zeros(1, cfg.n_ctx, cfg.d_head)
    cos, sin = module(x, torch.arange(cfg.n_ctx, device=x.device)[None])
    return Rotary(cos[0].detach().clone(), sin[0].detach().clone(), interleaved=False)


def summary(model: TransformerBridge) -> str:
    """A short description of a model: `attn-only 2L×4H d_model=64` (the architecture named unless native)."""
    cfg = model.cfg
    kind = "attn-only" if cfg.attn_only else f"mlp({cfg.act_fn})"
    arch = "" if cfg.architecture == NATIVE else f"{cfg.architecture} "
    return f"{arch}{kind} {cfg.n_layers}L×{cfg.n_heads}H d_model={cfg.d_model}"


def fingerprint(w: Weights) -> str:
    """Eight hex digits identifying a model's weights (names, shapes and a strided sample of each tensor)."""
    h = hashlib.sha1()
    tensors = {f: getattr(w, f) for f in w.__dataclass_fields__}
    for name in ("ln1", "ln2", "ln_final"):
        norm = tensors.pop(name)
        if norm is not None:
            tensors[f"{name}.weight"], tensors[f"{name}.bias"] = norm.weight, norm.bias
    with torch.no_grad():
        for name, t in sorted(tensors.items()):
            if not isinstance(t, Tensor):
                continue
            flat = t.detach().flatten().double().cpu()
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(flat[::step].numpy().tobytes())
            h.update(flat.sum().numpy().tobytes())
    return h.hexdigest()[:8]

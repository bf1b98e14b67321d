"""The forward pass of a native transformer_lens bridge, computed from its weights, one node at a time.

The native bridge (`TransformerBridge.boot_native`) exposes no per-head q/k/v input hooks, so edge patching
computes the forward itself. `NativeWeights.of(model)` reads the bridge's stacked weights (`W_Q, W_K, W_V,
W_O, b_*, W_E, W_pos, W_U, b_U`, the LayerNorm and MLP parameters) and the pieces here reproduce
`transformer_lens/model_bridge/sources/native/model.py`: pre-LayerNorm blocks, causal (or, with
`attention_dir="bidirectional"`, unmasked) softmax attention with
scores divided by the model's `attn.scale`, masked entries set to 0 after the softmax, an MLP
`fc_out(act(fc_in(ln2(x))))`, and `ln_final` then the unembedding. Each head input gets its own LayerNorm
(the split-q/k/v form): with every edge present all three inputs equal the residual stream, as in the model.

Supported: `normalization_type` "LN" or None, standard positional embeddings, no GQA, no soft-capping,
ungated MLPs; anything else raises a ValueError naming what is unsupported.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.allocator import settle_allocator
from circuits.causal import causal_bias
from circuits.model_cache import cached_read


@dataclass(frozen=True, eq=False)
class NativeWeights:
    """The weights of a native bridge, stacked TransformerLens-style. LayerNorm weights are None without LN;
    MLP weights are None for attention-only models. Example: `w = NativeWeights.of(model); w.W_Q.shape`"""

    W_E: Float[Tensor, "vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer head d_model d_head"]
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_Q: Float[Tensor, "layer head d_head"]
    b_K: Float[Tensor, "layer head d_head"]
    b_V: Float[Tensor, "layer head d_head"]
    b_O: Float[Tensor, "layer d_model"]
    W_U: Float[Tensor, "d_model vocab_out"]
    b_U: Float[Tensor, " vocab_out"]
    ln1: tuple[Tensor, Tensor] | None
    ln2: tuple[Tensor, Tensor] | None
    ln_final: tuple[Tensor, Tensor] | None
    W_in: Tensor | None
    b_in: Tensor | None
    W_out: Tensor | None
    b_out: Tensor | None
    act: Callable[[Tensor], Tensor] | None
    eps: float
    attn_scale: float
    description: str
    causal: bool = True  # False for attention_dir="bidirectional": no mask

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def has_mlp(self) -> bool:
        return self.W_in is not None

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    def qkv_weights(self, which: int) -> tuple[Float[Tensor, "layer head d_model d_head"],
                                               Float[Tensor, "layer head d_head"]]:
        """(W, b) of the queries (`which` 0), keys (1) or values (2)."""
        return ((self.W_Q, self.b_Q), (self.W_K, self.b_K), (self.W_V, self.b_V))[which]

    def ln_at(self, name: str, layer: int) -> tuple[Tensor, Tensor] | None:
        """Weight and bias of one layer's `ln1` or `ln2` (None without LayerNorm)."""
        stacked = getattr(self, name)
        return None if stacked is None else (stacked[0][layer], stacked[1][layer])

    @classmethod
    def of(cls, model: TransformerBridge) -> NativeWeights:
        """Read the weights of a native bridge; raises ValueError for an architecture the engine cannot run.

        The copy is cached per model and reused while no parameter has been replaced or changed in place
        through autograd-visible operations (each tensor's storage and version counter are compared);
        writes through `.data` bypass the version counter, so call `NativeWeights.read(model)` after them.
        """
        settle_allocator()  # patched runs reuse freed memory instead of faulting it in again
        return cached_read(model, "graph", cls.read)

    @classmethod
    def read(cls, model: TransformerBridge) -> NativeWeights:
        """Read (copy) the weights of a native bridge now, bypassing the cache of `of`."""
        _check_supported(model)
        cfg = model.cfg
        sd = model.state_dict()
        L = cfg.n_layers
        with torch.no_grad():
            def stack(fmt: str) -> Tensor:
                return torch.stack([sd[fmt.format(layer)] for layer in range(L)]).detach().clone()

            def ln_pair(name: str) -> tuple[Tensor, Tensor] | None:
                if cfg.normalization_type is None:
                    return None
                return stack(f"blocks.{{}}.{name}.weight"), stack(f"blocks.{{}}.{name}.bias")

            mlp = not cfg.attn_only
            blocks = model.original_model.layers
            w = dict(
                W_E=model.W_E.detach().clone(), W_pos=model.W_pos.detach().clone(),
                W_Q=model.W_Q.detach().clone(), W_K=model.W_K.detach().clone(), W_V=model.W_V.detach().clone(),
                W_O=model.W_O.detach().clone(), b_Q=model.b_Q.detach().clone(), b_K=model.b_K.detach().clone(),
                b_V=model.b_V.detach().clone(), b_O=model.b_O.detach().clone(),
                W_U=model.W_U.detach().clone(), b_U=model.b_U.detach().clone(),
                ln1=ln_pair("ln1"), ln2=ln_pair("ln2") if mlp else None,
                ln_final=None if cfg.normalization_type is None
                else (sd["ln_final.weight"].detach().clone(), sd["ln_final.bias"].detach().clone()),
                W_in=stack("blocks.{}.mlp.in.weight").transpose(1, 2).contiguous() if mlp else None,
                b_in=stack("blocks.{}.mlp.in.bias") if mlp else None,
                W_out=stack("blocks.{}.mlp.out.weight").transpose(1, 2).contiguous() if mlp else None,
                b_out=stack("blocks.{}.mlp.out.bias") if mlp else None,
                act=blocks[0].mlp.act if mlp else None,
                eps=float(cfg.eps),
                attn_scale=float(blocks[0].attn.scale),
                causal=cfg.attention_dir == "causal",
            )
        return cls(**w, description=describe(model))


def _check_supported(model: TransformerBridge) -> None:
    cfg = model.cfg
    if getattr(cfg, "architecture", None) != "TransformerLensNative":
        raise ValueError(
            f"model: the edge-patching engine runs native bridges (TransformerBridge.boot_native / circuits.models); "
            f"got architecture {getattr(cfg, 'architecture', None)!r}"
        )
    problems = []
    if cfg.normalization_type not in (None, "LN"):
        problems.append(f"normalization_type={cfg.normalization_type!r} (supported: 'LN' or None)")
    if (getattr(cfg, "positional_embedding_type", "standard") or "standard") != "standard":
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    if cfg.n_key_value_heads not in (None, cfg.n_heads):
        problems.append(f"n_key_value_heads={cfg.n_key_value_heads} (grouped-query attention)")
    if float(cfg.attn_scores_soft_cap) > 0 or float(cfg.output_logits_soft_cap) > 0:
        problems.append("soft-capping")
    if getattr(cfg, "gated_mlp", False):
        problems.append("gated MLPs")
    if getattr(cfg, "final_rms", False):
        problems.append("final_rms")
    if cfg.attention_dir not in ("causal", "bidirectional"):
        problems.append(f"attention_dir={cfg.attention_dir!r}")
    if not cfg.attn_only and (cfg.act_fn or "").lower() == "solu_ln":
        problems.append("act_fn='solu_ln'")
    if problems:
        raise ValueError("model: the edge-patching engine does not support " + ", ".join(problems))


def describe(model: TransformerBridge) -> str:
    """A short description of a model with a fingerprint of its weights: `attn-only 2L×4H d_model=64 #1a2b3c4d`."""
    cfg = model.cfg
    kind = "attn-only" if cfg.attn_only else f"mlp({cfg.act_fn})"
    if cfg.attention_dir != "causal":
        kind += f" {cfg.attention_dir}"
    return f"{kind} {cfg.n_layers}L×{cfg.n_heads}H d_model={cfg.d_model} #{fingerprint(model)}"


def fingerprint(model: TransformerBridge) -> str:
    """Eight hex digits identifying a model's weights (names, shapes and a strided sample of each tensor)."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().flatten().double().cpu()
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(flat[::step].numpy().tobytes())
            h.update(flat.sum().numpy().tobytes())
    return h.hexdigest()[:8]


def layer_norm(x: Float[Tensor, "*lead d_model"], params: tuple[Tensor, Tensor] | None, eps: float
               ) -> Float[Tensor, "*lead d_model"]:
    """The model's LayerNorm (identity when it has none)."""
    if params is None:
        return x
    return F.layer_norm(x, (x.shape[-1],), params[0], params[1], eps)


def embed(w: NativeWeights, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "2 batch pos d_model"]:
    """The two embedding sources: `W_E[tokens]` and `W_pos[positions]` (broadcast over the batch)."""
    tok = w.W_E[tokens.to(w.device)]
    pos = w.W_pos[: tokens.shape[1]].expand_as(tok)
    return torch.stack([tok, pos])


def attend(
    w: NativeWeights,
    layer: int,
    heads: Int[Tensor, " h"],
    x_q: Float[Tensor, "*kq h batch nq d_model"],
    x_k: Float[Tensor, "*kk h batch pos d_model"],
    x_v: Float[Tensor, "*kv h batch pos d_model"],
    q_pos: Int[Tensor, " nq"],
) -> Float[Tensor, "*k h batch nq d_model"]:
    """The outputs `z @ W_O` of some heads of one layer, each reading its own q, k and v inputs.

    `q_pos` are the positions of the queries in `x_q` (all positions, or the metric positions in the last
    layer); keys and values cover positions 0..pos-1. Leading dims broadcast (a `*k` of 1 shares an input).
    """
    q, k, v = (project(w, layer, heads, x, j) for j, x in enumerate((x_q, x_k, x_v)))
    return attend_projected(w, layer, heads, q, k, v,
                            causal_bias(q_pos.to(q.device), k.shape[-2], q.dtype, causal=w.causal))


def project(w: NativeWeights, layer: int, heads: Int[Tensor, " h"], x: Float[Tensor, "*k h batch pos d_model"],
            which: int) -> Float[Tensor, "*k h batch pos d_head"]:
    """Some heads' queries (`which` 0), keys (1) or values (2) from their inputs: LN(x) @ W + b, per head.
    Example: `project(w, 0, torch.arange(4), resid[:, None].expand(-1, 4, -1, -1, -1), 1)` (every head's keys)"""
    W, b = w.qkv_weights(which)
    return _per_head(layer_norm(x, w.ln_at("ln1", layer), w.eps), W[layer, heads]) + b[layer, heads][:, None, None, :]


def attend_projected(
    w: NativeWeights,
    layer: int,
    heads: Int[Tensor, " h"],
    q: Float[Tensor, "*kq h batch nq d_head"],
    k: Float[Tensor, "*kk h batch pos d_head"],
    v: Float[Tensor, "*kv h batch pos d_head"],
    bias: Float[Tensor, "nq pos"],
) -> Float[Tensor, "*k h batch nq d_model"]:
    """`attend` from the heads' queries, keys and values (see `project`) and the queries' `causal_bias`."""
    scores = q @ k.transpose(-1, -2) / w.attn_scale
    # adding -inf above the diagonal equals the model's masked_fill(-inf), softmax, masked_fill(0): every
    # query sees key 0, so no row is fully masked
    pattern = (scores + bias).softmax(-1)
    return _per_head(pattern @ v, w.W_O[layer, heads])


def _per_head(x: Float[Tensor, "*k h batch pos d_in"], W: Float[Tensor, "h d_in d_out"]
              ) -> Float[Tensor, "*k h batch pos d_out"]:
    """x[..., h, :, :, :] @ W[h] for every head, as one batched product over (batch · pos) rows."""
    lead = x.shape[:-3]
    y = x.reshape(*lead, x.shape[-3] * x.shape[-2], x.shape[-1]) @ W
    return y.view(*lead, x.shape[-3], x.shape[-2], W.shape[-1])


def mlp(w: NativeWeights, layer: int, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
    """An MLP's output `act(ln2(x) @ W_in + b_in) @ W_out` (without `b_out`, a constant of the residual stream)."""
    ln = w.ln_at("ln2", layer)
    return w.act(layer_norm(x, ln, w.eps) @ w.W_in[layer] + w.b_in[layer]) @ w.W_out[layer]


def unembed(w: NativeWeights, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead vocab_out"]:
    """Final LayerNorm and unembedding."""
    return layer_norm(x, w.ln_final, w.eps) @ w.W_U + w.b_U


@dataclass(frozen=True, eq=False)
class SharedRun:
    """The unpatched forward with one residual stream (every head input equal to it, as in the model).

    `sources` [k, n_src, batch, pos, d_model] in graph source order (values, detached from autograd);
    `resid_in[l]` the residual stream entering layer l's attention; `qkv[l]` its heads' (q, k, v), each
    [k, head, batch, pos, d_head]; `mlp_in[l]` the input of layer l's MLP; `final` the input of the final
    LayerNorm; `logits` at the metric positions [k, batch, n, vocab]."""

    blocks: tuple[Tensor, ...]  # the sources by stage, [k_b, n_b, batch, pos, d_model], detached
    resid_in: tuple[Tensor, ...]
    qkv: tuple[tuple[Tensor, Tensor, Tensor], ...]
    mlp_in: tuple[Tensor, ...]
    final: Tensor
    logits: Tensor

    @functools.cached_property
    def sources(self) -> Float[Tensor, "k n_src batch pos d_model"]:
        k = max(b.shape[0] for b in self.blocks)
        return torch.cat([b.expand(k, *b.shape[1:]) for b in self.blocks], dim=1)

    def source_difference(self, other: SharedRun) -> Float[Tensor, "n_src batch pos d_model"]:
        """other's sources − these (first run of each), stage by stage in one pass."""
        return torch.cat([o[:1] - b[:1] for o, b in zip(other.blocks, self.blocks)], dim=1)[0]


def shared_forward(
    w: NativeWeights, emb: Float[Tensor, "k 2 batch pos d_model"], positions: Int[Tensor, " n"],
    *, metric_queries_only: bool = False,
) -> SharedRun:
    """The model's own forward from the embedding sources (one LayerNorm per layer for all heads, not one
    per head input): what every edge present computes, at the cost of one forward of the model.

    `metric_queries_only`: the last layer's heads attend from the metric positions only, as nothing else
    they compute reaches the logits there; their outputs (in `sources`) are 0 at the other positions, and
    `final` there lacks them."""
    resid = emb.sum(1)
    blocks = [emb]
    resid_in, qkv, mlp_in = [], [], []
    n_pos = emb.shape[-2]
    bias = causal_bias(torch.arange(n_pos, device=emb.device), n_pos, emb.dtype, causal=w.causal)
    for layer in range(w.n_layers):
        resid_in.append(resid)
        ln = layer_norm(resid, w.ln_at("ln1", layer), w.eps)
        K, B, P, D = ln.shape
        H, E = w.n_heads, w.W_Q.shape[-1]
        # q, k and v of every head from one matrix product (as the model computes them)
        W = torch.cat([w.W_Q[layer], w.W_K[layer], w.W_V[layer]]).permute(1, 0, 2).reshape(D, 3 * H * E)
        b = torch.cat([w.b_Q[layer], w.b_K[layer], w.b_V[layer]]).reshape(-1)
        q, k, v = torch.addmm(b, ln.reshape(-1, D), W).view(K, B, P, 3, H, E).permute(3, 0, 4, 1, 2, 5).unbind(0)
        qkv.append((q, k, v))
        rows = positions.to(q.device) if metric_queries_only and layer == w.n_layers - 1 else None
        q_at = q if rows is None else q[..., rows, :]
        n = q_at.shape[-2]
        scores = torch.baddbmm(bias if rows is None else bias[rows], q_at.reshape(-1, n, E),
                               k.reshape(-1, P, E).transpose(-1, -2), alpha=1.0 / w.attn_scale)  # -inf: masked
        out = _per_head(scores.softmax(-1).view(K, H, B, n, P) @ v, w.W_O[layer])  # [k, head, batch, n, d]
        if rows is not None:
            out = out.new_zeros(K, H, B, P, D).index_copy(3, rows, out)
        blocks.append(out)
        resid = resid + out.sum(1) + w.b_O[layer]
        if w.has_mlp:
            x = resid.clone()  # a node of its own: gradients taken at it see the MLP's path only
            mlp_in.append(x)
            m = mlp(w, layer, x)
            blocks.append(m[:, None])
            resid = resid + m + w.b_out[layer]
    final = resid.clone()
    return SharedRun(tuple(b.detach() for b in blocks), tuple(resid_in), tuple(qkv), tuple(mlp_in), final,
                     unembed(w, final[..., positions.to(final.device), :]))


def layer_norm_backward(
    x: Float[Tensor, "*xlead d_model"], grad_out: Float[Tensor, "*lead d_model"],
    params: tuple[Tensor, Tensor] | None, eps: float,
) -> Float[Tensor, "*lead d_model"]:
    """The gradient at a LayerNorm's input `x` given the gradient at its output (identity without LN); `x`
    broadcasts against `grad_out` (one input read by several heads):
    (g − mean g − x̂·mean(g·x̂)) / σ with g = grad_out·weight and x̂ = (x − μ)/σ."""
    if params is None:
        return grad_out
    xhat, sigma = _standardise(x, eps)
    g = grad_out * params[0]
    return (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) / sigma


def layer_norm_jvp(
    x: Float[Tensor, "k batch pos d_model"], t: Float[Tensor, "n batch pos d_model"],
    params: tuple[Tensor, Tensor] | None, eps: float,
) -> Float[Tensor, "k n batch pos d_model"]:
    """The LayerNorm's Jacobian at each of the k inputs `x` applied to each of the n directions `t` (identity
    without LN): weight · (t − mean t − x̂·mean(t·x̂)) / σ, the transpose of `layer_norm_backward`'s map.
    Example: `layer_norm_jvp(run.resid_in[1], diff[:6], (ln_w, ln_b), 1e-5)` ([k, 6, batch, pos, d_model])"""
    if params is None:
        return t[None].expand(x.shape[0], *t.shape)
    xhat, sigma = _standardise(x, eps)
    xhat = xhat[:, None]
    tc = t - t.mean(-1, keepdim=True)
    return (tc - xhat * (t * xhat).mean(-1, keepdim=True)) * (params[0] / sigma[:, None])


def _standardise(x: Float[Tensor, "*lead d_model"], eps: float
                 ) -> tuple[Float[Tensor, "*lead d_model"], Float[Tensor, "*lead 1"]]:
    """x̂ = (x − μ)/σ and σ = sqrt(var + eps) over the last dim (the biased variance, as LayerNorm uses;
    written out because `Tensor.var` is several times slower on CPU)."""
    centred = x - x.mean(-1, keepdim=True)
    sigma = ((centred * centred).mean(-1, keepdim=True) + eps).sqrt()
    return centred / sigma, sigma

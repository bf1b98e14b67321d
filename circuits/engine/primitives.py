"""The pieces of the forward pass every fast path builds on: masks, rotary embeddings, projections, grouped
keys and values, MLPs (plain and gated), embed and unembed. Norms are in `circuits.engine.norm`."""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuits.engine.weights import Rotary, Weights


def hidden_keys(q_pos: Int[Tensor, " nq"], n_keys: int, causal: bool = True) -> Bool[Tensor, "nq n_keys"]:
    """True where a query at q_pos[i] cannot see key j: j > q_pos[i] under causal attention, nowhere under
    bidirectional attention. Example: `hidden_keys(torch.arange(3), 3)` (strictly upper triangular)"""
    keys = torch.arange(n_keys, device=q_pos.device)[None, :]
    if not causal:
        return torch.zeros(len(q_pos), n_keys, dtype=torch.bool, device=q_pos.device)
    return keys > q_pos[:, None]


def attention_bias(q_pos: Int[Tensor, " nq"], n_keys: int, dtype: torch.dtype, causal: bool = True
                   ) -> Float[Tensor, "nq n_keys"]:
    """0 where a query may attend to a key, -inf where `hidden_keys` hides it (added to the scores: the model's
    masked_fill(-inf), softmax, masked_fill(0), as every query sees key 0).
    Example: `scores + attention_bias(torch.arange(P), P, scores.dtype)`"""
    return torch.zeros(len(q_pos), n_keys, dtype=dtype, device=q_pos.device).masked_fill_(
        hidden_keys(q_pos, n_keys, causal), float("-inf"))


def causal_bias(q_pos: Int[Tensor, " nq"], n_keys: int, dtype: torch.dtype) -> Float[Tensor, "nq n_keys"]:
    """`attention_bias` of causal attention. Example: `causal_bias(torch.arange(P), P, torch.float32)`"""
    return attention_bias(q_pos, n_keys, dtype, True)


def rotate(rotary: Rotary | None, x: Float[Tensor, "*lead pos d_head"], pos: Int[Tensor, " pos"]
           ) -> Float[Tensor, "*lead pos d_head"]:
    """Queries or keys at positions `pos` (the second-to-last axis) with the rotary embedding applied to their
    first `rotary.dim` dimensions (unchanged without rotary). Example: `rotate(w.rotary, q, torch.arange(P))`"""
    if rotary is None:
        return x
    return _rotated(rotary, x, rotary.cos[pos], rotary.sin[pos])


def _rotated(rotary: Rotary, x: Float[Tensor, "*lead d_head"], cos: Tensor, sin: Tensor
             ) -> Float[Tensor, "*lead d_head"]:
    """x·cos + turn(x)·sin on the first rotary_dim dimensions, turn pairing (2i, 2i+1) when interleaved,
    (i, i + rotary_dim/2) otherwise; the other dimensions pass unchanged."""
    rd = rotary.dim
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    if rotary.interleaved:
        pairs = x_rot.unflatten(-1, (rd // 2, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
    else:
        turned = torch.cat((-x_rot[..., rd // 2:], x_rot[..., : rd // 2]), -1)
    out = x_rot * cos.to(x.dtype) + turned * sin.to(x.dtype)
    return torch.cat([out, x_pass], -1) if x_pass.shape[-1] else out


def expand_kv(w: Weights, t: Float[Tensor, "..."], axis: int = -3) -> Float[Tensor, "..."]:
    """Keys or values with one entry per key/value head on axis `axis`, repeated for each query head of its
    group (head h reads key/value head h // group_size, the order of Hugging Face's repeat_kv); unchanged
    without grouped-query attention."""
    g = w.group_size
    return t if g == 1 else t.repeat_interleave(g, dim=axis)


def project_normed(w: Weights, layer: int, xn: Float[Tensor, "*lead d_model"], which: str
                   ) -> Float[Tensor, "*lead head d_head"]:
    """q, k or v of every (query or key/value) head from the normalised residual stream, as one product
    (before any rotary embedding)."""
    W = {"q": w.W_Q, "k": w.W_K, "v": w.W_V}[which][layer]
    b = {"q": w.b_Q, "k": w.b_K, "v": w.b_V}[which][layer]
    H, m, d = W.shape
    out = torch.addmm(b.reshape(1, H * d), xn.reshape(-1, m), W.transpose(0, 1).reshape(m, H * d))
    return out.view(*xn.shape[:-1], H, d)


def per_head(x: Float[Tensor, "*outer head *inner rows d_in"], W: Float[Tensor, "head d_in d_out"], at: int
             ) -> Float[Tensor, "*outer head *inner rows d_out"]:
    """x[..., h, ...] @ W[h] for every head (the head axis at position `at`), as one batched product over the
    rows of each head. Example: `per_head(z, w.W_O[layer], 0)` (each head's output, z [head, batch, pos, d_head])"""
    outer = x.shape[:at]
    rows = x.reshape(math.prod(outer), x.shape[at], -1, x.shape[-1])
    return (rows @ W).view(*x.shape[:-1], W.shape[-1])


def embed(w: Weights, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "n_embed batch pos d_model"]:
    """The embedding sources: the token embedding `W_E[tokens]` (times the model's embedding scale) and, with
    learned positions, `W_pos[positions]` (broadcast over the batch). Example: `embed(w, tokens).sum(0)`"""
    tok = scaled_embedding(w, w.W_E[tokens.to(w.device)])
    if w.W_pos is None:
        return tok[None]
    return torch.stack([tok, w.W_pos[: tokens.shape[1]].expand_as(tok)])


def scaled_embedding(w: Weights, tok: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
    """Token embeddings (rows of W_E) as the model adds them to the residual stream: times its embedding scale
    (Gemma's √d_model), in their own dtype. Example: `scaled_embedding(w, w.W_E)`"""
    return tok if w.embed_scale == 1.0 else tok * torch.tensor(w.embed_scale, dtype=tok.dtype)


def affine(x: Float[Tensor, "*lead d_in"], W: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"]
           ) -> Float[Tensor, "*lead d_out"]:
    """x W + b as one product that starts from the bias (a separate addition broadcast over the leading axes
    is a second pass over the output). Example: `affine(x, w.W_U, w.b_U)`"""
    if x.dim() < 2:
        return x @ W + b
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), W).view(*x.shape[:-1], W.shape[-1])


def mlp_hidden(w: Weights, layer: int, xn: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_mlp"]:
    """The MLP's hidden activation from its normalised input: act(xn W_in + b_in), or for a gated MLP
    act(xn W_gate) · (xn W_in + b_in)."""
    pre = affine(xn, w.W_in[layer], w.b_in[layer])
    if w.W_gate is None:
        return w.act(pre)
    return w.act(xn @ w.W_gate[layer]) * pre


def mlp(w: Weights, layer: int, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
    """An MLP's output from its residual input without `b_out` (a constant of the residual stream, not part of
    the MLP's source in the graph): hidden(ln2(x)) @ W_out."""
    return mlp_hidden(w, layer, w.ln2.at(layer)(x)) @ w.W_out[layer]


def mlp_output(w: Weights, layer: int, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
    """The MLP's whole output `hidden(ln2(x)) W_out + b_out` (zero for attention-only models)."""
    if w.W_in is None:
        return torch.zeros_like(x)
    return mlp(w, layer, x) + w.b_out[layer]


def unembed(w: Weights, resid: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead vocab_out"]:
    """The final norm then the unembedding. Example: `unembed(w, run.final)`"""
    return affine(w.ln_final(resid), w.W_U, w.b_U)

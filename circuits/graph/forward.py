"""The edge-patching forward: the engine's forward (`circuits.engine`) with one input per head and per MLP.

Edge patching gives each head's q, k and v input and each MLP's input its own residual stream, so the forward
is computed from the model's weights (`circuits.engine.Weights`), one node at a time: each head input gets its
own normalisation (with every edge present all three inputs equal the residual stream, as in the model);
rotary embeddings rotate queries and keys after their projection; under grouped-query attention a key or
value input belongs to one key/value head and is read by every query head of its group; with parallel
attention and MLP (GPT-NeoX) the MLP reads the block's input. The architectures are those of
`circuits.engine.ARCHITECTURES`. `shared_forward` is the unpatched forward with one residual stream, for the
clean run and for gradients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.engine import Weights, attention_bias, embed, expand_kv, mlp, rotate, unembed
from circuits.engine.primitives import per_head
from circuits.engine.run import forward

__all__ = ["SharedRun", "Weights", "attend", "attend_values", "embed", "kv_heads", "mlp", "project",
           "shared_forward", "unembed"]


def kv_heads(w: Weights, heads: Int[Tensor, " h"]) -> Int[Tensor, " h"]:
    """The key/value head each query head reads (itself without grouped-query attention)."""
    return heads // w.group_size


def attend(
    w: Weights,
    layer: int,
    x_q: Float[Tensor, "*kq head batch nq d_model"],
    x_k: Float[Tensor, "*kk kv_head batch pos d_model"],
    x_v: Float[Tensor, "*kv kv_head batch pos d_model"],
    q_pos: Int[Tensor, " nq"],
) -> Float[Tensor, "*k head batch nq d_model"]:
    """The outputs `z @ W_O` of every head of one layer, each query head reading its own q input and the k and
    v inputs of its key/value head (`x_k`, `x_v`: one input per key/value head).

    `q_pos` are the positions of the queries in `x_q` (all positions, or the metric positions in the last
    layer); keys and values cover positions 0..pos-1. Leading dims broadcast (a `*k` of 1 shares an input).
    """
    heads = torch.arange(w.n_heads, device=x_q.device)
    kv = torch.arange(w.n_kv_heads, device=x_q.device)
    all_pos = torch.arange(x_k.shape[-2], device=x_k.device)
    q = project(w, layer, heads, x_q, 0, q_pos)
    k = expand_kv(w, project(w, layer, kv, x_k, 1, all_pos), axis=-4)
    v = expand_kv(w, project(w, layer, kv, x_v, 2, all_pos), axis=-4)
    z = attend_values(w, q, k, v, attention_bias(q_pos.to(q.device), k.shape[-2], q.dtype, w.causal))
    return per_head(z, w.W_O[layer], z.dim() - 4)


def project(w: Weights, layer: int, heads: Int[Tensor, " h"], x: Float[Tensor, "*k h batch pos d_model"],
            which: int, pos: Int[Tensor, " pos"]) -> Float[Tensor, "*k h batch pos d_head"]:
    """Some heads' queries (`which` 0), keys (1) or values (2) from their inputs at positions `pos`:
    ln1(x) @ W + b per head (key/value heads for 1 and 2), rotated for queries and keys of rotary models.
    Example: `project(w, 0, torch.arange(4), resid[:, None].expand(-1, 4, -1, -1, -1), 1, torch.arange(P))`"""
    W, b = w.qkv_weights(which)
    y = per_head(w.ln1.at(layer)(x), W[layer, heads], x.dim() - 4) + b[layer, heads][:, None, None, :]
    return y if which == 2 else rotate(w.rotary, y, pos)


def attend_values(
    w: Weights,
    q: Float[Tensor, "*kq h batch nq d_head"],
    k: Float[Tensor, "*kk h batch pos d_head"],
    v: Float[Tensor, "*kv h batch pos d_head"],
    bias: Float[Tensor, "nq pos"],
) -> Float[Tensor, "*k h batch nq d_head"]:
    """Each head's z (its pattern times its values, before W_O) from its (rotated) queries, the keys and values
    it reads (one per query head) and the queries' `attention_bias`."""
    scores = q @ k.transpose(-1, -2) / w.attn_scale
    # adding -inf where a key is hidden equals the model's masked_fill(-inf), softmax, masked_fill(0): every
    # query sees key 0, so no row is fully masked
    return (scores + bias).softmax(-1) @ v


@dataclass(frozen=True, eq=False)
class SharedRun:
    """The unpatched forward with one residual stream (every head input equal to it, as in the model).

    `sources` [k, n_src, batch, pos, d_model] in graph source order (values, detached from autograd);
    `resid_in[l]` the residual stream entering layer l's attention; `qkv[l]` its (q, k, v) before any rotary
    embedding, [k, head, batch, pos, d_head] (key/value heads for k and v); `mlp_in[l]` the input of layer l's
    MLP; `final` the input of the final norm; `logits` at the metric positions [k, batch, n, vocab]."""

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
    w: Weights, emb: Float[Tensor, "k n_embed batch pos d_model"], positions: Int[Tensor, " n"],
    *, metric_queries_only: bool = False,
) -> SharedRun:
    """The model's own forward from the embedding sources (one norm per layer for all heads, not one per head
    input): what every edge present computes, at the cost of one forward of the model (the engine's recorder,
    `circuits.engine.run.forward`, keeping the graph's sources with heads after the run axis).

    `metric_queries_only`: the last layer's heads attend from the metric positions only, as nothing else
    they compute reaches the logits there; their outputs (in `sources`) are 0 at the other positions, and
    `final` there lacks them."""
    positions = positions.to(emb.device)
    rec = forward(w, emb.sum(1), record=("resid_pre", "qkv_heads", "head_out", "mlp_in", "mlp"), heads_at=1,
                  queries=positions if metric_queries_only else None)
    blocks = [emb]
    for layer in range(w.n_layers):
        blocks.append(rec.head_out[layer])
        if w.has_mlp:
            blocks.append(rec.mlp[layer][:, None])
    final = rec.final.clone()
    return SharedRun(tuple(b.detach() for b in blocks), tuple(rec.resid_pre), tuple(rec.qkv_heads),
                     tuple(rec.mlp_in), final, unembed(w, final[..., positions, :]))

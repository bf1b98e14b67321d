"""Circuits known from a model's weights: which edges can carry anything, read off the residual subspaces.

In a model without LayerNorm whose components read and write disjoint sets of residual dimensions (tracr's
compiled models, the planted induction model), an edge source → destination can carry information only if
the source writes a dimension the destination reads. `residual_circuit` computes, from the weights alone:

- what each source writes: the nonzero columns of `W_E` (token embedding), `W_pos` (positional embedding),
  a head's OV circuit `W_V W_O` and an MLP's `W_out`;
- what each destination reads: a head's query input the nonzero rows of its QK circuit `W_Q W_Kᵀ` (and of
  `W_K b_Q` for the key side), its key input the nonzero columns, its value input the nonzero rows of
  `W_V W_O`, an MLP's input the nonzero rows of `W_in`, the logits the nonzero rows of `W_U`;
- an edge wherever the two overlap, then (as ACDC does) the edges into heads and MLPs whose output reaches
  nothing are dropped (`prune_dead_ends`).

Conventions for tracr models: the 'one' direction is written by the token embedding (every token embeds
it, BOS included), so an edge tok_embed → d exists wherever d reads 'one' (MLPs use it as a bias, queries
to attend to BOS by default); BOS is an ordinary token of the token embedding (the keys that read
`tokens:BOS` get an edge from tok_embed), and the metric never reads position 0; padded heads and MLPs
(all-zero weights) read and write nothing, so they have no edges: any edge a method finds into or out of
them is a false positive (their outputs are exactly zero, so they carry nothing under any ablation).

Example: `residual_circuit(from_tracr(compile_program("reverse").assembled)).n_edges`
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.engine import Weights
from circuits.graph.acdc import prune_dead_ends
from circuits.graph.circuit import Circuit
from circuits.graph.nodes import ComputeGraph, NodeKind
from circuits.graph.patching import Ablation, EdgePatcher
from circuits.tasks.task import Task


def residual_circuit(model: TransformerBridge, *, heads: Iterable[tuple[int, int]] | None = None) -> Circuit:
    """The circuit of every edge whose source writes a residual dimension its destination reads.

    `heads`: the (layer, head) pairs that take part (default: all); the others are treated as writing and
    reading nothing (for a model whose unused heads hold small random weights, like the planted model).
    Raises ValueError for a model with LayerNorm (it mixes every dimension). Scores are nan.
    Example: `residual_circuit(planted, heads=[planted.planted.previous_token, planted.planted.induction])`
    """
    if model.cfg.normalization_type is not None:
        raise ValueError("model: a known circuit from residual subspaces needs a model without LayerNorm "
                         f"(normalization_type=None), got {model.cfg.normalization_type!r}")
    w = Weights.of(model)
    graph = ComputeGraph.of(model)
    taking_part = _head_mask(heads, w.n_layers, w.n_heads)
    writes = source_writes(w, graph, taking_part)
    reads = destination_reads(w, graph, taking_part)
    members = (writes.double() @ reads.double().T > 0) & graph.valid
    members = prune_dead_ends(members, graph)
    return Circuit(graph, torch.full(graph.valid.shape, float("nan")), members,
                   dict(model=w.description, method="known"))


def _head_mask(heads: Iterable[tuple[int, int]] | None, n_layers: int, n_heads: int) -> Bool[Tensor, "layer head"]:
    if heads is None:
        return torch.ones(n_layers, n_heads, dtype=torch.bool)
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"heads: ({layer}, {head}) is not a head of a {n_layers}-layer, {n_heads}-head model")
        mask[layer, head] = True
    return mask


def _nonzero(x: Tensor, dim: int) -> Bool[Tensor, "..."]:
    """True where a row (dim=1) or column (dim=0) of x has any nonzero entry."""
    return (x != 0).any(dim)


def source_writes(w: Weights, graph: ComputeGraph, heads: Bool[Tensor, "layer head"]
                  ) -> Bool[Tensor, "n_src d_model"]:
    """The residual dimensions each source writes (in graph source order)."""
    out = []
    for node in graph.sources:
        if node.kind is NodeKind.TOK_EMBED:
            out.append(_nonzero(w.W_E, 0))
        elif node.kind is NodeKind.POS_EMBED:
            out.append(_nonzero(w.W_pos, 0))
        elif node.kind is NodeKind.HEAD:
            ov = w.W_V[node.layer, node.head].double() @ w.W_O[node.layer, node.head].double()
            bias = w.b_V[node.layer, node.head].double() @ w.W_O[node.layer, node.head].double()
            out.append((_nonzero(ov, 0) | (bias != 0)) & heads[node.layer, node.head])
        else:
            out.append(_nonzero(w.W_out[node.layer], 0))
    return torch.stack(out).cpu()


def destination_reads(w: Weights, graph: ComputeGraph, heads: Bool[Tensor, "layer head"]
                      ) -> Bool[Tensor, "n_dst d_model"]:
    """The residual dimensions each destination reads (in graph destination order)."""
    out = []
    for node in graph.destinations:
        if node.kind is NodeKind.HEAD_INPUT:
            layer, head = node.layer, node.head
            W_Q, W_K = w.W_Q[layer, head].double(), w.W_K[layer, head].double()
            qk = W_Q @ W_K.T
            if node.qkv == "q":
                reads = _nonzero(qk, 1) | (W_Q @ w.b_K[layer, head].double() != 0)
            elif node.qkv == "k":
                reads = _nonzero(qk, 0) | (W_K @ w.b_Q[layer, head].double() != 0)
            else:
                reads = _nonzero(w.W_V[layer, head].double() @ w.W_O[layer, head].double(), 1)
            out.append(reads & heads[layer, head])
        elif node.kind is NodeKind.MLP:
            out.append(_nonzero(w.W_in[node.layer], 1))
        else:
            out.append(_nonzero(w.W_U, 1))
    return torch.stack(out).cpu()


def circuit_nodes(circuit: Circuit) -> Bool[Tensor, " n_src"]:
    """The components (graph sources: embeddings, heads, MLPs) a circuit uses: those with a member edge out
    of them or into one of their inputs. Example: `circuit_nodes(result.circuit).sum()`"""
    g, m = circuit.graph, circuit.members.cpu()
    used = m.any(1).clone()
    for d in range(g.n_destinations):
        s = g.source_index_of_destination(d)
        if s is not None and bool(m[:, d].any()):
            used[s] = True
    return used


def inert_edges(model: TransformerBridge, task: Task, circuit: Circuit, ablation: Ablation | str = Ablation.ZERO,
                *, rtol: float = 1e-6) -> Bool[Tensor, "n_src n_dst"]:
    """The member edges of `circuit` whose removal alone from the full model changes no logit on the task's
    inputs (by more than `rtol` times the largest |logit|, at least 1), under `ablation`: edges that carry
    nothing there, which no method can tell from edges outside the circuit. All in one batched run, against
    the full model's run along the same path.
    Example: `inert_edges(model, program_task(model).task, residual_circuit(model)).sum()`"""
    patcher = EdgePatcher(model, task, ablation)
    members = circuit.members.nonzero().tolist()
    masks = patcher.graph.valid[None].repeat(len(members) + 1, 1, 1)
    for i, (s, d) in enumerate(members):
        masks[i, s, d] = False
    logits = patcher.run(masks.to(patcher.device)).cpu()
    tol = rtol * max(1.0, float(logits[-1].abs().max()))
    change = (logits[:-1] - logits[-1]).abs().flatten(1).amax(1)
    inert = torch.zeros_like(circuit.members)
    for (s, d), c in zip(members, change.tolist()):
        inert[s, d] = c <= tol
    return inert

"""The nodes and edges of a model's computational graph, and the graph's fixed structure.

Sources write into the residual stream: the token embedding, the positional embedding (models with learned
positions only; rotary models have none), each head's output (its `z @ W_O`, without the layer's `b_O`) and
each MLP's output (without `b_out`). Destinations read from it: each head's q input, each key/value head's k
and v input (one per head without grouped-query attention; under it one per group of query heads sharing
them, named `L{l}G{g}.k`/`.v`, see docs/conventions.md), each MLP's input, and the logits (the input of the
final norm and unembedding). An edge joins every source to every destination downstream of it.

The output biases `b_O` and `b_out` belong to no source: they are a constant part of every downstream
destination's input and are never ablated.

Order (used by every dense tensor): sources are `tok_embed` (`pos_embed`), then for each layer its heads and
then its MLP; destinations are, for each layer, `L{l}H0.q … L{l}H{H-1}.q`, then the k inputs, then the v
inputs, then `MLP{l}`, and finally `logits`. Each node has a `stage` (0 for the embeddings, 2l+1 for layer
l's attention, 2l+2 for its MLP, 2L+1 for the logits; the MLP's input reads at stage 2l+1 in models with
parallel attention and MLP, where it reads the block's input); an edge exists iff the source's stage is
below the destination's.

For an attention-only model with L layers and H heads (split embeddings) the number of edges is
`attn_only_edge_count(L, H) = 3H·(2L + H·L(L−1)/2) + 2 + H·L`: layer l's 3H head inputs each read the two
embeddings and the H·l heads below, and the logits read the two embeddings and all H·L heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from jaxtyping import Bool
from torch import Tensor
from transformer_lens import TransformerBridge


class NodeKind(str, Enum):
    """What a node of the computational graph is (the `kind` attribute of the networkx nodes)."""

    TOK_EMBED = "tok_embed"
    """The token embedding `W_E[tokens]` (a source)."""
    POS_EMBED = "pos_embed"
    """The positional embedding `W_pos[positions]` (a source)."""
    HEAD = "head"
    """A head's output `z_h @ W_O[h]` (a source)."""
    HEAD_INPUT = "head_input"
    """A head's q, k or v input: the residual stream that head's W_Q, W_K or W_V reads (a destination)."""
    MLP = "mlp"
    """An MLP: its input is a destination and its output a source; one node in the networkx graph."""
    LOGITS = "logits"
    """The input of the final LayerNorm and unembedding (a destination)."""


@dataclass(frozen=True)
class Node:
    """A source or a destination. `layer` is -1 for embeddings, n_layers for the logits; `qkv` is set for
    head inputs only. `name` is the node id of the networkx graph (its schema: the `circuits.graph` docstring)."""

    name: str
    kind: NodeKind
    layer: int
    head: int | None = None
    qkv: str | None = None
    reads_block_input: bool = False  # an MLP input of a model with parallel attention and MLP

    @property
    def stage(self) -> int:
        """Topological stage: 0 embeddings, 2l+1 attention of layer l, 2l+2 MLP of layer l (2l+1 for the input
        of a parallel MLP), 2L+1 logits."""
        if self.kind in (NodeKind.TOK_EMBED, NodeKind.POS_EMBED):
            return 0
        if self.kind in (NodeKind.HEAD, NodeKind.HEAD_INPUT) or self.reads_block_input:
            return 2 * self.layer + 1
        if self.kind is NodeKind.MLP:
            return 2 * self.layer + 2
        return 2 * self.layer + 1  # logits: layer = n_layers


@dataclass(frozen=True)
class Edge:
    """An edge from `source` to `destination`, with its indices into the dense (sources × destinations) tensors."""

    source: Node
    destination: Node
    src: int
    dst: int

    @property
    def name(self) -> str:
        """`"pos_embed->L0H2.q"`."""
        return f"{self.source.name}->{self.destination.name}"


def head_node_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def input_node_name(layer: int, head: int, qkv: str, group_size: int = 1) -> str:
    """`L1H2.q`; a k or v input under grouped-query attention is its key/value head's: `L1G0.k`."""
    if qkv != "q" and group_size > 1:
        return f"L{layer}G{head}.{qkv}"
    return f"{head_node_name(layer, head)}.{qkv}"


@dataclass(frozen=True, eq=False)
class ComputeGraph:
    """The fixed structure of a model's graph: its sources, destinations and which pairs are edges.

    `valid` is [n_sources, n_destinations], True where an edge exists. Build with `ComputeGraph.of(model)` or
    `ComputeGraph.build(n_layers, n_heads, has_mlp=...)`. Example: `ComputeGraph.build(2, 4).n_edges == 106`
    """

    n_layers: int
    n_heads: int
    has_mlp: bool
    sources: tuple[Node, ...]
    destinations: tuple[Node, ...]
    valid: Bool[Tensor, "n_src n_dst"]
    n_kv_heads: int | None = None
    pos_embed: bool = True
    parallel: bool = False

    @classmethod
    def build(cls, n_layers: int, n_heads: int, *, has_mlp: bool = False, n_kv_heads: int | None = None,
              pos_embed: bool = True, parallel: bool = False) -> ComputeGraph:
        """The graph of a model with `n_layers` layers of `n_heads` heads (and an MLP per layer if `has_mlp`);
        `n_kv_heads` key/value heads (grouped-query attention when fewer than `n_heads`), a positional
        embedding source when `pos_embed`, MLPs reading the block's input when `parallel`."""
        n_kv = n_heads if n_kv_heads is None else n_kv_heads
        if n_layers < 0 or n_heads < 1 or n_kv < 1 or n_heads % n_kv:
            raise ValueError(f"n_layers must be >= 0, n_heads >= 1 and a multiple of n_kv_heads >= 1; "
                             f"got {n_layers}, {n_heads}, {n_kv}")
        group = n_heads // n_kv
        sources = [Node("tok_embed", NodeKind.TOK_EMBED, -1)]
        if pos_embed:
            sources.append(Node("pos_embed", NodeKind.POS_EMBED, -1))
        destinations = []
        for layer in range(n_layers):
            sources += [Node(head_node_name(layer, h), NodeKind.HEAD, layer, h) for h in range(n_heads)]
            destinations += [Node(input_node_name(layer, h, qkv, group), NodeKind.HEAD_INPUT, layer, h, qkv)
                             for qkv in "qkv" for h in range(n_heads if qkv == "q" else n_kv)]
            if has_mlp:
                sources.append(Node(f"MLP{layer}", NodeKind.MLP, layer))
                destinations.append(Node(f"MLP{layer}", NodeKind.MLP, layer, reads_block_input=parallel))
        destinations.append(Node("logits", NodeKind.LOGITS, n_layers))
        src_stage = torch.tensor([s.stage for s in sources])
        dst_stage = torch.tensor([d.stage for d in destinations])
        valid = src_stage[:, None] < dst_stage[None, :]
        return cls(n_layers, n_heads, has_mlp, tuple(sources), tuple(destinations), valid,
                   n_kv if n_kv != n_heads else None, pos_embed, parallel and has_mlp)

    @classmethod
    def of(cls, model: TransformerBridge) -> ComputeGraph:
        """The graph of a transformer_lens bridge (attention-only or with MLPs; learned or rotary positions;
        grouped-query attention; parallel attention and MLP)."""
        cfg = model.cfg
        has_mlp = not cfg.attn_only and cfg.n_layers > 0
        return cls.build(cfg.n_layers, cfg.n_heads, has_mlp=has_mlp, n_kv_heads=cfg.n_key_value_heads or None,
                         pos_embed=(getattr(cfg, "positional_embedding_type", None) or "standard") == "standard",
                         parallel=bool(getattr(cfg, "parallel_attn_mlp", False)) and has_mlp)

    @property
    def n_embed(self) -> int:
        """How many embedding sources lead the source order (1 with rotary positions, else 2)."""
        return 2 if self.pos_embed else 1

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer (`n_heads` without grouped-query attention)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def group_size(self) -> int:
        return self.n_heads // self.kv_heads

    @property
    def inputs_per_layer(self) -> int:
        """Head-input destinations per layer: n_heads q inputs and kv_heads k and v inputs each."""
        return self.n_heads + 2 * self.kv_heads

    def input_index(self, layer_start: int, head: int, which: int) -> int:
        """The destination index of query head `head`'s q (`which` 0), k (1) or v (2) input, in the layer whose
        head inputs start at `layer_start` (k and v: its key/value head's)."""
        if which == 0:
            return layer_start + head
        return layer_start + self.n_heads + (which - 1) * self.kv_heads + head // self.group_size

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def n_destinations(self) -> int:
        return len(self.destinations)

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    @property
    def destination_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.destinations)

    def edges(self) -> list[Edge]:
        """Every edge, destination-major in graph order."""
        return [
            Edge(self.sources[s], self.destinations[d], s, d)
            for d in range(self.n_destinations) for s in range(self.n_sources) if self.valid[s, d]
        ]

    def edge(self, source: str, destination: str) -> Edge:
        """The edge between two named nodes, e.g. `graph.edge("L0H2", "L1H1.k")`."""
        try:
            s = self.source_names.index(source)
        except ValueError:
            raise ValueError(f"source: no source named {source!r}; sources are {self.source_names}") from None
        try:
            d = self.destination_names.index(destination)
        except ValueError:
            raise ValueError(
                f"destination: no destination named {destination!r}; destinations are {self.destination_names}"
            ) from None
        if not self.valid[s, d]:
            raise ValueError(f"{source} -> {destination} is not an edge: the source is not upstream of the destination")
        return Edge(self.sources[s], self.destinations[d], s, d)

    def source_index_of_destination(self, d: int) -> int | None:
        """For a head input or MLP input, the index of the source it feeds (its head or MLP); None for logits."""
        node = self.destinations[d]
        if node.kind is NodeKind.HEAD_INPUT:
            if node.qkv != "q" and self.group_size > 1:
                return None  # read by a group of heads: see `sources_of_destination`
            return self.source_names.index(head_node_name(node.layer, node.head))
        if node.kind is NodeKind.MLP:
            return self.source_names.index(node.name)
        return None

    def sources_of_destination(self, d: int) -> list[int]:
        """The sources whose value destination d's input feeds: its head (every head of the group for a shared
        k or v input), its MLP; none for the logits. Example: `graph.sources_of_destination(0)`"""
        node = self.destinations[d]
        if node.kind is NodeKind.HEAD_INPUT:
            heads = [node.head] if node.qkv == "q" else range(node.head * self.group_size,
                                                              (node.head + 1) * self.group_size)
            return [self.source_names.index(head_node_name(node.layer, h)) for h in heads]
        if node.kind is NodeKind.MLP:
            return [self.source_names.index(node.name)]
        return []

    def same_structure(self, other: ComputeGraph) -> bool:
        return self.structure == other.structure

    @property
    def structure(self) -> tuple:
        """What fixes the graph: (n_layers, n_heads, has_mlp, kv_heads, pos_embed, parallel)."""
        return (self.n_layers, self.n_heads, self.has_mlp, self.kv_heads, self.pos_embed, self.parallel)


def attn_only_edge_count(n_layers: int, n_heads: int) -> int:
    """Edges of an attention-only model with split embeddings: 3H·(2L + H·L(L−1)/2) + 2 + H·L.

    Example: `attn_only_edge_count(2, 4) == 106`
    """
    L, H = n_layers, n_heads
    return 3 * H * (2 * L + H * L * (L - 1) // 2) + 2 + H * L

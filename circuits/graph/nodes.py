"""The nodes and edges of a model's computational graph, and the graph's fixed structure.

Sources write into the residual stream: the token embedding, the positional embedding, each head's
output (its `z @ W_O`, without the layer's `b_O`) and each MLP's output (without `b_out`). Destinations read
from it: each head's q, k and v input separately, each MLP's input, and the logits (the input of the final
LayerNorm and unembedding). An edge joins every source to every destination downstream of it.

The output biases `b_O` and `b_out` belong to no source: they are a constant part of every downstream
destination's input and are never ablated.

Order (used by every dense tensor): sources are `tok_embed, pos_embed`, then for each layer its heads and
then its MLP; destinations are, for each layer, `L{l}H0.q … L{l}H{H-1}.q, …k, …v`, then `MLP{l}`, and
finally `logits`. Each node has a `stage` (0 for the embeddings, 2l+1 for layer l's attention, 2l+2 for its
MLP, 2L+1 for the logits); an edge exists iff the source's stage is below the destination's.

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

    @property
    def stage(self) -> int:
        """Topological stage: 0 embeddings, 2l+1 attention of layer l, 2l+2 MLP of layer l, 2L+1 logits."""
        if self.kind in (NodeKind.TOK_EMBED, NodeKind.POS_EMBED):
            return 0
        if self.kind in (NodeKind.HEAD, NodeKind.HEAD_INPUT):
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

    @classmethod
    def build(cls, n_layers: int, n_heads: int, *, has_mlp: bool = False) -> ComputeGraph:
        """The graph of a model with `n_layers` layers of `n_heads` heads (and an MLP per layer if `has_mlp`)."""
        if n_layers < 0 or n_heads < 1:
            raise ValueError(f"n_layers must be >= 0 and n_heads >= 1; got {n_layers}, {n_heads}")
        sources = [Node("tok_embed", NodeKind.TOK_EMBED, -1), Node("pos_embed", NodeKind.POS_EMBED, -1)]
        destinations = []
        for layer in range(n_layers):
            sources += [Node(head_node_name(layer, h), NodeKind.HEAD, layer, h) for h in range(n_heads)]
            destinations += [
                Node(f"{head_node_name(layer, h)}.{qkv}", NodeKind.HEAD_INPUT, layer, h, qkv)
                for qkv in "qkv" for h in range(n_heads)
            ]
            if has_mlp:
                sources.append(Node(f"MLP{layer}", NodeKind.MLP, layer))
                destinations.append(Node(f"MLP{layer}", NodeKind.MLP, layer))
        destinations.append(Node("logits", NodeKind.LOGITS, n_layers))
        src_stage = torch.tensor([s.stage for s in sources])
        dst_stage = torch.tensor([d.stage for d in destinations])
        valid = src_stage[:, None] < dst_stage[None, :]
        return cls(n_layers, n_heads, has_mlp, tuple(sources), tuple(destinations), valid)

    @classmethod
    def of(cls, model: TransformerBridge) -> ComputeGraph:
        """The graph of a transformer_lens bridge (attention-only or with MLPs)."""
        cfg = model.cfg
        return cls.build(cfg.n_layers, cfg.n_heads, has_mlp=not cfg.attn_only)

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
            return self.source_names.index(head_node_name(node.layer, node.head))
        if node.kind is NodeKind.MLP:
            return self.source_names.index(node.name)
        return None

    def same_structure(self, other: ComputeGraph) -> bool:
        return (self.n_layers, self.n_heads, self.has_mlp) == (other.n_layers, other.n_heads, other.has_mlp)


def attn_only_edge_count(n_layers: int, n_heads: int) -> int:
    """Edges of an attention-only model with split embeddings: 3H·(2L + H·L(L−1)/2) + 2 + H·L.

    Example: `attn_only_edge_count(2, 4) == 106`
    """
    L, H = n_layers, n_heads
    return 3 * H * (2 * L + H * L * (L - 1) // 2) + 2 + H * L

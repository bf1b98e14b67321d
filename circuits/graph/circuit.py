"""A circuit: dense (sources × destinations) scores and membership over a model's graph, with selection,
networkx conversion (the shared DiGraph schema, see `circuits.graph`) and an exact JSON round trip."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.graph.nodes import ComputeGraph, Node, NodeKind
from circuits.validate import check_count, check_number

FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class Circuit:
    """Scores and membership for every edge of `graph`.

    `scores` [n_src, n_dst] (nan where unscored or not an edge); `members` [n_src, n_dst] bool, True for the
    circuit's edges (always a subset of `graph.valid`). `attrs` become the networkx graph attributes
    (`model`, `method`, `metric`, `ablation`, `threshold`, ...). Example:
    `Circuit.full(ComputeGraph.build(2, 4)).top_n(10).to_networkx()`
    """

    graph: ComputeGraph
    scores: Float[Tensor, "n_src n_dst"]
    members: Bool[Tensor, "n_src n_dst"]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (self.graph.n_sources, self.graph.n_destinations)
        for name in ("scores", "members"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(getattr(self, name).shape)}")
        if (self.members & ~self.graph.valid.to(self.members.device)).any():
            raise ValueError("members: marks pairs that are not edges (a source not upstream of its destination)")

    @classmethod
    def full(cls, graph: ComputeGraph, scores: Tensor | None = None, **attrs: Any) -> Circuit:
        """Every edge of `graph`, with `scores` (nan if None)."""
        if scores is None:
            scores = torch.full(graph.valid.shape, math.nan)
        return cls(graph, scores.detach().float().cpu(), graph.valid.clone(), dict(attrs))

    @property
    def n_edges(self) -> int:
        return int(self.members.sum())

    def edge_names(self) -> list[str]:
        """`"source->destination"` for each member edge, in graph order."""
        return [e.name for e in self.graph.edges() if self.members[e.src, e.dst]]

    def with_members(self, members: Bool[Tensor, "n_src n_dst"], **attrs: Any) -> Circuit:
        return replace(self, members=members & self.graph.valid, attrs={**self.attrs, **attrs})

    def top_n(self, n: int, *, by_abs: bool = True) -> Circuit:
        """The n edges with the largest scores (|score| unless `by_abs=False`); nan scores rank last."""
        return self.with_members(top_n_mask(self.scores, self.graph.valid, n, by_abs=by_abs))

    def above(self, threshold: float, *, by_abs: bool = True) -> Circuit:
        """The edges whose score (|score| unless `by_abs=False`) exceeds `threshold`."""
        check_number(threshold, "threshold")
        s = self.scores.abs() if by_abs else self.scores
        return self.with_members(torch.nan_to_num(s, nan=-math.inf) > threshold, threshold=threshold)

    def to_networkx(self) -> nx.DiGraph:
        """The circuit as a DiGraph in the shared schema: residual edges source → destination with `score`,
        `qkv`, `kind="residual"`; internal edges `L{l}H{h}.q/k/v` → `L{l}H{h}` for each head input present."""
        g = nx.DiGraph(n_layers=self.graph.n_layers, n_heads=self.graph.n_heads, **self.attrs)
        for e in self.graph.edges():
            if not self.members[e.src, e.dst]:
                continue
            _add_node(g, e.source)
            _add_node(g, e.destination)
            score = float(self.scores[e.src, e.dst])
            g.add_edge(e.source.name, e.destination.name, score=score, qkv=e.destination.qkv, kind="residual")
            if e.destination.kind is NodeKind.HEAD_INPUT:  # a shared k or v input feeds each head of its group
                for src in self.graph.sources_of_destination(e.dst):
                    head = self.graph.sources[src]
                    g.add_node(head.name, kind=NodeKind.HEAD.value, layer=head.layer, head=head.head)
                    g.add_edge(e.destination.name, head.name, score=math.nan, qkv=e.destination.qkv, kind="internal")
        return g

    @classmethod
    def from_networkx(cls, g: nx.DiGraph, graph: ComputeGraph) -> Circuit:
        """The circuit of a DiGraph in the shared schema, over `graph` (which must have its n_layers/n_heads)."""
        if (g.graph.get("n_layers"), g.graph.get("n_heads")) != (graph.n_layers, graph.n_heads):
            raise ValueError(
                f"circuit: a graph of a {g.graph.get('n_layers')}-layer, {g.graph.get('n_heads')}-head model does "
                f"not fit this {graph.n_layers}-layer, {graph.n_heads}-head model"
            )
        scores = torch.full(graph.valid.shape, math.nan)
        members = torch.zeros_like(graph.valid)
        for u, v, data in g.edges(data=True):
            if data.get("kind") == "internal":
                continue
            e = graph.edge(u, v)
            members[e.src, e.dst] = True
            scores[e.src, e.dst] = float(data.get("score", math.nan))
        attrs = {k: v for k, v in g.graph.items() if k not in ("n_layers", "n_heads")}
        return cls(graph, scores, members, attrs)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (nan scores as null); `Circuit.from_json` inverts it exactly."""
        return {
            "format_version": FORMAT_VERSION,
            "n_layers": self.graph.n_layers, "n_heads": self.graph.n_heads, "has_mlp": self.graph.has_mlp,
            "n_kv_heads": self.graph.kv_heads, "pos_embed": self.graph.pos_embed, "parallel": self.graph.parallel,
            "sources": list(self.graph.source_names), "destinations": list(self.graph.destination_names),
            "scores": [[None if math.isnan(x) else x for x in row] for row in self.scores.double().tolist()],
            "members": [[int(x) for x in row] for row in self.members.tolist()],
            "dtype": str(self.scores.dtype).removeprefix("torch."),
            "attrs": {k: _json_value(v) for k, v in self.attrs.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Circuit:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"circuit JSON: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        graph = ComputeGraph.build(data["n_layers"], data["n_heads"], has_mlp=data["has_mlp"],
                                   n_kv_heads=data.get("n_kv_heads"), pos_embed=data.get("pos_embed", True),
                                   parallel=data.get("parallel", False))
        if list(graph.source_names) != data["sources"] or list(graph.destination_names) != data["destinations"]:
            raise ValueError("circuit JSON: node names do not match the graph its shape describes")
        rows = [[math.nan if x is None else x for x in row] for row in data["scores"]]
        scores = torch.tensor(rows, dtype=torch.float64).to(getattr(torch, data.get("dtype", "float32")))
        members = torch.tensor(data["members"], dtype=torch.bool)
        return cls(graph, scores, members, dict(data.get("attrs", {})))

    def save(self, path: str | Path) -> Path:
        """Write the circuit as JSON. Example: `circuit.save("out/circuit.json")`"""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a circuit written by `save` (scores, membership and attributes equal exactly)."""
        return cls.from_json(json.loads(Path(path).read_text()))


def _add_node(g: nx.DiGraph, node: Node) -> None:
    attrs: dict[str, Any] = {"kind": node.kind.value, "layer": node.layer, "head": node.head}
    if node.qkv is not None:
        attrs["qkv"] = node.qkv
    g.add_node(node.name, **attrs)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def top_n_mask(
    scores: Float[Tensor, "n_src n_dst"], valid: Bool[Tensor, "n_src n_dst"], n: int, *, by_abs: bool = True
) -> Bool[Tensor, "n_src n_dst"]:
    """True at the n valid entries with the largest (absolute) scores (n ≥ 0; all of them when n exceeds their
    number); nan ranks last; ties broken by graph order."""
    n = check_count(n, "n")
    s = scores.abs() if by_abs else scores
    s = torch.nan_to_num(s.double(), nan=-math.inf).masked_fill(~valid, -math.inf)
    order = torch.sort(s.flatten(), descending=True, stable=True).indices[: min(n, int(valid.sum()))]
    mask = torch.zeros(s.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view_as(valid) & valid

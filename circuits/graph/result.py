"""The one interface of edge-scoring results (ACDC, EAP, EAP-IG): scores over every (source, destination) pair,
the circuit the method returns, and the same ways to select, rank and draw it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import networkx as nx

from circuits.graph.circuit import Circuit
from circuits.results import LabelledResult


@dataclass(frozen=True, eq=False)
class EdgeResult(LabelledResult):
    """`values` [source, destination]: each edge's score, a change of the method's metric in its own units
    (docs/conventions.md; nan where there is no edge or it was not scored). `circuit`: the method's circuit
    (ACDC: the kept edges; EAP: every edge), with those scores.

    - `.graph` / `.to_networkx()`: the circuit as a DiGraph in the shared schema (see `circuits.graph`): its
      edges with `kind="residual"` and `score`, plus, for drawing, an `kind="internal"` edge from each head input
      present to its head;
    - `.edges`: the circuit's edges, `"source->destination"`, in graph order (the residual edges of `.graph`);
    - `.top(k)`: the k edges with the largest |score| as ((source, destination), score), nan never ranked;
    - `.top_n(n)`: the Circuit of the n edges with the largest |score| (nan last), for `faithfulness`.
    Example: `result.top(5)`; `faithfulness(model, task, result.top_n(16))`
    """

    circuit: Circuit | None = None

    @cached_property
    def graph(self) -> nx.DiGraph:
        return self.circuit.to_networkx()

    def to_networkx(self) -> nx.DiGraph:
        """`.graph` (a copy: the DiGraph is the caller's to change)."""
        return self.graph.copy()

    @property
    def edges(self) -> tuple[str, ...]:
        return tuple(self.circuit.edge_names())

    @property
    def n_edges(self) -> int:
        return self.circuit.n_edges

    def top_n(self, n: int, *, by_abs: bool = True) -> Circuit:
        """The circuit of the n edges with the largest scores (|score| unless `by_abs=False`; nan last)."""
        return self.circuit.top_n(n, by_abs=by_abs)

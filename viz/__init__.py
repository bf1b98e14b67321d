"""Plotly figures for every result type, and standalone HTML reports.

`viz` draws results; it imports the public result types and networkx graphs only, never a method's internals.
Every function returns a `plotly.graph_objects.Figure` styled by `viz.theme.TEMPLATE`.
Example: `viz.report([viz.Section("Heads", "Patching each head.", [viz.draw_result(r)])], "out/report.html")`
"""

from viz.attention import draw_attention
from viz.circuit import draw_circuit
from viz.composition import draw_composition
from viz.curves import draw_faithfulness, draw_roc
from viz.dla import draw_dla
from viz.labelled import draw_bar, draw_facets, draw_heatmap, draw_result
from viz.lens import draw_lens_comparison
from viz.qkov import copying_score, draw_eigenvalues, draw_top_pairs, top_pairs
from viz.report import Section, report
from viz.theme import DIVERGING, SEQUENTIAL, TEMPLATE

__all__ = [
    "DIVERGING", "SEQUENTIAL", "Section", "TEMPLATE", "copying_score", "draw_attention", "draw_bar", "draw_circuit",
    "draw_composition", "draw_dla", "draw_eigenvalues", "draw_facets", "draw_faithfulness", "draw_heatmap",
    "draw_lens_comparison", "draw_result", "draw_roc", "draw_top_pairs", "report", "top_pairs",
]

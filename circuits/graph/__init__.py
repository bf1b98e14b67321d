"""The computational graph, edge patching, circuit discovery (ACDC, EAP, EAP-IG) and faithfulness.

The circuit DiGraph schema (shared with `viz.circuit`; `Circuit.to_networkx()`, `ACDCResult.graph`):
- Graph attributes: `n_layers`, `n_heads`, `model` (a short description with a weight fingerprint),
  `method` ("acdc", "eap", "eap-ig"), `metric`, `ablation`, `threshold` (when relevant), `mode` (ACDC).
- Node ids (strings) and attributes (`layer`: int, `head`: int or None, `kind`: str):
  - "tok_embed"  kind="tok_embed", layer=-1, head=None        (source)
  - "pos_embed"  kind="pos_embed", layer=-1, head=None        (source)
  - "L{l}H{h}"   kind="head", layer=l, head=h                  (source: the head's output)
  - "L{l}H{h}.q", "L{l}H{h}.k", "L{l}H{h}.v"  kind="head_input", layer=l, head=h, qkv="q"|"k"|"v"  (destinations)
  - "MLP{l}"     kind="mlp", layer=l, head=None  (destination of edges into its input, source of edges from its output)
  - "logits"     kind="logits", layer=n_layers, head=None       (destination)
- Edges:
  - residual edges source → destination: `score` (float, nan if not scored), `qkv` ("q"|"k"|"v" for edges
    into head inputs, None otherwise), `kind`="residual".
  - internal edges "L{l}H{h}.q/.k/.v" → "L{l}H{h}": `kind`="internal", `qkv` as the input, `score`=nan;
    present when that input node is in the circuit (they carry no patchable effect; they show the computation).
- A circuit graph contains only the kept edges and the nodes they touch.

Example:
    from circuits.graph import acdc, eap, faithfulness
    result = acdc(model, task, threshold=0.02, ablation="zero")
    faithfulness(model, task, result.graph).normalised
"""

from circuits.graph.acdc import ACDCResult, acdc, prune_dead_ends
from circuits.graph.circuit import Circuit, top_n_mask
from circuits.graph.eap import EAPResult, eap
from circuits.graph.faithfulness import Faithfulness, FaithfulnessCurve, Roc, faithfulness, faithfulness_curve, roc
from circuits.graph.known import circuit_nodes, residual_circuit
from circuits.graph.node_patching import NodePatchingResult, node_patching
from circuits.graph.nodes import ComputeGraph, Edge, Node, NodeKind, attn_only_edge_count
from circuits.graph.patching import Ablation, patch_edges

# The public API, documented in docs/api/graph.md. The engine's pieces (EdgePatcher, NativeWeights, the
# incremental state, the metric resolver) are internals, imported from their modules.
__all__ = [
    "ACDCResult", "Ablation", "Circuit", "ComputeGraph", "EAPResult", "Edge", "Faithfulness", "FaithfulnessCurve",
    "Node", "NodeKind", "Roc", "acdc", "attn_only_edge_count", "eap", "faithfulness", "faithfulness_curve",
    "patch_edges", "prune_dead_ends", "roc", "top_n_mask", "circuit_nodes", "residual_circuit", "NodePatchingResult",
    "node_patching",
]

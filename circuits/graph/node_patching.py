"""Activation patching of whole components on the graph engine: each node's output ablated for every reader.

Removing every outgoing edge of a source replaces its output by its ablated value wherever it is read,
which is activation patching of that component's output (noising: the clean run with one component's
output from the corrupted run, zero, or the batch mean). It runs on the edge-patching engine, so it
works for every model the engine runs (bidirectional tracr models included), all nodes in one batched
forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.graph.metric import resolve_metric
from circuits.graph.patching import Ablation, EdgePatcher
from circuits.results import LabelledResult
from circuits.tasks.task import Metric, Task


@dataclass(frozen=True, eq=False)
class NodePatchingResult(LabelledResult):
    """`values` [node]: the loss increase when that component's output is ablated (graph source order:
    tok_embed, pos_embed, heads and MLPs layer by layer); `labels` their names."""


def node_patching(
    model: TransformerBridge,
    task: Task,
    *,
    ablation: Ablation | str = Ablation.RESAMPLE,
    metric: str | Metric | Callable[[Tensor], Tensor] = "kl",
) -> NodePatchingResult:
    """The loss increase (the metric's `loss` of the patched run minus the clean run's) when each
    component's output is ablated for all its readers, for every component at once.
    Example: `node_patching(model, task, ablation="zero").values`"""
    patcher = EdgePatcher(model, task, ablation)
    gm = resolve_metric(task, metric, patcher.clean_logits_full)
    g = patcher.graph
    masks = g.valid[None].repeat(g.n_sources + 1, 1, 1)
    masks[torch.arange(g.n_sources), torch.arange(g.n_sources)] = False  # row s: every edge out of s
    losses = gm.loss(patcher.run(masks.to(patcher.device))).detach().cpu()
    values: Float[Tensor, " node"] = (losses[:-1] - losses[-1]).float()
    return NodePatchingResult(values=values, dims=("node",), labels=(g.source_names,), method="node_patching",
                              info=dict(metric=gm.name, ablation=patcher.ablation.value,
                                        model=patcher.weights.description))

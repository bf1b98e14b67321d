"""The metric a graph method reads from a patched run's logits at the task's metric positions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.tasks.task import Metric, Task, kl_terms
from circuits.validate import check_finite


@dataclass(frozen=True, eq=False)
class GraphMetric:
    """A metric of logits at the metric positions [k, batch, n, vocab] → [k].

    `higher_is_better` says which way is good: logit_diff and logprob rise towards the clean run, KL (and
    any callable, which is read as a loss) falls towards it. `loss` is the metric oriented so that lower is
    better: what ACDC keeps from rising by more than its threshold.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    higher_is_better: bool

    def __call__(self, logits_at: Float[Tensor, "k batch n vocab"]) -> Float[Tensor, " k"]:
        """The metric of each run; a ValueError if any is NaN or infinite (no decision can rest on it)."""
        value = self.fn(logits_at)
        check_finite(value.detach(), f"metric {self.name!r}", "evaluated circuits")
        return value

    def loss(self, logits_at: Float[Tensor, "k batch n vocab"]) -> Float[Tensor, " k"]:
        value = self(logits_at)
        return -value if self.higher_is_better else value


def resolve_metric(
    task: Task,
    metric: str | Metric | Callable[[Tensor], Tensor] | None,
    clean_logits_full: Float[Tensor, "batch pos vocab"],
) -> GraphMetric:
    """The task's metric (None), a named one ("kl", "logit_diff", "logprob"), or a callable mapping the logits at
    the metric positions [batch, n, vocab] to a scalar loss. Raises ValueError for a non-scalar callable."""
    if callable(metric) and not isinstance(metric, (str, Metric)):
        return _callable_metric(task, metric, clean_logits_full)
    try:
        m = task.metric if metric is None else Metric(metric)
    except ValueError:
        raise ValueError(
            f"metric must be one of {[x.value for x in Metric]}, a callable, or None (the task's); got {metric!r}"
        ) from None
    scored = task.with_metric(m) if m is not Metric.LOGIT_DIFF or task.wrong_answers is not None else None
    if scored is None:
        raise ValueError("metric: 'logit_diff' needs a task with wrong_answers")
    if m is Metric.KL:
        clean_at = task.read_logits(clean_logits_full)  # read once: a metric is called for every evaluation
        log_probs = clean_at.log_softmax(-1)
        return GraphMetric(m.value, lambda logits_at: _mean_kl(task, logits_at, clean_at, log_probs), False)
    return GraphMetric(m.value, scored.score_positions, higher_is_better=True)


def _mean_kl(task: Task, logits_at: Float[Tensor, "k batch n vocab"], clean_at: Float[Tensor, "batch n vocab"],
             clean_logprobs: Float[Tensor, "batch n vocab"]) -> Float[Tensor, " k"]:
    """`task.with_metric("kl").score_positions`, from the clean logits already at the metric positions."""
    if logits_at.shape[-3:-1] != clean_at.shape[:-1]:
        raise ValueError(f"logits: expected [..., {task.batch}, {len(task.positions)}, vocab] at the metric "
                         f"positions, got {tuple(logits_at.shape)}")
    return kl_terms(logits_at, clean_at, clean_logprobs).mean(dim=(-1, -2))


def _callable_metric(task: Task, fn: Callable[[Tensor], Tensor], clean_logits_full: Tensor) -> GraphMetric:
    probe = fn(task.read_logits(clean_logits_full))
    if not isinstance(probe, Tensor) or probe.ndim != 0:
        shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise ValueError(f"metric: expected a callable returning a scalar (0-d tensor) per run, got {shape}")

    def batched(logits_at: Tensor) -> Tensor:
        return torch.stack([fn(one) for one in logits_at])

    return GraphMetric(getattr(fn, "__name__", "custom"), batched, higher_is_better=False)

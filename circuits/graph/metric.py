"""The metric a graph method reads from a patched run's logits at the task's metric positions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.tasks.metrics import MetricSpec, checked_scalar, resolve
from circuits.tasks.task import Metric, Task, kl_terms, metric_terms
from circuits.validate import check_finite


@dataclass(frozen=True, eq=False)
class GraphMetric:
    """A metric of logits at the metric positions [k, batch, n, vocab] → [k].

    `higher_is_better` says which way is good: logit_diff, logprob and any callable rise towards the clean run,
    KL falls towards it. `loss` is the metric oriented so that lower is better: what ACDC keeps from rising by
    more than its threshold. `change(loss_increase)` turns a loss increase back into the metric's own change,
    the sign every method reports (docs/conventions.md).
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    higher_is_better: bool
    columns: Int[Tensor, " c"] | None = None
    """The only vocabulary columns the metric reads, where it reads few (the logit difference: the answers and
    wrong answers); None where it reads every column (KL, log-probabilities, a callable)."""
    on_columns: Callable[[Tensor], Tensor] | None = None
    """The metric of logits restricted to `columns` [k, batch, n, c] (equal to `fn` on the full logits)."""

    def restricted(self) -> GraphMetric:
        """This metric reading logits restricted to `columns` (itself where it reads every column)."""
        if self.columns is None or self.on_columns is None:
            return self
        return GraphMetric(self.name, self.on_columns, self.higher_is_better)

    def __call__(self, logits_at: Float[Tensor, "k batch n vocab"]) -> Float[Tensor, " k"]:
        """The metric of each run; a ValueError if any is NaN or infinite (no decision can rest on it)."""
        value = self.fn(logits_at)
        check_finite(value.detach(), f"metric {self.name!r}", "evaluated circuits")
        return value

    def loss(self, logits_at: Float[Tensor, "k batch n vocab"]) -> Float[Tensor, " k"]:
        value = self(logits_at)
        return -value if self.higher_is_better else value

    def change(self, loss_increase: float) -> float:
        """The metric's change for a rise of its loss by `loss_increase`."""
        return -loss_increase if self.higher_is_better else loss_increase


def resolve_metric(
    task: Task,
    metric: MetricSpec,
    clean_logits_full: Float[Tensor, "batch pos vocab"],
) -> GraphMetric:
    """The metric contract of `circuits.tasks.metrics` for the graph methods: the task's metric (None), a named
    one ("logit_diff", "logprob", "kl"), or a callable mapping the logits at the metric positions
    [batch, n, vocab] to a scalar, higher meaning more of the behaviour. Raises ValueError for a non-scalar
    callable."""
    resolved = resolve(task, metric)
    if resolved.is_custom:
        return _callable_metric(task, resolved.custom, resolved.name, clean_logits_full)
    scored = resolved.task
    if scored.metric is Metric.KL:
        clean_at = task.read_logits(clean_logits_full)  # read once: a metric is called for every evaluation
        log_probs = clean_at.log_softmax(-1)
        return GraphMetric(resolved.name, lambda logits_at: _mean_kl(task, logits_at, clean_at, log_probs), False)
    if scored.metric is Metric.LOGIT_DIFF:
        columns = torch.unique(torch.cat([scored.answers.flatten(), scored.wrong_answers.flatten()]))
        answers, wrong = (torch.searchsorted(columns, t) for t in (scored.answers, scored.wrong_answers))

        def on_columns(logits_at: Tensor) -> Tensor:
            return metric_terms(Metric.LOGIT_DIFF, logits_at, answers, wrong, None).mean(dim=(-1, -2))

        return GraphMetric(resolved.name, scored.score_positions, True, columns, on_columns)
    return GraphMetric(resolved.name, scored.score_positions, higher_is_better=True)


def _mean_kl(task: Task, logits_at: Float[Tensor, "k batch n vocab"], clean_at: Float[Tensor, "batch n vocab"],
             clean_logprobs: Float[Tensor, "batch n vocab"]) -> Float[Tensor, " k"]:
    """`task.with_metric("kl").score_positions`, from the clean logits already at the metric positions."""
    if logits_at.shape[-3:-1] != clean_at.shape[:-1]:
        raise ValueError(f"logits: expected [..., {task.batch}, {len(task.positions)}, vocab] at the metric "
                         f"positions, got {tuple(logits_at.shape)}")
    return kl_terms(logits_at, clean_at, clean_logprobs).mean(dim=(-1, -2))


def _callable_metric(task: Task, fn: Callable[[Tensor], Tensor], name: str, clean_logits_full: Tensor
                     ) -> GraphMetric:
    checked_scalar(fn(task.read_logits(clean_logits_full)))

    def batched(logits_at: Tensor) -> Tensor:
        return torch.stack([checked_scalar(fn(one)) for one in logits_at])

    return GraphMetric(name, batched, higher_is_better=True)

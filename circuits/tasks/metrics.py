"""The one metric contract every method takes (`activation_patch`, `attribution_patch`, `acdc`, `eap`,
`faithfulness`, `faithfulness_curve`).

`metric` is one of:
- `None` (the default everywhere): the task's own metric, `task.metric`;
- a named metric, "logit_diff", "logprob" or "kl" (a string or a `Metric`), scored on the task's data;
- a callable: logits at the task's metric positions [batch, n, vocab] → a 0-d tensor, read like logit_diff
  (higher means more of the behaviour). To use a loss, pass its negative.

Every method reports its scores as a change of this metric, in its own units (see docs/conventions.md).
Example: `resolve(task, "kl").task.metric is Metric.KL`
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from circuits.tasks.task import Metric, Task

CustomMetric = Callable[[Tensor], Tensor]
"""logits at the metric positions [batch, n, vocab] → a 0-d tensor; higher means more of the behaviour."""
MetricSpec = str | Metric | CustomMetric | None


@dataclass(frozen=True, eq=False)
class ResolvedMetric:
    """A method's metric, resolved: `task` scored by the named metric (or unchanged, for a callable), the
    callable if there is one, its `name` ("logit_diff", "logprob", "kl", or the callable's `__name__`), and
    `higher_is_better` (False for KL only)."""

    task: Task
    name: str
    custom: CustomMetric | None
    higher_is_better: bool

    @property
    def is_custom(self) -> bool:
        return self.custom is not None

    def on_full_logits(self) -> Callable[[Float[Tensor, "batch pos vocab"]], Tensor]:
        """The callable applied to a run's full logits [batch, pos, vocab] (it reads the metric positions)."""
        if self.custom is None:
            raise ValueError("on_full_logits: a named metric has no callable")
        fn, task = self.custom, self.task
        return lambda logits: checked_scalar(fn(task.read_logits(logits)))


def resolve(task: Task, metric: MetricSpec) -> ResolvedMetric:
    """Resolve `metric` against `task` (see the module docstring); ValueError naming `metric` otherwise."""
    if callable(metric) and not isinstance(metric, (str, Metric)):
        return ResolvedMetric(task, getattr(metric, "__name__", "custom"), metric, True)
    if metric is not None and not isinstance(metric, (str, Metric)):
        raise ValueError(f"metric must be one of {[m.value for m in Metric]}, a callable, or None (the task's); "
                         f"got {type(metric).__name__}")
    try:
        named = task.metric if metric is None else Metric(metric)
    except ValueError:
        raise ValueError(f"metric must be one of {[m.value for m in Metric]}, a callable, or None (the task's); "
                         f"got {metric!r}") from None
    if named is Metric.LOGIT_DIFF and task.wrong_answers is None:
        raise ValueError("metric: 'logit_diff' needs a task with wrong_answers")
    return ResolvedMetric(task.with_metric(named), named.value, None, named is not Metric.KL)


def checked_scalar(out: object) -> Tensor:
    """A custom metric's output, checked to be one number (a 0-d or one-element tensor)."""
    if not isinstance(out, Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"metric: expected a callable returning a scalar (0-d tensor) per run, got {shape}")
    return out.reshape(())

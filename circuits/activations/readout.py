"""Turning the residual stream at the metric's positions into the metric, reading only what the metric reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.activations import engine
from circuits.tasks import Metric, Task

CustomMetric = Callable[[Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Reader:
    """Scores stacks of final residual streams. For the logit difference only the W_U columns of the answers
    and wrong answers are computed; log-prob and KL need the whole vocabulary (the softmax normaliser), at the
    metric positions only. A custom metric (logits [batch, pos, vocab] → scalar) reads every position.
    Example: `Reader.for_task(w, task, clean_final).score(resid)`"""

    w: engine.Weights
    task: Task  # with answers remapped to `columns` when those are restricted
    read_pos: Int[Tensor, " n"]
    columns: Int[Tensor, " v"] | None
    clean_logits: Tensor | None  # [batch, pos, vocab] (only the metric positions are filled), for KL
    custom: CustomMetric | None = None

    @classmethod
    def for_task(cls, w: engine.Weights, task: Task, clean_final: Float[Tensor, "batch pos d_model"],
                 custom: CustomMetric | None = None) -> Reader:
        device = w.W_U.device
        if custom is not None:
            return cls(w, task, torch.arange(task.seq_len, device=device), None, None, custom)
        read_pos = task.positions.to(device)
        if task.metric is Metric.LOGIT_DIFF:
            both = torch.cat([task.answers.flatten(), task.wrong_answers.flatten()]).to(device)
            columns, inverse = torch.unique(both, return_inverse=True)
            n = task.answers.numel()
            remapped = replace(task, answers=inverse[:n].view_as(task.answers).cpu(),
                               wrong_answers=inverse[n:].view_as(task.answers).cpu())
            return cls(w, remapped, read_pos, columns, None)
        clean = None
        if task.metric is Metric.KL:
            at = engine.unembed(w, clean_final[:, read_pos])
            clean = at.new_zeros(task.batch, task.seq_len, at.shape[-1])
            clean[:, read_pos] = at
        return cls(w, task, read_pos, None, clean)

    def logits(self, resid: Float[Tensor, "*k batch n d_model"]) -> Float[Tensor, "*k batch n v"]:
        return engine.unembed(self.w, resid, self.columns)

    def score(self, resid: Float[Tensor, "*k batch n d_model"]) -> Float[Tensor, "*k"]:
        """The metric of each stacked run, from its residual stream at `read_pos`."""
        logits = self.logits(resid)
        if self.custom is None:
            return self.task.score_positions(logits, self.clean_logits)
        lead = logits.shape[:-3]
        flat = logits.reshape(-1, *logits.shape[-3:])
        return torch.stack([call_metric(self.custom, x) for x in flat]).reshape(lead)


def call_metric(metric: CustomMetric, logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
    """`metric(logits)`, checked to be a scalar."""
    out = metric(logits)
    if not isinstance(out, Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"metric: must return a scalar tensor (one number per run), got {shape}")
    return out.reshape(())


def task_metric(task: Task, clean_logits: Tensor | None, custom: CustomMetric | None
                ) -> Callable[[Tensor], Tensor]:
    """The metric as a function of full logits [*k, batch, pos, vocab] → [*k] (for hook-based runs)."""
    if custom is None:
        return lambda logits: task.score(logits, clean_logits)

    def score(logits: Tensor) -> Tensor:
        flat = logits.reshape(-1, *logits.shape[-3:])
        return torch.stack([call_metric(custom, x) for x in flat]).reshape(logits.shape[:-3])

    return score


def check_tokens(task: Task, n_ctx: int, d_vocab: int) -> None:
    """Clean and corrupted of one shape, within the context window and vocabulary."""
    if task.clean.shape != task.corrupted.shape:
        raise ValueError(f"task: clean {tuple(task.clean.shape)} and corrupted {tuple(task.corrupted.shape)} "
                         "must have the same shape")
    if task.seq_len > n_ctx:
        raise ValueError(f"task: {task.seq_len} tokens exceed the model's context of {n_ctx}")
    for name in ("clean", "corrupted"):
        t = getattr(task, name)
        if t.min() < 0 or t.max() >= d_vocab:
            raise ValueError(f"task.{name}: token ids must lie in [0, {d_vocab})")

"""Turning the residual stream at the metric's positions into the metric, reading only what the metric reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.activations import engine
from circuits.tasks import Metric, Task
from circuits.tasks.metrics import CustomMetric, checked_scalar
from circuits.tasks.task import metric_terms


@dataclass(frozen=True, eq=False)
class Reader:
    """Scores stacks of final residual streams. For the logit difference only the difference of the answer's
    and the wrong answer's W_U columns is applied (one direction per row and position); log-prob and KL need
    the whole vocabulary (the softmax normaliser), at the metric positions only. A custom metric (logits
    [batch, pos, vocab] → scalar) reads every position.
    Example: `Reader.for_task(w, task, clean_final).score(resid)`"""

    w: engine.Weights
    task: Task
    read_pos: Int[Tensor, " n"]
    direction: Float[Tensor, "batch n d_model"] | None  # logit difference: W_U[:, answer] − W_U[:, wrong]
    offset: Float[Tensor, "batch n"] | None  # logit difference: b_U[answer] − b_U[wrong]
    clean_logits: Tensor | None  # [batch, pos, vocab] (only the metric positions are filled), for KL
    custom: CustomMetric | None = None

    @classmethod
    def for_task(cls, w: engine.Weights, task: Task, clean_final: Float[Tensor, "batch pos d_model"],
                 custom: CustomMetric | None = None) -> Reader:
        device = w.W_U.device
        if custom is not None:
            return cls(w, task, torch.arange(task.seq_len, device=device), None, None, None, custom)
        read_pos = task.positions.to(device)
        if task.metric is Metric.LOGIT_DIFF:
            a, b = task.answers.to(device), task.wrong_answers.to(device)
            direction = (w.W_U[:, a] - w.W_U[:, b]).permute(1, 2, 0).contiguous()  # d_model innermost: 6× faster
            return cls(w, task, read_pos, direction, w.b_U[a] - w.b_U[b], None)
        clean = None
        if task.metric is Metric.KL:
            at = engine.unembed(w, clean_final[:, read_pos])
            clean = at.new_zeros(task.batch, task.seq_len, at.shape[-1])
            clean[:, read_pos] = at
        return cls(w, task, read_pos, None, None, clean)

    def terms(self, resid: Float[Tensor, "*k batch n d_model"]) -> Float[Tensor, "*k batch n"]:
        """The task metric's term at each row and read position (the metric is their mean)."""
        if self.direction is not None:
            return self._logit_diff(resid, self.direction, self.offset)
        return self.task.position_terms(engine.unembed(self.w, resid), self.clean_logits)

    def score(self, resid: Float[Tensor, "*k batch n d_model"] | engine.FinalRows) -> Float[Tensor, "*k"]:
        """The metric of each stacked run, from its residual stream at `read_pos`."""
        if isinstance(resid, engine.FinalRows):
            return self._score_rows(resid)
        if self.custom is None:
            return self.terms(resid).mean(dim=(-1, -2))
        logits = engine.unembed(self.w, resid)
        lead = logits.shape[:-3]
        flat = logits.reshape(-1, *logits.shape[-3:])
        return torch.stack([checked_scalar(self.custom(x)) for x in flat]).reshape(lead)

    def _logit_diff(self, resid: Float[Tensor, "... d_model"], direction: Float[Tensor, "... d_model"],
                    offset: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """ln_final(resid) · (W_U[:, answer] − W_U[:, wrong]) + b_U[answer] − b_U[wrong], broadcast over leading
        dims (resid [*k, batch, n] against direction [batch, n], or rows [k, batch] against [k, batch])."""
        return torch.linalg.vecdot(self.w.ln_final(resid), direction) + offset

    def _score_rows(self, r: engine.FinalRows) -> Float[Tensor, " k"]:
        """Scores when each run differs from the base at one read position: only that position is read."""
        if self.custom is not None:
            return self.score(r.full())
        base = self.terms(r.base)  # batch n
        hit = r.at >= 0
        n = r.at.clamp(min=0)
        direction = None if self.direction is None else self.direction[:, n].movedim(1, 0)
        new = self._row_terms(r.rows, n, direction)  # k batch
        change = torch.where(hit[:, None], new - base[:, n].T, 0.0).sum(-1) / base.numel()
        return base.mean() + change

    def _row_terms(self, rows: Float[Tensor, "k batch d_model"], n: Int[Tensor, " k"],
                   direction: Tensor | None) -> Float[Tensor, "k batch"]:
        """The metric term of row k placed at read index n[k]."""
        if direction is not None:
            return self._logit_diff(rows, direction, self.offset[:, n].T)
        logits = engine.unembed(self.w, rows)[:, :, None]  # k batch 1 vocab
        answers = self.task.answers.to(n.device)[:, n].T[..., None]
        clean = None if self.clean_logits is None else self.clean_logits[:, self.read_pos[n]].movedim(1, 0)[:, :, None]
        return metric_terms(self.task.metric, logits, answers, None, clean)[..., 0]


def task_metric(task: Task, clean_logits: Tensor | None, custom: CustomMetric | None
                ) -> Callable[[Tensor], Tensor]:
    """The metric as a function of full logits [*k, batch, pos, vocab] → [*k] (for hook-based runs)."""
    if custom is None:
        return lambda logits: task.score(logits, clean_logits)

    def score(logits: Tensor) -> Tensor:
        flat = logits.reshape(-1, *logits.shape[-3:])
        return torch.stack([checked_scalar(custom(x)) for x in flat]).reshape(logits.shape[:-3])

    return score

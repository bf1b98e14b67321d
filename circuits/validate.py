"""Checks of what callers pass to the public entry points, and of degenerate results, in one place.

Every public method calls these at its top (before any hook is added or any forward run), so bad input gets a
`ValueError` (a `TypeError` for a wrong type or dtype) that names the argument and the range it must lie in, never
a torch `IndexError` from deep inside or a silently wrapped negative index. The degenerate-result checks refuse a
metric that returned NaN or inf and a normalised score computed from 0/0.

Example: `check_task(model, task)`; `check_tokens(model, tokens, "tokens")`; `check_count(n, "n")`
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real

import torch
from torch import Tensor

from circuits.tasks.task import Task

__all__ = [
    "DegenerateTaskWarning", "check_count", "check_finite", "check_gap", "check_ids", "check_number", "check_scores",
    "check_task", "check_tokens", "gap_is_zero",
]


class DegenerateTaskWarning(UserWarning):
    """A task whose clean and corrupted runs score the same: normalised scores are undefined (left NaN)."""


def _vocab_and_context(model) -> tuple[int, int]:
    cfg = model.cfg
    return int(cfg.d_vocab), int(cfg.n_ctx)


def check_ids(ids: object, d_vocab: int, name: str) -> None:
    """`ids` is an integer tensor (any shape) whose entries lie in [0, d_vocab)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name}: expected an integer tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer token ids (torch.long), got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= d_vocab:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: token ids must lie in [0, {d_vocab}) (the model's d_vocab); got {bad}"
                         + (" (negative ids are not read modulo the vocabulary)" if bad < 0 else ""))


def check_tokens(model, tokens: object, name: str = "tokens", *, min_pos: int = 1) -> None:
    """`tokens` is an integer [batch, pos] tensor with batch ≥ 1, min_pos ≤ pos ≤ n_ctx and ids in [0, d_vocab)."""
    d_vocab, n_ctx = _vocab_and_context(model)
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name}: expected an integer tensor [batch, pos], got {type(tokens).__name__}")
    if tokens.ndim != 2:
        raise ValueError(f"{name}: expected shape [batch, pos], got {tuple(tokens.shape)}")
    batch, n_pos = tokens.shape
    if batch < 1:
        raise ValueError(f"{name}: the batch is empty (shape {tuple(tokens.shape)}); expected at least one row")
    if n_pos < min_pos:
        raise ValueError(f"{name}: expected [batch, pos] with pos ≥ {min_pos}, got shape {tuple(tokens.shape)}")
    if n_pos > n_ctx:
        raise ValueError(f"{name}: {n_pos} positions exceed the model's context n_ctx = {n_ctx}")
    check_ids(tokens, d_vocab, name)


def check_task(model, task: object, name: str = "task") -> None:
    """A Task whose tokens and answers fit `model`: integer ids in [0, d_vocab), batch ≥ 1, sequences within n_ctx,
    at least one metric position; clean and corrupted of one shape."""
    if not isinstance(task, Task):
        raise TypeError(f"{name}: expected a circuits.tasks.Task, got {type(task).__name__}")
    d_vocab, _ = _vocab_and_context(model)
    if task.clean.shape != task.corrupted.shape:
        raise ValueError(f"{name}: clean {tuple(task.clean.shape)} and corrupted {tuple(task.corrupted.shape)} must "
                         "have the same shape")
    expected = (task.clean.shape[0], len(task.positions))
    for field in ("answers", "wrong_answers"):
        ids = getattr(task, field)
        if ids is not None and tuple(ids.shape) != expected:
            raise ValueError(f"{name}.{field}: expected shape {expected} (batch, metric positions), got "
                             f"{tuple(ids.shape)}")
    check_tokens(model, task.clean, f"{name}.clean")
    check_tokens(model, task.corrupted, f"{name}.corrupted")
    if len(task.positions) == 0:
        raise ValueError(f"{name}.positions: expected at least one metric position, got none")
    check_ids(task.answers, d_vocab, f"{name}.answers")
    if task.wrong_answers is not None:
        check_ids(task.wrong_answers, d_vocab, f"{name}.wrong_answers")


def check_count(value: object, name: str, *, minimum: int = 0) -> int:
    """`value` as an int ≥ minimum (bools and floats refused). Returns it."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def check_number(value: object, name: str, *, minimum: float | int | None = None, positive: bool = False) -> float:
    """`value` as a finite float (≥ minimum, or > 0 when `positive`). Returns it."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum}, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{name}: expected a number > 0, got {x}")
    return x


def check_scores(scores: Tensor, valid: Tensor | None, name: str = "scores") -> None:
    """No NaN or inf among the scores of real edges (`valid`); a ranking of NaN would be arbitrary."""
    s = scores if valid is None else scores[valid.to(scores.device)]
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        raise ValueError(f"{name}: {int(bad.sum())} of {s.numel()} scores are NaN or infinite; expected finite "
                         "scores to rank (a NaN usually means the metric failed where the scores were computed)")


def check_finite(values: Tensor | float, name: str, what: str) -> None:
    """Raise when a metric value is NaN or infinite: nothing computed from it would mean anything."""
    t = torch.as_tensor(values)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        shown = t.flatten()[:8].tolist()
        raise ValueError(f"{name}: the metric returned NaN or inf for {int(bad.sum())} of {t.numel()} {what} "
                         f"(values {shown}); check the metric and the model's logits")


GAP_RTOL = 64 * torch.finfo(torch.float32).eps


def gap_is_zero(clean: float, corrupted: float) -> bool:
    """True when clean − corrupted is zero to the rounding of a float32 forward: within 64 float32 epsilons of the
    larger magnitude (at least 1). Two runs of identical inputs through different code paths (the full circuit
    and the fully resample-ablated one when clean = corrupted) differ by about that much, and a normalised score
    dividing by such a gap would be rounding noise."""
    return abs(clean - corrupted) <= GAP_RTOL * max(1.0, abs(clean), abs(corrupted))


def check_gap(clean: float, corrupted: float, *, name: str, raise_on_zero: bool) -> bool:
    """The clean and corrupted (or full and ablated) metrics that a normalised score divides by: both finite, and
    different. A zero gap raises when `raise_on_zero`, else warns once with the numbers and returns False (the
    caller leaves its normalised scores NaN). Returns True when the gap is usable."""
    check_finite(torch.tensor([clean, corrupted], dtype=torch.float64), name, "baseline runs")
    if not gap_is_zero(clean, corrupted):
        return True
    message = (f"{name}: the two baselines score the same (metric {clean!r} vs {corrupted!r}), so a normalised "
               "score would be 0/0; use a task whose clean and corrupted inputs differ in the metric")
    if raise_on_zero:
        raise ValueError(message)
    warnings.warn(message + "; normalised values are left NaN, the raw metric is kept", DegenerateTaskWarning,
                  stacklevel=3)
    return False

"""Induction tasks: a prefix followed by its repeat; the metric reads the repeated half."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from circuits.tasks.task import Metric, Task


def repeated_random_tokens(
    batch: int, half_len: int, d_vocab: int, *, bos: int = 0, generator: torch.Generator | None = None
) -> Int[Tensor, "batch pos"]:
    """[BOS, x_1..x_T, x_1..x_T] with x distinct tokens drawn from 1..d_vocab-1 (T = `half_len`).

    Example: `repeated_random_tokens(8, 10, 50)` has shape [8, 21].
    """
    if half_len > d_vocab - 1:
        raise ValueError(f"half_len must be at most d_vocab - 1 = {d_vocab - 1} (distinct tokens); got {half_len}")
    choices = [v for v in range(d_vocab) if v != bos]
    pool = torch.tensor(choices)
    rows = [pool[torch.randperm(len(pool), generator=generator)[:half_len]] for _ in range(batch)]
    prefix = torch.stack(rows)
    bos_col = torch.full((batch, 1), bos, dtype=torch.long)
    return torch.cat([bos_col, prefix, prefix], dim=1)


def second_half_positions(half_len: int) -> Int[Tensor, " n"]:
    """Positions whose next token induction predicts: T+1 .. 2T-1 in [BOS, x, x] (each reads x_{k+1})."""
    return torch.arange(half_len + 1, 2 * half_len)


def induction_task(
    batch: int,
    half_len: int,
    d_vocab: int,
    *,
    seed: int = 0,
    bos: int = 0,
    metric: Metric | str = Metric.LOGIT_DIFF,
) -> Task:
    """Induction on random repeated sequences.

    clean = [BOS, x, x]; corrupted = [BOS, y, x] with y an independent random prefix, so the repeat
    is no longer a repeat. The metric reads positions T+1..2T-1, where the answer is the next token of the
    clean sequence; the wrong answer is a random other token (for the logit difference).
    Example: `task = induction_task(32, 17, 50)`
    """
    gen = torch.Generator().manual_seed(seed)
    clean = repeated_random_tokens(batch, half_len, d_vocab, bos=bos, generator=gen)
    other = repeated_random_tokens(batch, half_len, d_vocab, bos=bos, generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1 : half_len + 1] = other[:, 1 : half_len + 1]
    positions = second_half_positions(half_len)
    answers = clean[:, positions + 1]
    wrong = _random_other_tokens(answers, d_vocab, bos, gen)
    return Task("induction-random", clean, corrupted, answers, positions, wrong, Metric(metric))


def _random_other_tokens(answers: Tensor, d_vocab: int, bos: int, gen: torch.Generator) -> Tensor:
    """A uniformly random token for each answer that is neither the answer nor BOS."""
    wrong = torch.randint(0, d_vocab, answers.shape, generator=gen)
    bad = (wrong == answers) | (wrong == bos)
    while bad.any():
        wrong[bad] = torch.randint(0, d_vocab, (int(bad.sum()),), generator=gen)
        bad = (wrong == answers) | (wrong == bos)
    return wrong

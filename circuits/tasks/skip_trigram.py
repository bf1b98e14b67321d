"""Planted skip-trigrams (A … B → C): a known table, sequences that contain one, and the task it defines."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from circuits.tasks.task import Metric, Task


@dataclass(frozen=True)
class SkipTrigramTable:
    """The planted skip-trigrams: an A token anywhere earlier and a B token now predict C = table[A, B].

    Token layout: 0 = BOS; A tokens; B tokens; one C token per (A, B) pair; the rest are filler.
    `triples` lists every (A, B, C). Example: `table = skip_trigram_table(); table.completion(1, 4)`
    """

    d_vocab: int
    a_tokens: tuple[int, ...]
    b_tokens: tuple[int, ...]
    c_table: tuple[tuple[int, ...], ...]  # c_table[i][j] = C for (a_tokens[i], b_tokens[j])
    bos: int = 0

    @property
    def triples(self) -> list[tuple[int, int, int]]:
        """Every planted (A, B, C)."""
        return [(a, b, self.c_table[i][j]) for i, a in enumerate(self.a_tokens) for j, b in enumerate(self.b_tokens)]

    @property
    def c_tokens(self) -> tuple[int, ...]:
        return tuple(c for row in self.c_table for c in row)

    @property
    def filler_tokens(self) -> Int[Tensor, " n"]:
        special = {self.bos, *self.a_tokens, *self.b_tokens, *self.c_tokens}
        return torch.tensor([t for t in range(self.d_vocab) if t not in special])

    def completion(self, a: int, b: int) -> int:
        """C for the pair (A, B)."""
        return self.c_table[self.a_tokens.index(a)][self.b_tokens.index(b)]

    def sample(
        self, batch: int, length: int, *, generator: torch.Generator | None = None, b_at_end: bool = False
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
        """Rows [BOS, filler…, A, filler…, B, C, filler…] with one planted triple each, and B's position per row.

        A and B are drawn uniformly from the table; A's position is uniform in 1..length−3 and B's uniform
        after it (B at length−2 and C at length−1 when `b_at_end`). Example: `tokens, b_pos = table.sample(8, 24)`
        """
        if length < 4:
            raise ValueError(f"length must be ≥ 4 (BOS, A, B, C); got {length}")
        filler = self.filler_tokens
        tokens = filler[torch.randint(0, len(filler), (batch, length), generator=generator)]
        tokens[:, 0] = self.bos
        ia = torch.randint(0, len(self.a_tokens), (batch,), generator=generator)
        ib = torch.randint(0, len(self.b_tokens), (batch,), generator=generator)
        a_pos = torch.randint(1, length - 2, (batch,), generator=generator)  # 1 .. length-3
        if b_at_end:
            b_pos = torch.full((batch,), length - 2)
        else:  # uniform in a_pos+1 .. length-2
            b_pos = a_pos + 1 + (torch.rand(batch, generator=generator) * (length - 2 - a_pos)).long()
        rows = torch.arange(batch)
        c = torch.tensor(self.c_table)[ia, ib]
        tokens[rows, a_pos] = torch.tensor(self.a_tokens)[ia]
        tokens[rows, b_pos] = torch.tensor(self.b_tokens)[ib]
        tokens[rows, b_pos + 1] = c
        return tokens, b_pos


def skip_trigram_table(n_a: int = 3, n_b: int = 3, d_vocab: int = 64) -> SkipTrigramTable:
    """The planted table: A = 1..n_a, B = the next n_b tokens, C = the next n_a·n_b tokens (one per pair).

    Every C is distinct, so C depends on both A and B. Example: `skip_trigram_table().triples[0] == (1, 4, 7)`
    """
    first_filler = 1 + n_a + n_b + n_a * n_b
    if n_a < 1 or n_b < 1 or d_vocab < first_filler + 2:
        raise ValueError(f"need n_a, n_b ≥ 1 and d_vocab ≥ {first_filler + 2}; got {n_a}, {n_b}, {d_vocab}")
    a_tokens = tuple(range(1, 1 + n_a))
    b_tokens = tuple(range(1 + n_a, 1 + n_a + n_b))
    c0 = 1 + n_a + n_b
    c_table = tuple(tuple(c0 + i * n_b + j for j in range(n_b)) for i in range(n_a))
    return SkipTrigramTable(d_vocab, a_tokens, b_tokens, c_table)


def skip_trigram_task(
    table: SkipTrigramTable, batch: int = 32, seq_len: int = 16, *, seed: int = 0,
    metric: Metric | str = Metric.LOGIT_DIFF,
) -> Task:
    """Predict C at the B position (seq_len − 2); corrupted = the same row with its A swapped for another A.

    answers = C(A, B), wrong_answers = C(A', B) for the corrupting A'. Needs len(table.a_tokens) ≥ 2.
    Example: `task = skip_trigram_task(skip_trigram_table(), 32, 16)`
    """
    if len(table.a_tokens) < 2:
        raise ValueError("table: the corrupted run needs at least two A tokens")
    gen = torch.Generator().manual_seed(seed)
    clean, b_pos = table.sample(batch, seq_len, generator=gen, b_at_end=True)
    rows = torch.arange(batch)
    a_tokens = torch.tensor(table.a_tokens)
    is_a = (clean[..., None] == a_tokens).any(-1)
    a_pos = is_a.long().argmax(-1)
    ia = (clean[rows, a_pos][:, None] == a_tokens).long().argmax(-1)
    shift = torch.randint(1, len(a_tokens), (batch,), generator=gen)
    ia_other = (ia + shift) % len(a_tokens)
    corrupted = clean.clone()
    corrupted[rows, a_pos] = a_tokens[ia_other]
    ib = (clean[rows, b_pos][:, None] == torch.tensor(table.b_tokens)).long().argmax(-1)
    c_table = torch.tensor(table.c_table)
    positions = torch.tensor([seq_len - 2])
    return Task("skip-trigram", clean, corrupted, c_table[ia, ib][:, None], positions,
                c_table[ia_other, ib][:, None], Metric(metric))

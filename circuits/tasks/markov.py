"""A Markov chain with a known transition matrix, its sequences, and the bigram task it defines."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.tasks.task import Metric, Task


@dataclass(frozen=True)
class MarkovChain:
    """A first-order Markov chain over tokens 0..n_states-1 (no BOS token).

    `transition[i, j]` = P(next = j | current = i); every row sums to 1. `stationary` is its stationary
    distribution, from which sequences start. Example: `chain = markov_chain(); chain.sample(8, 32)`
    """

    transition: Float[Tensor, "state next"]
    stationary: Float[Tensor, " state"]
    seed: int
    support: int
    floor: float

    @property
    def n_states(self) -> int:
        return self.transition.shape[0]

    def log_transition(self) -> Float[Tensor, "state next"]:
        """log P(next | current): the ground truth a bigram model's logits should match up to a row constant."""
        return self.transition.log()

    def likeliest_next(self) -> Int[Tensor, " state"]:
        """The most probable successor of every state."""
        return self.transition.argmax(-1)

    def sample(self, batch: int, length: int, *, generator: torch.Generator | None = None) -> Int[Tensor, "batch pos"]:
        """`batch` sequences of `length` states: the first from the stationary distribution, then the chain.

        Example: `chain.sample(4, 16, generator=torch.Generator().manual_seed(0)).shape == (4, 16)`
        """
        if batch < 1 or length < 1:
            raise ValueError(f"batch and length must be ≥ 1; got batch={batch}, length={length}")
        tokens = torch.empty(batch, length, dtype=torch.long)
        tokens[:, 0] = torch.multinomial(self.stationary, batch, replacement=True, generator=generator)
        for pos in range(1, length):
            tokens[:, pos] = torch.multinomial(self.transition[tokens[:, pos - 1]], 1, generator=generator)[:, 0]
        return tokens


def markov_chain(n_states: int = 64, *, support: int = 6, floor: float = 0.05, seed: int = 0) -> MarkovChain:
    """A seeded random chain with sparse-ish rows: each state has `support` likely successors.

    Row i puts mass 1 − `floor` on `support` successors chosen at random (weights ~ Dirichlet(1)) and spreads
    `floor` uniformly over all states, so every transition has probability ≥ floor / n_states (its log is
    finite). The same arguments always give the same chain. Example: `markov_chain(16, support=3, seed=1)`
    """
    if n_states < 2 or not 1 <= support <= n_states:
        raise ValueError(f"need n_states ≥ 2 and 1 ≤ support ≤ n_states; got n_states={n_states}, support={support}")
    if not 0.0 < floor < 1.0:
        raise ValueError(f"floor must lie in (0, 1); got {floor}")
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.zeros(n_states, n_states, dtype=torch.float64)
    for state in range(n_states):
        successors = torch.randperm(n_states, generator=gen)[:support]
        weights = -torch.rand(support, generator=gen, dtype=torch.float64).log()  # Exponential(1) → Dirichlet(1)
        sparse[state, successors] = weights / weights.sum()
    transition = (1 - floor) * sparse + floor / n_states
    transition = transition / transition.sum(-1, keepdim=True)
    return MarkovChain(transition.float(), _stationary(transition).float(), seed, support, floor)


def _stationary(transition: Float[Tensor, "state next"]) -> Float[Tensor, " state"]:
    """The stationary distribution π = π P, by power iteration (the chain is irreducible and aperiodic)."""
    pi = torch.full((transition.shape[0],), 1.0 / transition.shape[0], dtype=transition.dtype)
    for _ in range(1000):
        nxt = pi @ transition
        if (nxt - pi).abs().max() < 1e-12:
            break
        pi = nxt
    return pi / pi.sum()


def bigram_task(
    chain: MarkovChain, batch: int = 32, seq_len: int = 16, *, seed: int = 0, metric: Metric | str = Metric.LOGIT_DIFF
) -> Task:
    """The bigram task of a Markov chain: at the last position, predict the likeliest successor.

    clean = a chain sample; corrupted = the same with the last token replaced by another state whose
    likeliest successor differs. answers = the likeliest successor of the clean last token, wrong_answers =
    that of the corrupted last token. A 0-layer model's direct path W_E W_U solves it.
    Example: `task = bigram_task(markov_chain(), 32, 16)`
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2; got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    clean = chain.sample(batch, seq_len, generator=gen)
    best = chain.likeliest_next()
    last = clean[:, -1]
    replacement = torch.randint(0, chain.n_states, (batch,), generator=gen)
    bad = best[replacement] == best[last]
    while bad.any():
        replacement[bad] = torch.randint(0, chain.n_states, (int(bad.sum()),), generator=gen)
        bad = best[replacement] == best[last]
    corrupted = clean.clone()
    corrupted[:, -1] = replacement
    positions = torch.tensor([seq_len - 1])
    return Task("bigram", clean, corrupted, best[last][:, None], positions, best[replacement][:, None], Metric(metric))

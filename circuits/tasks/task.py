"""A Task: clean and corrupted tokens, the answers, the positions the metric reads, and the metric."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

import torch
from jaxtyping import Float, Int
from torch import Tensor


class Metric(str, Enum):
    """How a run's logits become one number. Every metric is a mean over batch and metric positions."""

    LOGIT_DIFF = "logit_diff"
    """logit[answer] − logit[wrong answer] (higher is better); linear in the logits."""
    LOGPROB = "logprob"
    """log-probability of the answer (higher is better)."""
    KL = "kl"
    """KL(clean ‖ run) of the next-token distributions (lower is better; 0 on the clean run)."""


@dataclass(frozen=True)
class Task:
    """A behaviour to explain: paired clean/corrupted inputs and a scalar metric on the logits.

    Shapes: `clean`, `corrupted` [batch, pos]; `positions` [n] (the positions the metric reads, the same
    for every row); `answers`, `wrong_answers` [batch, n]. Example:
    `task.score(model(task.clean))` gives the clean metric.
    """

    name: str
    # shapes are validated in __post_init__ (with errors that name both shapes), so the annotations
    # use jaxtyping's unchecked `_name` dims
    clean: Int[Tensor, "_batch _pos"]
    corrupted: Int[Tensor, "_batch _pos"]
    answers: Int[Tensor, "_batch _n"]
    positions: Int[Tensor, "..."]
    wrong_answers: Int[Tensor, "_batch _n"] | None = None
    metric: Metric | str = Metric.LOGIT_DIFF  # stored as a Metric

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", Metric(self.metric))
        if self.clean.shape != self.corrupted.shape:
            raise ValueError(
                f"clean and corrupted must have the same shape; got clean {tuple(self.clean.shape)} "
                f"and corrupted {tuple(self.corrupted.shape)}"
            )
        if self.clean.ndim != 2:
            raise ValueError(f"clean: expected [batch, pos] tokens, got shape {tuple(self.clean.shape)}")
        batch, n_pos = self.clean.shape
        if self.positions.ndim != 1:
            raise ValueError(f"positions: expected a 1-d tensor, got shape {tuple(self.positions.shape)}")
        if len(self.positions) and (self.positions.min() < 0 or self.positions.max() >= n_pos):
            raise ValueError(f"positions must lie in [0, {n_pos}); got {self.positions.tolist()}")
        expected = (batch, len(self.positions))
        if tuple(self.answers.shape) != expected:
            raise ValueError(f"answers: expected shape {expected}, got {tuple(self.answers.shape)}")
        if self.wrong_answers is not None and tuple(self.wrong_answers.shape) != expected:
            raise ValueError(f"wrong_answers: expected shape {expected}, got {tuple(self.wrong_answers.shape)}")
        if self.metric is Metric.LOGIT_DIFF and self.wrong_answers is None:
            raise ValueError("metric 'logit_diff' needs wrong_answers")

    @property
    def batch(self) -> int:
        return self.clean.shape[0]

    @property
    def seq_len(self) -> int:
        return self.clean.shape[1]

    def with_metric(self, metric: Metric | str) -> Task:
        """The same data scored by another metric."""
        return replace(self, metric=Metric(metric))

    def subset(self, rows: slice | Tensor) -> Task:
        """The task restricted to some rows of the batch."""
        wrong = None if self.wrong_answers is None else self.wrong_answers[rows]
        return replace(self, clean=self.clean[rows], corrupted=self.corrupted[rows],
                       answers=self.answers[rows], wrong_answers=wrong)

    def read_logits(self, logits: Float[Tensor, "*lead batch pos vocab"]) -> Float[Tensor, "*lead batch n vocab"]:
        """The logits at the metric positions."""
        return logits[..., self.positions, :]

    def score(
        self,
        logits: Float[Tensor, "*lead batch pos vocab"],
        clean_logits: Float[Tensor, "batch pos vocab"] | None = None,
    ) -> Float[Tensor, "*lead"]:
        """The metric of a run: mean over batch and metric positions, keeping any leading dims.

        `clean_logits` is needed for KL only. Example: `task.score(model(task.clean))`
        """
        return self.score_positions(self.read_logits(logits), clean_logits)

    def score_positions(
        self,
        logits_at: Float[Tensor, "*lead batch n vocab"],
        clean_logits: Float[Tensor, "batch pos vocab"] | None = None,
    ) -> Float[Tensor, "*lead"]:
        """`score` for logits already restricted to the metric positions (see `read_logits`)."""
        return self.position_terms(logits_at, clean_logits).mean(dim=(-1, -2))

    def position_terms(
        self,
        logits_at: Float[Tensor, "*lead batch n vocab"],
        clean_logits: Float[Tensor, "batch pos vocab"] | None = None,
    ) -> Float[Tensor, "*lead batch n"]:
        """The metric's term at each row and metric position (the metric is their mean)."""
        if logits_at.shape[-3:-1] != self.answers.shape:
            raise ValueError(
                f"logits: expected [..., {self.batch}, {len(self.positions)}, vocab] at the metric positions, "
                f"got {tuple(logits_at.shape)}"
            )
        clean_at = None if clean_logits is None else self.read_logits(clean_logits)
        return metric_terms(self.metric, logits_at, self.answers, self.wrong_answers, clean_at)


def metric_terms(
    metric: Metric,
    logits_at: Float[Tensor, "*lead batch n vocab"],
    answers: Int[Tensor, "..."],
    wrong_answers: Int[Tensor, "..."] | None,
    clean_at: Float[Tensor, "..."] | None,
) -> Float[Tensor, "*lead batch n"]:
    """Each position's metric term from logits at the metric positions (answers and the clean run's logits
    there broadcast against them). Example: `metric_terms(Metric.LOGPROB, logits_at, answers, None, None)`"""
    if metric is Metric.LOGIT_DIFF:
        return _gather(logits_at, answers) - _gather(logits_at, wrong_answers)
    if metric is Metric.LOGPROB:
        return _gather(logits_at.log_softmax(-1), answers)
    if clean_at is None:
        raise ValueError("clean_logits: the KL metric needs the clean run's logits")
    return kl_terms(logits_at, clean_at)


def kl_terms(logits_at: Float[Tensor, "*lead vocab"], clean_at: Float[Tensor, "..."],
             clean_logprobs: Float[Tensor, "..."] | None = None) -> Float[Tensor, "*lead"]:
    """KL(clean ‖ patched) over the last axis, exact to float rounding for any finite logits.

    With p = softmax(clean) and d = patched − clean shifted so that Σ_v p_v d_v = 0 (logits are shift-invariant),
    KL = log Σ_v p_v e^{d_v} = log1p(r + S) − r, where r = Σ_v p_v d_v (≈ 0: rounding left by the shift) and
    S = Σ_v p_v (e^{d_v} − 1 − d_v), a sum of non-negative terms: no cancellation however small the KL (a
    difference of float32 log-softmaxes has an error of ~eps·|log p|: every digit of a KL of 1e-9 is rounding).
    Each term is computed without overflow or underflow, as exp(log p_v + d_v) − p_v (1 + d_v) where |d_v| ≥ 1/2
    (a token whose clean probability underflows still counts) and by the series of e^d − 1 − d below. Where some
    p_v e^{d_v} exceeds e^60 the KL is at least 60 and is read as logsumexp(log p + d) − r.
    `clean_logprobs` = log_softmax(clean_at), for a caller that scores many runs against one clean run.
    Without a gradient to record (many runs scored at a large vocabulary, as ACDC does), the same terms are
    computed a block of rows at a time in reused buffers (`_kl_terms_blocked`).
    Example: `kl_terms(logits_at, clean_at)` ([batch, n] for [batch, n, vocab] inputs)"""
    log_p = clean_at.log_softmax(-1) if clean_logprobs is None else clean_logprobs
    recording = torch.is_grad_enabled() and (logits_at.requires_grad or clean_at.requires_grad)
    lead = logits_at.shape[: logits_at.dim() - clean_at.dim()]
    if (not recording and logits_at.shape[len(lead):] == clean_at.shape == log_p.shape
            and logits_at.dtype == clean_at.dtype == log_p.dtype):
        return _kl_terms_blocked(logits_at, clean_at, log_p)
    p = log_p.exp()
    d = logits_at - clean_at
    # shift exactly by the change at the clean run's mode first, so a constant shift gives d = 0 bit for bit
    mode = log_p.argmax(-1, keepdim=True).expand(*d.shape[:-1], 1)
    d = d - d.gather(-1, mode)
    d = d - (p * d).sum(-1, keepdim=True)
    r = (p * d).sum(-1)
    x = log_p + d  # log(p e^d)
    small = d.abs() < _SERIES
    s = torch.where(small, p * _exp_excess(d.clamp(-_SERIES, _SERIES)), x.clamp(max=_LOG_LARGE).exp() - p * (1 + d))
    kl = (r + s.sum(-1)).log1p() - r
    large = x.amax(-1) > _LOG_LARGE
    if bool(large.any()):
        kl = torch.where(large, x.logsumexp(-1) - r, kl)
    return kl.clamp_min(0)


_BLOCK_FLOATS = 2**19  # the terms of one block: its buffers stay in cache


def _kl_terms_blocked(logits_at: Float[Tensor, "..."], clean_at: Float[Tensor, "*rows vocab"],
                      log_p: Float[Tensor, "*rows vocab"]) -> Float[Tensor, "..."]:
    """`kl_terms` without autograd, for logits whose trailing axes are the clean logits' own: the same formula a
    block at a time (several runs' rows at a small vocabulary, part of one run's at a large one), in place in
    buffers that stay in cache. The series runs on every term; the exact branch (|d| ≥ 1/2) and the overflow
    branch only on the terms and rows that need them."""
    vocab = clean_at.shape[-1]
    rows = clean_at.numel() // vocab
    flat = logits_at.reshape(-1, rows, vocab)
    clean, lp = clean_at.reshape(rows, vocab), log_p.reshape(rows, vocab)
    p = lp.exp()
    mode = lp.argmax(-1, keepdim=True)
    out = torch.empty(flat.shape[:2], dtype=flat.dtype, device=flat.device)
    row_block = max(1, min(rows, _BLOCK_FLOATS // vocab))
    run_block = max(1, _BLOCK_FLOATS // (rows * vocab)) if row_block == rows else 1
    d = torch.empty(run_block, row_block, vocab, dtype=flat.dtype, device=flat.device)
    t, s = torch.empty_like(d), torch.empty_like(d)
    for k0 in range(0, flat.shape[0], run_block):
        k1 = min(flat.shape[0], k0 + run_block)
        for r0 in range(0, rows, row_block):
            r1 = min(rows, r0 + row_block)
            dk, tk, sk = d[: k1 - k0, : r1 - r0], t[: k1 - k0, : r1 - r0], s[: k1 - k0, : r1 - r0]
            pk, lpk = p[r0:r1], lp[r0:r1]
            torch.sub(flat[k0:k1, r0:r1], clean[r0:r1], out=dk)
            dk.sub_(dk.gather(-1, mode[r0:r1].expand(k1 - k0, -1, -1)))
            dk.sub_(torch.mul(pk, dk, out=tk).sum(-1, keepdim=True))
            r = torch.mul(pk, dk, out=tk).sum(-1)
            _exp_excess(torch.clamp(dk, -_SERIES, _SERIES, out=tk), out=sk).mul_(pk)
            far = (dk.abs() >= _SERIES).nonzero(as_tuple=True)
            large = torch.zeros(dk.shape[:2], dtype=torch.bool, device=flat.device)
            if far[0].numel():
                x = lpk[far[1:]] + dk[far]  # log(p e^d)
                sk[far] = x.clamp(max=_LOG_LARGE).exp() - pk[far[1:]] * (1 + dk[far])
                beyond = x > _LOG_LARGE
                large[far[0][beyond], far[1][beyond]] = True
            kl = (r + sk.sum(-1)).log1p() - r
            if bool(large.any()):
                kl = torch.where(large, (lpk + dk).logsumexp(-1) - r, kl)
            out[k0:k1, r0:r1] = kl.clamp_min(0)
    return out.reshape(logits_at.shape[:-1])


_SERIES = 0.5  # |d| below which e^d − 1 − d is summed as its series (no cancellation)
_LOG_LARGE = 60.0  # past log(p e^d) = 60 the KL exceeds 60 and logsumexp is exact to relative rounding


def _exp_excess(d: Float[Tensor, "..."], out: Float[Tensor, "..."] | None = None) -> Float[Tensor, "..."]:
    """e^d − 1 − d for |d| ≤ 1/2 by its Taylor series to d^8 (remainder below 6e-8 of the value); with `out`,
    written into it by the same operations in place (no allocation, no autograd record)."""
    mul, add = (torch.mul, torch.add) if out is None else (Tensor.mul_, Tensor.add_)
    acc = torch.full_like(d, 1 / math.factorial(8)) if out is None else out.fill_(1 / math.factorial(8))
    for k in range(7, 1, -1):
        acc = add(mul(acc, d), 1 / math.factorial(k))
    return mul(mul(acc, d), d)


def _gather(x: Float[Tensor, "*lead batch n vocab"], idx: Int[Tensor, "..."]) -> Float[Tensor, "*lead batch n"]:
    idx = idx.to(x.device).expand(*x.shape[:-1]).unsqueeze(-1)
    return torch.gather(x, -1, idx).squeeze(-1)


def normalise(value: Tensor | float, corrupted: Tensor | float, clean: Tensor | float) -> Tensor | float:
    """(value − corrupted) / (clean − corrupted): 0 at the corrupted baseline, 1 at the clean one."""
    return (value - corrupted) / (clean - corrupted)

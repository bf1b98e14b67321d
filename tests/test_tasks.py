"""Task: shapes, metrics, errors; the random induction task."""

from __future__ import annotations

import pytest
import torch

from circuits.tasks import Metric, Task, induction_task, normalise


def _task(metric=Metric.LOGIT_DIFF) -> Task:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 10, (3, 6), generator=gen)
    return Task("t", clean, clean.flip(0), torch.tensor([[1, 2]] * 3), torch.tensor([3, 5]),
                torch.tensor([[4, 4]] * 3), metric)


def test_clean_and_corrupted_shapes_must_match():
    clean = torch.zeros(3, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"clean \(3, 6\).*corrupted \(3, 5\)"):
        Task("t", clean, clean[:, :5], torch.zeros(3, 1, dtype=torch.long), torch.tensor([2]))


def test_positions_and_answers_are_checked():
    clean = torch.zeros(3, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="positions"):
        Task("t", clean, clean, torch.zeros(3, 1, dtype=torch.long), torch.tensor([6]), metric="logprob")
    with pytest.raises(ValueError, match="answers"):
        Task("t", clean, clean, torch.zeros(2, 1, dtype=torch.long), torch.tensor([2]), metric="logprob")
    with pytest.raises(ValueError, match="wrong_answers"):
        Task("t", clean, clean, torch.zeros(3, 1, dtype=torch.long), torch.tensor([2]))


def test_metrics_against_a_hand_computation():
    task = _task()
    logits = torch.randn(3, 6, 10)
    expected = (logits[:, [3, 5], :].gather(-1, task.answers[..., None])
                - logits[:, [3, 5], :].gather(-1, task.wrong_answers[..., None])).mean()
    torch.testing.assert_close(task.score(logits), expected)
    lp = task.with_metric("logprob").score(logits)
    torch.testing.assert_close(lp, logits.log_softmax(-1)[:, [3, 5]].gather(-1, task.answers[..., None]).mean())
    kl_task = task.with_metric("kl")
    assert kl_task.score(logits, clean_logits=logits).abs() < 1e-6
    other = torch.randn(3, 6, 10)
    p, q = logits[:, [3, 5]].softmax(-1), other[:, [3, 5]].softmax(-1)
    torch.testing.assert_close(kl_task.score(other, clean_logits=logits), (p * (p.log() - q.log())).sum(-1).mean())
    with pytest.raises(ValueError, match="clean_logits"):
        kl_task.score(other)


def test_kl_keeps_relative_precision_for_small_and_large_changes():
    """kl_terms against the float64 definition Σ p (log p − log q) of the same float32 logits, from tiny logit
    changes (KL ~1e-11, where a difference of float32 log-softmaxes has relative errors of 1e4) to changes of
    ~200 (the overflow-safe branch): relative error within 1e-3 + ~80·eps32/|d|, with a gradient check."""
    from circuits.tasks.task import kl_terms

    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(4, 5, 64, generator=gen) * 4
    for scale in (1e-5, 1e-3, 0.1, 1.0, 10.0, 200.0):
        patched = clean + torch.randn(clean.shape, generator=gen) * scale
        p, q = clean.double().log_softmax(-1), patched.double().log_softmax(-1)
        expected = (p.exp() * (p - q)).sum(-1)
        got = kl_terms(patched, clean).double()
        assert ((got - expected).abs() / expected).max() < 1e-3 + 5e-6 / scale, scale
    x = (clean[:1, :1] + torch.randn(1, 1, 64, generator=gen)).double().requires_grad_()
    torch.autograd.gradcheck(lambda t: kl_terms(t, clean[:1, :1].double()), (x,))


def test_score_keeps_leading_dims():
    task = _task()
    stacked = torch.randn(4, 3, 6, 10)
    scores = task.score(stacked)
    assert scores.shape == (4,)
    torch.testing.assert_close(scores[2], task.score(stacked[2]))


def test_normalise():
    assert normalise(3.0, corrupted=1.0, clean=5.0) == 0.5


def test_induction_task_structure():
    task = induction_task(8, 10, 30, seed=3)
    assert task.clean.shape == (8, 21)
    assert torch.equal(task.clean[:, 1:11], task.clean[:, 11:])
    assert torch.equal(task.corrupted[:, 11:], task.clean[:, 11:])
    assert not torch.equal(task.corrupted[:, 1:11], task.clean[:, 1:11])
    assert (task.clean[:, 1:] != 0).all()
    for row in task.clean[:, 1:11]:
        assert len(set(row.tolist())) == 10
    assert torch.equal(task.answers, task.clean[:, task.positions + 1])
    assert (task.wrong_answers != task.answers).all()
    assert torch.equal(induction_task(8, 10, 30, seed=3).clean, task.clean)

"""The KL metric (`kl_terms`) against a 60-digit oracle (mpmath) of the same float32 logits, at logit scales 1 to
200, for distributions far apart, nearby, and shifted; with underflowing clean probabilities; and its gradient."""

from __future__ import annotations

import mpmath
import pytest
import torch

from circuits.tasks.task import kl_terms

TINY = torch.finfo(torch.float32).tiny  # a KL below this is not representable in float32 (it flushes to 0)
RTOL = 32 * torch.finfo(torch.float32).eps  # a few roundings of the result


def kl_oracle(patched: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) in 60-digit arithmetic, row by row."""
    mpmath.mp.dps = 60
    out = []
    for pr, cr in zip(patched.double().tolist(), clean.double().tolist()):
        c, p = [mpmath.mpf(x) for x in cr], [mpmath.mpf(x) for x in pr]
        lc = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in c))
        lp = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in p))
        out.append(float(mpmath.fsum(mpmath.exp(a - lc) * ((a - lc) - (b - lp)) for a, b in zip(c, p))))
    return torch.tensor(out, dtype=torch.float64)


def _terms(patched: torch.Tensor, clean: torch.Tensor, path: str) -> torch.Tensor:
    """kl_terms by one of its two computations: recording a gradient (one pass over every term) or not (blocks
    of rows in reused buffers, the exact branches only where needed)."""
    if path == "autograd":
        return kl_terms(patched.clone().requires_grad_(), clean).detach()
    with torch.no_grad():
        return kl_terms(patched, clean)


@pytest.mark.parametrize("path", ["blocked", "autograd"])
@pytest.mark.parametrize("scale", [1.0, 10.0, 40.0, 80.0, 120.0, 200.0])
@pytest.mark.parametrize("kind", ["independent", "nearby", "shifted"])
def test_kl_matches_high_precision_oracle(scale, kind, path):
    gen = torch.Generator().manual_seed(int(scale) * 7 + len(kind))
    clean = torch.randn(8, 40, generator=gen) * scale
    if kind == "independent":
        patched = torch.randn(8, 40, generator=gen) * scale
    elif kind == "nearby":  # KL down to 1e-27 and below
        patched = clean + torch.randn(8, 40, generator=gen) * 1e-3 * scale
    else:  # a shift of every logit (KL 0) plus a small change
        patched = clean + 3.0 + torch.randn(8, 40, generator=gen) * 0.1
    got = _terms(patched, clean, path).double()
    expected = kl_oracle(patched, clean)
    assert torch.isfinite(got).all()
    assert ((got - expected).abs() <= RTOL * expected.abs() + TINY).all(), (got, expected)


@pytest.mark.parametrize("path", ["blocked", "autograd"])
def test_kl_with_underflowing_clean_probability_is_exact(path):
    """p = (1, e^-200) underflows to (1, 0) in float32, q = (½, ½): KL = log 2, not -inf."""
    got = _terms(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -200.0]]), path)
    torch.testing.assert_close(got, torch.tensor([2.0]).log())
    # the reverse direction: p = (½, ½), q = (1, e^-200): KL = 100 − log 2 (up to e^-200)
    got = _terms(torch.tensor([[0.0, -200.0]]), torch.tensor([[0.0, 0.0]]), path)
    torch.testing.assert_close(got.double(), torch.tensor([100.0 - torch.tensor(2.0).log().item()],
                                                          dtype=torch.float64), rtol=RTOL, atol=0)
    # a token whose clean probability is e^-1000 and whose patched logit rises to take most of the mass
    clean = torch.tensor([[0.0, -1000.0, -5.0]])
    patched = torch.tensor([[0.0, 10.0, -5.0]])
    torch.testing.assert_close(_terms(patched, clean, path).double(), kl_oracle(patched, clean), rtol=RTOL, atol=0)


@pytest.mark.parametrize("path", ["blocked", "autograd"])
def test_kl_is_zero_for_a_constant_shift_and_identical_logits(path):
    clean = torch.randn(5, 30) * 150
    assert (_terms(clean, clean, path) == 0).all()
    assert (_terms(clean + 7.0, clean, path) <= RTOL * 1e-6).all()


@pytest.mark.parametrize("block", [3 * 50, 2 * 7 * 50])  # 3 rows of one run (the last block partial); 2 runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_kl_equals_the_recorded_one_bit_for_bit(dtype, block, monkeypatch):
    """The two computations are the same operations on each term: equal bit for bit, over runs scored against
    one clean run (a leading axis), blocks that split the rows, terms on both sides of the series' range, and
    rows past the overflow bound (KL > 60)."""
    import circuits.tasks.task as task_module

    monkeypatch.setattr(task_module, "_BLOCK_FLOATS", block)
    gen = torch.Generator().manual_seed(5)
    clean = (torch.randn(7, 50, generator=gen) * 6).to(dtype)
    patched = clean + torch.randn(4, 7, 50, generator=gen, dtype=dtype) * torch.tensor([1e-4, 0.05, 0.7, 3.0],
                                                                                       dtype=dtype)[:, None, None]
    patched[2, 1, 3] += 150.0  # a single term past e^60: that row's KL is read by logsumexp
    blocked, recorded = _terms(patched, clean, "blocked"), _terms(patched, clean, "autograd")
    assert blocked.shape == recorded.shape == (4, 7)
    assert float(blocked[2, 1]) > 60
    assert torch.equal(blocked, recorded)


def test_kl_gradient_is_q_minus_p_and_finite_for_sharp_logits():
    gen = torch.Generator().manual_seed(3)
    clean = torch.randn(4, 30, generator=gen, dtype=torch.float64) * 100
    patched = (torch.randn(4, 30, generator=gen, dtype=torch.float64) * 100).requires_grad_()
    kl_terms(patched, clean).sum().backward()
    torch.testing.assert_close(patched.grad, patched.detach().softmax(-1) - clean.softmax(-1), rtol=1e-9, atol=1e-12)
    x = torch.tensor([[0.0, 0.0]], requires_grad=True)
    kl_terms(x, torch.tensor([[0.0, -200.0]])).sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, torch.tensor([[-0.5, 0.5]]))
    y = (clean[:1, :8] + torch.randn(1, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    torch.autograd.gradcheck(lambda t: kl_terms(t, clean[:1, :8]), (y,))


def test_a_clean_run_broadcast_against_its_log_probabilities_takes_the_recorded_path():
    """Clean logits expanded over a leading axis with log-probabilities of the unexpanded shape (as the tuned lens
    passes them) are scored like the same call recording a gradient."""
    gen = torch.Generator().manual_seed(9)
    clean = torch.randn(4, 30, generator=gen) * 5
    patched = clean + torch.randn(3, 4, 30, generator=gen)
    with torch.no_grad():
        got = kl_terms(patched, clean.expand(3, 4, 30), clean.log_softmax(-1))
    expected = kl_terms(patched.clone().requires_grad_(), clean.expand(3, 4, 30), clean.log_softmax(-1)).detach()
    assert torch.equal(got, expected)

"""Circuit discovery on the zoo model `attn2l-induction` (2 layers × 4 heads, 106 edges).

- `graph-acdc-exact`: exact-mode ACDC against the plain algorithm (one full patched forward per edge
  test: `tests.helpers.reference_acdc`, the oracle of tests/test_graph_acdc.py); both assert the same
  circuit. `extra_info` records the forwards each spent (ours: circuits evaluated and batched calls).
- `graph-eap`: EAP of every edge against its budget, three forward passes of the bridge on the same task
  (what `reference` times); `extra_info` records EAP's cost in forward-pass equivalents (best of repeats).
  There is no output to compare: the reference computes no scores.

FULL: a task of 32 rows × 41 tokens (half length 20); short mode: 8 rows × 21 tokens.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.conftest import FULL
from circuits.graph import acdc, eap
from circuits.models.zoo import available, load_pretrained
from circuits.tasks import induction_task
from tests.helpers import reference_acdc

pytestmark = pytest.mark.skipif("attn2l-induction" not in available(), reason="zoo checkpoint not built")
BATCH, HALF = (32, 20) if FULL else (8, 10)
SUFFIX = "-attn2l-full" if FULL else "-attn2l-short"
THRESHOLD = 0.01
_CACHE: dict[str, object] = {}


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored after this module: the other benchmarks use every core
    yield load_pretrained("attn2l-induction")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task():
    return induction_task(BATCH, HALF, 64, seed=0)


def _exact(model, task):
    if "exact" not in _CACHE:
        _CACHE["exact"] = acdc(model, task, threshold=THRESHOLD, metric="kl", progress=False)
    return _CACHE["exact"]


def test_acdc_exact_reference(run_bench, benchmark, model, task):
    mask, n_forwards = run_bench(lambda: reference_acdc(model, task, threshold=THRESHOLD, metric="kl"),
                                 group="graph-acdc-exact" + SUFFIX, side="reference", rounds=3 if FULL else 1)
    benchmark.extra_info.update(n_forwards=n_forwards)
    assert torch.equal(mask, _exact(model, task).circuit.members)


def test_acdc_exact_ours(run_bench, benchmark, model, task):
    r = run_bench(lambda: acdc(model, task, threshold=THRESHOLD, metric="kl", progress=False),
                  group="graph-acdc-exact" + SUFFIX, side="ours", rounds=5 if FULL else None)
    benchmark.extra_info.update(n_forwards=r.n_forwards, n_batches=r.info["n_batches"], n_edges=r.circuit.n_edges)
    mask, _ = _CACHE.setdefault("reference", reference_acdc(model, task, threshold=THRESHOLD, metric="kl"))
    assert torch.equal(r.circuit.members, mask)


def _forward(model, task):
    with torch.no_grad():
        return model(task.clean)


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_eap_budget_reference(run_bench, model, task):
    out = run_bench(lambda: [_forward(model, task) for _ in range(3)], group="graph-eap" + SUFFIX, side="reference")
    assert out[0].shape == (*task.clean.shape, 64)


def test_eap_ours(run_bench, benchmark, model, task):
    r = run_bench(lambda: eap(model, task), group="graph-eap" + SUFFIX, side="ours")
    assert torch.isfinite(r.values[r.circuit.graph.valid]).all()
    forward = _best_of(lambda: _forward(model, task), 10)
    benchmark.extra_info.update(
        forward_s=forward,
        eap_forward_equivalents=round(_best_of(lambda: eap(model, task), 5) / forward, 2),
        eap_ig8_forward_equivalents=round(_best_of(lambda: eap(model, task, ig_steps=8), 2) / forward, 2))

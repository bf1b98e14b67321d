"""Shared benchmark conventions.

Each speed claim is a pair of benchmarks in one `benchmark.group`: `..._ours` and `..._reference`, each
asserting that its output equals the other's (computed once outside the timed loop). `bench/table.py`
turns the JSON of a run into the table of ratios (reference time / our time) and peak memory.

`BENCH_FULL=1` selects the full-size problems (GPT-2-small-shaped stacks and the like); without it
(CI's short mode) the same code runs on smaller shapes so that the suite stays within minutes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

FULL = os.environ.get("BENCH_FULL") == "1"


def assert_equal_outputs(ours: torch.Tensor, reference: torch.Tensor, what: str = "") -> None:
    """The pair's outputs agree: same shape, largest difference within 1e-5 of the reference's largest |value|."""
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    err = float((ours - reference).abs().max() / reference.abs().max())
    assert err < 1e-5, f"{what}{': ' if what else ''}relative difference {err:.2e}"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mb(fn: Callable[[], Any], interval: float = 0.001) -> tuple[Any, float]:
    """Run `fn` once; return its result and the peak resident memory above the starting point, in MiB.

    Sampled from /proc/self/statm by a thread every `interval` seconds: it sees torch's CPU allocations,
    which tracemalloc does not.
    """
    start = _rss_bytes()
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return result, (peak[0] - start) / 2**20


@pytest.fixture
def run_bench(benchmark):
    """`run_bench(fn, group=..., side="ours"|"reference", rounds=...)`: time `fn`, record peak memory.

    Returns fn's result (from the memory-measuring run). In short mode pytest-benchmark's own flags keep
    rounds few; `rounds` caps them in full mode for slow references.
    """

    def _run(fn: Callable[[], Any], *, group: str, side: str, rounds: int | None = None) -> Any:
        if side not in ("ours", "reference"):
            raise ValueError(f"side must be 'ours' or 'reference', got {side!r}")
        benchmark.group = group
        if rounds == 1:  # a slow call runs once: the timed run is also the one whose memory is sampled
            measured: list[tuple[Any, float]] = []
            benchmark.pedantic(lambda: measured.append(peak_memory_mb(fn)), rounds=1, iterations=1,
                               warmup_rounds=0)
            result, peak = measured[0]
        else:
            result, peak = peak_memory_mb(fn)
            if rounds is None:
                benchmark(fn)
            else:
                benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        benchmark.extra_info.update(side=side, peak_mb=round(peak, 2), full=FULL)
        return result

    return _run

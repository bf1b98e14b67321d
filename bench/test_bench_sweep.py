"""Sweeps: Ray with 2 workers against in-process, and the sweep's own cost per run.

- `sweep-ray2-vs-inprocess-16runs`: the same 16 single-threaded runs (EAP-IG on `attn2l-induction`, one
  induction task per seed) in-process (reference) and on a local Ray with 2 CPUs (ours); the ratio is Ray's
  speed-up (at most 2, about 1.8 in practice on 2 cores). `extra_info` of ours: `overhead_ms_per_run`, the
  worker time per run not spent as in-process, (2 · T_ray − T_in) / 16.
- `sweep-overhead-inprocess-16runs`: the in-process sweep (ours: keys, digests, cache checks, checksummed
  writes, the table) against a bare loop doing the same work per run (reference: build, method, scoring);
  `extra_info` of ours: `overhead_ms_per_run` = (T_sweep − T_loop) / 16.

Each timed call writes into a fresh results folder, so nothing is reused. Ray starts once for the module
(127.0.0.1, 2 CPUs, no dashboard); its workers are warm after the memory-measuring call.
FULL: tasks of 16 rows × 21 tokens, 16 IG steps; short mode: 4 rows × 11 tokens, 2 steps.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest

from bench.conftest import FULL
from circuits.models.zoo import available
from circuits.sweep import MethodEntry, ModelEntry, Sweep, TaskEntry
from circuits.sweep.build import build_model, build_task
from circuits.sweep.methods import adapter
from circuits.sweep.runner import _torch_threads, score_output

pytest.importorskip("pandas")
pytestmark = pytest.mark.skipif("attn2l-induction" not in available(), reason="zoo checkpoint not built")
BATCH, HALF, STEPS = (16, 10, 16) if FULL else (4, 5, 2)
N_RUNS = 16
SUFFIX = "-full" if FULL else "-short"
SWEEP = Sweep([ModelEntry("attn2l-induction")], [TaskEntry("induction", "induction_task", dict(batch=BATCH,
                                                                                              half_len=HALF))],
              [MethodEntry("eap-ig", params={"top_n": 16, "ig_steps": STEPS})], seeds=list(range(N_RUNS)))
_MEDIANS: dict[str, float] = {}
_COUNTER = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-bench")
    return lambda: Path(tempfile.mkdtemp(dir=root, prefix=f"{next(_COUNTER)}-"))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    from circuits.sweep.runner import start_local_ray

    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _sweep(folder, **options):
    result = SWEEP.run(folder(), progress=False, threads_per_run=1, **options)
    assert result.n_computed == N_RUNS and result.n_failed == 0
    return result.table


def _bare_loop():
    """The same runs without the sweep: build (cached), the method, the scoring; nothing keyed or written."""
    out = []
    with _torch_threads(1):
        for run in SWEEP.runs():
            model, _ = build_model(run.model)
            task = build_task(run.task, model, run.seed)
            out.append(score_output(model, task, adapter(run.method)(model, task, run.params))["metrics"])
    return out


def _results(table):
    return table[["key", "n_edges", "faithfulness"]].sort_values("key").reset_index(drop=True)


def test_sweep_inprocess_reference(run_bench, benchmark, folder):
    table = run_bench(lambda: _sweep(folder), group="sweep-ray2-vs-inprocess-16runs" + SUFFIX, side="reference")
    _MEDIANS["inprocess"] = benchmark.stats.stats.median
    _MEDIANS["table"] = table


def test_sweep_ray_ours(run_bench, benchmark, folder, local_ray):
    table = run_bench(lambda: _sweep(folder, backend="ray"), group="sweep-ray2-vs-inprocess-16runs" + SUFFIX,
                      side="ours")
    if "table" in _MEDIANS:
        import pandas as pd

        pd.testing.assert_frame_equal(_results(table), _results(_MEDIANS["table"]))
        t_ray, t_in = benchmark.stats.stats.median, _MEDIANS["inprocess"]
        benchmark.extra_info.update(overhead_ms_per_run=round((2 * t_ray - t_in) / N_RUNS * 1e3, 2),
                                    speedup=round(t_in / t_ray, 3), workers=2)


def test_sweep_overhead_reference(run_bench, benchmark):
    run_bench(_bare_loop, group="sweep-overhead-inprocess-16runs" + SUFFIX, side="reference")
    _MEDIANS["loop"] = benchmark.stats.stats.median


def test_sweep_overhead_ours(run_bench, benchmark, folder):
    table = run_bench(lambda: _sweep(folder), group="sweep-overhead-inprocess-16runs" + SUFFIX, side="ours")
    loop = _bare_loop()
    assert sorted(m["faithfulness"] for m in loop) == sorted(table["faithfulness"])
    if "loop" in _MEDIANS:
        overhead = (benchmark.stats.stats.median - _MEDIANS["loop"]) / N_RUNS
        benchmark.extra_info.update(overhead_ms_per_run=round(overhead * 1e3, 2))

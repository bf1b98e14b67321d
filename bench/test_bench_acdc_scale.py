"""Exact ACDC at GPT-2-small scale (FULL only, one round each): 12 layers × 12 heads, d_model 768, MLPs,
vocabulary 1,000, random weights; an induction task of 8 rows × 25 tokens; KL metric; resample ablation.

The plain algorithm (one patched forward per edge test, `tests.helpers.reference_acdc`) takes hours on the
whole walk, so each reference is the plain algorithm on a SAMPLE of the walk's destinations, started from the
circuit our walk had before each of them, and ours is timed on the same sample from the same circuits (both
assert the same decisions):
- `graph-acdc-sparse-sample-gpt2small`: threshold 1e-3 (a sparse circuit); the sample is every destination of
  layer 1 that the walk evaluates (each reads ~15 sources; what its candidates reach above is the sparse circuit
  the walk has left there). `extra_info` of ours records the WHOLE walk: its time, peak memory, edges kept,
  circuits evaluated and batched calls, and the plain algorithm's forward count for it.
- `graph-acdc-walk-1e-4-sample-gpt2small`: threshold 1e-4, a denser circuit; `extra_info` of ours records the
  WHOLE walk as above; the sample is the first two layer-1 destinations that walk evaluates.
- `graph-acdc-sparse-sample-llama-gpt2small`: the same on a LLaMA-shaped model of the same size class (12 layers ×
  12 heads with 4 key/value heads, d_model 768, SwiGLU d_mlp 2,048, RMSNorm, rotary; its matrices 4× their initial
  scale, as in `bench/test_bench_architectures.py`, since at 0.02 a random model's output barely depends on its
  input), threshold 0.09 (1/50 of the fully ablated model's KL, 4.58): a sparse circuit; the sample is every
  layer-1 destination the walk evaluates.
- `graph-acdc-dense-above-gpt2small`: the worst reach: destination L1H0.q with the full circuit above it and
  threshold 1e-9 (every edge that carries a difference stays), so each of its 15 candidates recomputes every
  layer above; the peak memory of this row is the bound of goal 1 at its largest reach.
"""

from __future__ import annotations

import importlib
import time

import pytest
import torch

from bench.conftest import FULL, peak_memory_mb
from circuits.allocator import heap_reuse
from circuits.graph import ComputeGraph, acdc
from circuits.graph.incremental import circuit_state
from circuits.graph.metric import resolve_metric
from circuits.graph.patching import EdgePatcher
from circuits.models import random_gpt2, random_llama
from circuits.tasks import induction_task
from tests.helpers import reference_acdc, scale_matrices

pytestmark = pytest.mark.skipif(not FULL, reason="full benchmark only (BENCH_FULL=1)")
acdc_module = importlib.import_module("circuits.graph.acdc")  # the package exports the function `acdc`
SPARSE = 1e-3
DENSER = 1e-4
DENSE = 1e-9  # above float rounding of a KL near 0, below any edge that carries a difference
_CACHE: dict[str, object] = {}


def _build(name: str):
    if name == "llama":
        return scale_matrices(random_llama(n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_vocab=1000, n_ctx=64,
                                           d_mlp=2048), 4)
    torch.manual_seed(0)
    return random_gpt2(n_layers=12, d_model=768, n_heads=12, d_vocab=1000, n_ctx=64)


def _model(name: str):
    if f"model-{name}" not in _CACHE:
        _CACHE[f"model-{name}"] = _build(name)
    return _CACHE[f"model-{name}"]


@pytest.fixture(scope="module")
def model():
    return _model("gpt2")


@pytest.fixture(scope="module")
def task():
    return induction_task(8, 12, 1000, seed=0)  # 25 tokens


def _whole_walk(model, task, threshold=SPARSE) -> dict:
    """Ours on the whole walk at `threshold`, once, recording the circuit before each destination it evaluates."""
    key = f"whole-{id(model)}-{threshold}"
    if key not in _CACHE:
        before: dict[int, torch.Tensor] = {}
        evaluate = acdc_module._Walk.exact_destination

        def spy(self, d):
            before[d] = self.state.mask.cpu().clone()
            return evaluate(self, d)

        acdc_module._Walk.exact_destination = spy
        try:
            start = time.perf_counter()
            r, peak = peak_memory_mb(lambda: acdc(model, task, threshold=threshold, metric="kl", progress=False))
            seconds = time.perf_counter() - start
        finally:
            acdc_module._Walk.exact_destination = evaluate
        tested = int((~r.values.isnan()).sum())
        _CACHE[key] = dict(result=r, before=before, seconds=seconds, peak=peak, tested=tested)
    return _CACHE[key]


def _sample(model, task, threshold=SPARSE, most=None) -> list[int]:
    g = ComputeGraph.of(model)
    walked = _whole_walk(model, task, threshold)["before"]
    return sorted((d for d in walked if g.destinations[d].layer == 1), reverse=True)[:most]


def _whole_walk_info(model, task, threshold, starts) -> dict:
    """What `extra_info` of ours records: the sample, and the whole walk's time, peak, circuit and cost."""
    whole = _whole_walk(model, task, threshold)
    r = whole["result"]
    return dict(sample=[r.circuit.graph.destination_names[d] for d in starts], whole_walk_s=round(whole["seconds"], 2),
                whole_walk_peak_mib=round(whole["peak"], 1), n_edges=r.circuit.n_edges, n_forwards=r.n_forwards,
                n_batches=r.info["n_batches"], plain_algorithm_forwards=whole["tested"] + 1)


def _ours_on(model, task, threshold, starts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Our walk on each destination from its starting circuit; the column it leaves there."""
    p = EdgePatcher(model, task)
    gm = resolve_metric(task, "kl", p.clean_logits_full)
    out = {}
    with torch.inference_mode(), heap_reuse():  # as `acdc` runs its walk
        for d, mask in starts.items():
            walk = acdc_module._Walk(p, gm, threshold, "latest_first", state=circuit_state(p, mask.to(p.device)))
            walk.exact_destination(d)
            out[d] = walk.state.mask[:, d].cpu()
    return out


def _reference_on(model, task, threshold, starts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    out = {}
    for d, mask in starts.items():
        final, _ = reference_acdc(model, task, threshold=threshold, metric="kl", start=mask, destinations=[d])
        out[d] = final[:, d].cpu()
    return out


# the walks whose samples are timed: model, threshold, group, and how many of the layer-1 destinations (None: all)
WALKS = {"sparse": ("gpt2", SPARSE, "graph-acdc-sparse-sample-gpt2small", None),
         "denser": ("gpt2", DENSER, "graph-acdc-walk-1e-4-sample-gpt2small", 2),
         "llama-sparse": ("llama", 0.09, "graph-acdc-sparse-sample-llama-gpt2small", None)}


def _walk_starts(model, task, walk: str) -> dict[int, torch.Tensor]:
    _, threshold, _, most = WALKS[walk]
    before = _whole_walk(model, task, threshold)["before"]
    return {d: before[d] for d in _sample(model, task, threshold, most)}


@pytest.mark.parametrize("walk", list(WALKS))
def test_acdc_walk_sample_ours(run_bench, benchmark, task, walk):
    name, threshold, group, _ = WALKS[walk]
    model = _model(name)
    starts = _walk_starts(model, task, walk)
    cols = run_bench(lambda: _ours_on(model, task, threshold, starts), group=group, side="ours", rounds=1)
    benchmark.extra_info.update(_whole_walk_info(model, task, threshold, starts))
    _CACHE[f"{walk}-ours"] = cols


@pytest.mark.parametrize("walk", list(WALKS))
def test_acdc_walk_sample_reference(run_bench, task, walk):
    name, threshold, group, _ = WALKS[walk]
    model = _model(name)
    starts = _walk_starts(model, task, walk)
    cols = run_bench(lambda: _reference_on(model, task, threshold, starts), group=group, side="reference", rounds=1)
    ours = _CACHE.get(f"{walk}-ours") or _ours_on(model, task, threshold, starts)
    assert all(torch.equal(cols[d], ours[d]) for d in starts)


def _dense_start(model) -> dict[int, torch.Tensor]:
    g = ComputeGraph.of(model)
    return {g.destination_names.index("L1H0.q"): g.valid.clone()}


def test_acdc_dense_above_ours(run_bench, model, task):
    starts = _dense_start(model)
    _CACHE["dense-ours"] = run_bench(lambda: _ours_on(model, task, DENSE, starts),
                                     group="graph-acdc-dense-above-gpt2small", side="ours", rounds=1)


def test_acdc_dense_above_reference(run_bench, model, task):
    starts = _dense_start(model)
    cols = run_bench(lambda: _reference_on(model, task, DENSE, starts), group="graph-acdc-dense-above-gpt2small",
                     side="reference", rounds=1)
    ours = _CACHE.get("dense-ours") or _ours_on(model, task, DENSE, starts)
    assert all(torch.equal(cols[d], ours[d]) for d in starts)

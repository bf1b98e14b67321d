"""EAP and EAP-IG in forward-pass equivalents: each against one plain forward of the bridge on the same task.

- `graph-eap-fwd-{model}`: `eap(model, task)` against one `model(task.clean)` (no gradient); the ratio
  (reference / ours) is 1 / (EAP's cost in forwards). Budget: 4 forwards.
- `graph-eap-ig8-fwd-{model}`: `eap(model, task, ig_steps=8)` against the same forward. Budget: 3 per step + 2
  = 26 forwards.

`extra_info` records `forward_equivalents`: the best process CPU time of EAP over that of the forward, in
interleaved repeats of both sides in the same run (on a machine shared with other work, CPU time is steadier
than wall time, which counts the time the process waited), and the `budget`. There is no output to compare: the
reference computes no scores; the scores are checked finite.

FULL: GPT-2-small-shaped native models (12 layers × 12 heads, d_model 768, d_head 64, vocabulary 1,000), one
with MLPs (d_mlp 3,072, GELU; 32,936 edges) and one attention-only, and a LLaMA-shaped Hugging Face model of the
same size class (12 layers × 12 heads with 4 key/value heads, d_model 768, SwiGLU d_mlp 2,048, RMSNorm, rotary),
on an induction task of 8 × 25 tokens. Short mode: a 2 × 4, d_model 64 native model with MLPs and a LLaMA-shaped
one of that size, 4 × 13 tokens.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.conftest import FULL
from circuits.graph import eap
from circuits.models import ModelSpec, build, random_llama
from circuits.tasks import induction_task

if FULL:
    MODELS = {"gpt2small-mlp": lambda: build(ModelSpec(12, 768, 12, 64, 1000, 64, d_mlp=3072, act_fn="gelu")),
              "gpt2small-attn-only": lambda: build(ModelSpec(12, 768, 12, 64, 1000, 64)),
              "llama-gpt2small": lambda: random_llama(n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_vocab=1000,
                                                      n_ctx=64, d_mlp=2048)}
    BATCH, HALF, VOCAB = 8, 12, 1000
else:
    MODELS = {"2l-mlp-short": lambda: build(ModelSpec(2, 64, 4, 16, 64, 32, d_mlp=256, act_fn="gelu")),
              "2l-llama-short": lambda: random_llama(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_vocab=64,
                                                     n_ctx=32, d_mlp=128)}
    BATCH, HALF, VOCAB = 4, 6, 64
STEPS = 8
BUDGET = {0: 4, STEPS: 3 * STEPS + 2}
_MODELS: dict[str, object] = {}


@pytest.fixture(scope="module")
def task():
    return induction_task(BATCH, HALF, VOCAB, seed=0)


def _model(name: str):
    if name not in _MODELS:
        _MODELS[name] = MODELS[name]()  # seed 0
    return _MODELS[name]


def _forward(model, task):
    with torch.no_grad():
        return model(task.clean)


def _forward_equivalents(model, task, steps: int, repeats: int) -> float:
    """min(EAP CPU time) / min(forward CPU time) over interleaved repeats (both see the same machine load)."""
    best_eap, best_fwd = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.process_time()
        _forward(model, task)
        best_fwd = min(best_fwd, time.process_time() - start)
        start = time.process_time()
        eap(model, task, ig_steps=steps, progress=False)
        best_eap = min(best_eap, time.process_time() - start)
    return best_eap / best_fwd


def _group(steps: int, name: str) -> str:
    return f"graph-eap{'-ig8' if steps else ''}-fwd-{name}"


@pytest.mark.parametrize("steps", [0, STEPS])
@pytest.mark.parametrize("name", list(MODELS))
def test_eap_forward_reference(run_bench, name, steps, task):
    model = _model(name)
    out = run_bench(lambda: _forward(model, task), group=_group(steps, name), side="reference")
    assert out.shape == (*task.clean.shape, VOCAB)


@pytest.mark.parametrize("steps", [0, STEPS])
@pytest.mark.parametrize("name", list(MODELS))
def test_eap_forward_ours(run_bench, benchmark, name, steps, task):
    model = _model(name)
    r = run_bench(lambda: eap(model, task, ig_steps=steps, progress=False), group=_group(steps, name), side="ours",
                  rounds=3 if FULL else None)
    assert torch.isfinite(r.values[r.circuit.graph.valid]).all()
    benchmark.extra_info.update(
        forward_equivalents=round(_forward_equivalents(model, task, steps, 3 if FULL else 2), 2),
        budget=BUDGET[steps], n_edges=r.circuit.graph.n_edges)

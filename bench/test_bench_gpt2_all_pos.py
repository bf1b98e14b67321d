"""The issue's compute-bound setting: head outputs patched at all positions on a GPT-2-small-shaped model.

FULL only (one round each; the reference takes about 1.5 minutes): 12 layers × 12 heads, d_model 768, d_mlp
3072, the full GPT-2 vocabulary of 50257, random weights through `boot_transformers`; an induction task of
8 rows × 32 tokens with a logit difference at 15 positions. Reference: transformer_lens's
`get_act_patch_attn_head_out_all_pos`, one full forward per head (144). Ours: `activation_patch(..., "z",
per_position=False)`. Outputs asserted equal (1e-5 of the largest |value|).

The FLOP floor is what any method must recompute: for a head in layer l, the layers after l at every position
(the last one only at the metric's positions, except for its keys and values) and two columns of W_U at the
metric's positions. `flop_floor_s` turns it into seconds at the matrix-product rate this machine reaches on
the model's own shapes, measured in the same run; the benchmark's extra_info records both and our time over
the floor.
"""

from __future__ import annotations

import time

import pytest
import torch
import transformer_lens.patching as tlp

from bench.conftest import FULL, assert_equal_outputs
from circuits.activations import activation_patch
from circuits.models import random_gpt2
from circuits.tasks import Task, induction_task

pytestmark = pytest.mark.skipif(not FULL, reason="full benchmark only (BENCH_FULL=1)")

GROUP = "activations-patch-z-all-pos-gpt2small-50k-8x32"
D_VOCAB = 50257
_RESULTS: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module")
def model():
    return random_gpt2(n_layers=12, d_model=768, n_heads=12, d_vocab=D_VOCAB, n_ctx=64)


@pytest.fixture(scope="module")
def task():
    t = induction_task(8, 16, D_VOCAB, seed=0)  # 33 tokens; the last is only ever an answer
    return Task(t.name, t.clean[:, :32], t.corrupted[:, :32], t.answers, t.positions, t.wrong_answers, t.metric)


def _ours(model, task) -> torch.Tensor:
    return activation_patch(model, task, "z", per_position=False, progress=False).raw


def _reference(model, task) -> torch.Tensor:
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(task.clean)
        ref = tlp.get_act_patch_attn_head_out_all_pos(
            model, task.corrupted, clean_cache, lambda logits: task.score(logits, clean_logits))
    return ref.detach().float().cpu()


def _result(side: str, model, task) -> torch.Tensor:
    if side not in _RESULTS:
        _RESULTS[side] = (_ours if side == "ours" else _reference)(model, task)
    return _RESULTS[side]


def layer_flops(cfg, batch: int, n_pos: int, n_query: int) -> float:
    """FLOPs of one block on `batch` rows: keys and values at `n_pos` positions, the rest at `n_query`."""
    d, H, dh, d_mlp = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    kv = 2 * 2 * n_pos * d * H * dh
    q_attn = 2 * n_query * d * H * dh + 2 * 2 * H * n_query * n_pos * dh + 2 * n_query * H * dh * d
    mlp = 2 * 2 * n_query * d * d_mlp
    return batch * (kv + q_attn + mlp)


def flop_floor(cfg, batch: int, n_pos: int, n_read: int) -> float:
    """FLOPs that patching every head at all positions must redo (see the module docstring)."""
    L = cfg.n_layers
    total = 0.0
    for layer in range(L):
        redo = sum(layer_flops(cfg, batch, n_pos, n_pos) for _ in range(layer + 1, L - 1))
        if layer < L - 1:
            redo += layer_flops(cfg, batch, n_pos, n_read)
        redo += batch * n_pos * 2 * cfg.d_head * cfg.d_model  # the head's change through W_O
        redo += batch * n_read * 2 * cfg.d_model * 2  # two columns of W_U
        total += cfg.n_heads * redo
    return total


def reference_flops(cfg, batch: int, n_pos: int) -> float:
    """FLOPs of the reference's forwards: every block and the whole unembedding, once per head."""
    one = cfg.n_layers * layer_flops(cfg, batch, n_pos, n_pos) + batch * n_pos * 2 * cfg.d_model * cfg.d_vocab
    return cfg.n_layers * cfg.n_heads * one


def matmul_rate(cfg, rows: int) -> float:
    """FLOP/s of this machine on the model's largest product ([rows, d_model] × [d_model, d_mlp]), best of 5."""
    a, b = torch.randn(rows, cfg.d_model), torch.randn(cfg.d_model, cfg.d_mlp)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * rows * cfg.d_model * cfg.d_mlp / best


@pytest.mark.parametrize("side", ["reference", "ours"])
def test_z_all_pos_gpt2(run_bench, benchmark, model, task, side):
    fn = _ours if side == "ours" else _reference
    out = run_bench(lambda: fn(model, task), group=GROUP, side=side, rounds=1)
    _RESULTS.setdefault(side, out)
    other = _result("reference" if side == "ours" else "ours", model, task)
    assert_equal_outputs(*((out, other) if side == "ours" else (other, out)))
    cfg = model.cfg
    floor = flop_floor(cfg, task.batch, task.seq_len, len(task.positions))
    rate = matmul_rate(cfg, task.batch * task.seq_len * 4)
    elapsed = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "flops": floor if side == "ours" else reference_flops(cfg, task.batch, task.seq_len),
        "floor_flops": floor, "matmul_gflops": rate / 1e9, "floor_s": floor / rate,
        "time_over_floor": elapsed / (floor / rate),
    })
    print(f"{side}: {elapsed:.2f} s; floor {floor / 1e12:.3f} TFLOP = {floor / rate:.2f} s at "
          f"{rate / 1e9:.1f} GFLOP/s; time / floor = {elapsed / (floor / rate):.2f}")

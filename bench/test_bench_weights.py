"""Composition scores (Q, K and V, every head pair) against transformer_lens's `all_composition_scores`.

- `weights-composition-QKV-*`: all three kinds (`all_composition_scores`) against transformer_lens's three.
- `weights-composition-K-*`: one kind (`composition_scores(model, "K")`) against transformer_lens's K.
- `weights-composition-K-vs-QKV-*`: one kind (ours) against all three kinds of ours (reference): a ratio
  of at least 1 means one kind costs no more than three.

FULL: a GPT-2-small-shaped attention stack (12 layers × 12 heads, d_model 768, d_head 64, random weights);
the reference takes tens of seconds per kind, so it runs one timed round. Short mode: a 4 × 4, d_model 128
stack. Ours is timed with its baseline cache cleared each round (it measures the random-matrix baseline
every call), and with `fold_layernorm=False`, which is what transformer_lens computes. Both sides assert
equal scores (1e-5 of the largest score) with the other, whose result is computed once per session.
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import FULL, assert_equal_outputs
from circuits.models import attn_only
from circuits.weights import all_composition_scores, composition_baseline, composition_scores

SHAPE = (12, 768, 12, 64) if FULL else (4, 128, 4, 32)
SUFFIX = "-gpt2small" if FULL else "-small"
GROUP = "weights-composition-QKV" + SUFFIX
_RESULTS: dict[str, list[torch.Tensor]] = {}


@pytest.fixture(scope="module")
def model():
    return attn_only(*SHAPE, d_vocab=64, n_ctx=32, seed=0)


def _ours(model) -> list[torch.Tensor]:
    composition_baseline.cache_clear()
    result = all_composition_scores(model, fold_layernorm=False)
    return [result[kind].scores for kind in "QKV"]


def _reference(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model.all_composition_scores(kind).scores.detach() for kind in "QKV"]


def _result(side: str, model) -> list[torch.Tensor]:
    if side not in _RESULTS:
        _RESULTS[side] = (_ours if side == "ours" else _reference)(model)
    return _RESULTS[side]


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for kind, x, y in zip("QKV", a, b):
        assert_equal_outputs(x, y, kind)


def test_composition_scores_reference(run_bench, model):
    out = run_bench(lambda: _reference(model), group=GROUP, side="reference", rounds=1 if FULL else None)
    _RESULTS.setdefault("reference", out)
    _assert_equal(_result("ours", model), out)


def test_composition_scores_ours(run_bench, model):
    out = run_bench(lambda: _ours(model), group=GROUP, side="ours", rounds=3 if FULL else None)
    _RESULTS.setdefault("ours", out)
    _assert_equal(out, _result("reference", model))


def _ours_k(model) -> torch.Tensor:
    composition_baseline.cache_clear()
    return composition_scores(model, "K", fold_layernorm=False).scores


def test_composition_k_reference(run_bench, model):
    with torch.no_grad():
        out = run_bench(lambda: model.all_composition_scores("K").scores.detach(),
                        group="weights-composition-K" + SUFFIX, side="reference", rounds=1 if FULL else None)
    assert_equal_outputs(_result("ours", model)[1], out, "K")


def test_composition_k_ours(run_bench, model):
    out = run_bench(lambda: _ours_k(model), group="weights-composition-K" + SUFFIX, side="ours",
                    rounds=3 if FULL else None)
    assert_equal_outputs(out, _result("reference", model)[1], "K")


def test_composition_k_vs_all_three_reference(run_bench, model):
    out = run_bench(lambda: _ours(model), group="weights-composition-K-vs-QKV" + SUFFIX, side="reference",
                    rounds=3 if FULL else None)
    _assert_equal(out, _result("reference", model))


def test_composition_k_vs_all_three_ours(run_bench, model):
    out = run_bench(lambda: _ours_k(model), group="weights-composition-K-vs-QKV" + SUFFIX, side="ours",
                    rounds=3 if FULL else None)
    assert_equal_outputs(out, _result("ours", model)[1], "K")

"""The weights engine's attention pieces against a float64 softmax computed from scratch."""

from __future__ import annotations

import pytest
import torch

from circuits.activations import engine
from circuits.engine import causal_bias, hidden_keys
from circuits.models import attn_only


@pytest.fixture(scope="module")
def w():
    return engine.Weights.of(attn_only(2, 64, 4, 16, d_vocab=64, n_ctx=32, seed=0))


def _reference_z(q, k, v, q_pos, scale):
    """z [..., nq, d] of queries at q_pos over keys 0..q_pos (float64)."""
    scores = torch.einsum("...id,...jd->...ij", q.double(), k.double()) / scale
    hidden = torch.arange(k.shape[-2])[None, :] > q_pos[:, None]
    return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v.double()


def test_attention_values_equal_the_softmax_of_read_queries_with_shared_keys(w):
    gen = torch.Generator().manual_seed(0)
    K, B, H, P, d = 3, 2, 4, 9, 16
    q_pos = torch.tensor([2, 5, 8])  # read positions only, keys of every position
    q = torch.randn(K, B, H, len(q_pos), d, generator=gen)
    k, v = (torch.randn(B, H, P, d, generator=gen).expand(K, B, H, P, d) for _ in range(2))  # shared by the runs
    ours = engine.attention_values(w, q, k, v, q_pos)
    assert ours.shape == (K, B, H, len(q_pos), d)
    expected = _reference_z(q, k, v, q_pos, w.attn_scale)
    assert (ours.double() - expected).abs().max() < 1e-6 * v.abs().max()
    pattern = engine.attention_pattern(w, q, k, q_pos)  # the same attention, pattern returned
    assert torch.allclose(ours, pattern @ v, atol=1e-6)


def test_add_attn_output_equals_the_residual_plus_the_output(w):
    gen = torch.Generator().manual_seed(1)
    H, d, m = w.n_heads, w.W_O.shape[2], w.W_O.shape[3]
    z = torch.randn(5, 2, 7, H, d, generator=gen)
    resid = torch.randn(2, 7, m, generator=gen)  # broadcast over the 5 stacked runs
    expected = resid.double() + torch.einsum("kbphd,hdm->kbpm", z.double(), w.W_O[1].double()) + w.b_O[1].double()
    ours = engine.add_attn_output(w, 1, z, resid)
    assert ours.shape == (5, 2, 7, m)
    assert (ours.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    assert torch.allclose(ours, engine.attn_output(w, 1, z) + resid, atol=1e-5)


def test_causal_mask_is_the_upper_triangle_at_the_query_positions():
    P = 6
    q_pos = torch.tensor([0, 3, 5])
    upper = torch.ones(P, P, dtype=torch.bool).triu(1)  # key j after query i
    assert torch.equal(hidden_keys(q_pos, P), upper[q_pos])
    bias = causal_bias(q_pos, P, torch.float64)
    assert torch.equal(bias.isinf(), upper[q_pos]) and bool((bias[~upper[q_pos]] == 0).all())

"""The leave-one-key-out attention update against a float64 softmax recomputed from scratch."""

from __future__ import annotations

import torch

from circuits.activations.key_update import LeaveOneOut, query_row


def _attention(q, k, v, q_pos, scale):
    """z [batch, nq, head, d] of queries at q_pos over keys 0..q_pos (float64 reference)."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / scale
    hidden = torch.arange(k.shape[1])[None, :] > q_pos[:, None]
    a = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", a, v), a


def _sharp_run(seed: int, sharpness: float):
    gen = torch.Generator().manual_seed(seed)
    B, P, H, d = 3, 9, 2, 4
    q, k, v = (torch.randn(B, P, H, d, generator=gen, dtype=torch.float64) for _ in range(3))
    q = q * sharpness  # near one-hot patterns: a head attends almost only to one key
    return q, k, v, gen


def test_replace_key_and_query_row_equal_recomputed_attention():
    scale = 2.0
    for sharpness in (1.0, 30.0):
        q, k, v, gen = _sharp_run(0, sharpness)
        P = q.shape[1]
        pos = torch.arange(P)
        z, a = _attention(q, k, v, pos, scale)
        loo = LeaveOneOut.of(q.float(), k.float(), v.float(), z.float(), a.float(), pos, scale)
        p = torch.tensor([0, 3, 3, 8, 5])
        K = len(p)
        k_new, v_new, q_new = (torch.randn(K, q.shape[0], q.shape[2], q.shape[3], generator=gen,
                                           dtype=torch.float64) for _ in range(3))
        ours = loo.replace_key(p, k_new.float(), v_new.float())
        ours_row = query_row(p, q_new.float(), k_new.float(), v_new.float(), k.float(), v.float(), scale)
        for i in range(K):
            k2, v2, q2 = k.clone(), v.clone(), q.clone()
            k2[:, p[i]], v2[:, p[i]] = k_new[i], v_new[i]
            expected, _ = _attention(q, k2, v2, pos, scale)  # queries unchanged
            assert (ours[i].double() - expected).abs().max() < 1e-5 * v.abs().max()
            q2[:, p[i]] = q_new[i]
            row, _ = _attention(q2, k2, v2, pos, scale)
            assert (ours_row[i].double() - row[:, p[i]]).abs().max() < 1e-5 * v.abs().max()
        if sharpness > 1:
            assert a.max() > 1 - 1e-6  # the case where z − a_ip v_p would cancel


def test_replace_key_from_a_later_query():
    q, k, v, gen = _sharp_run(1, 5.0)
    pos = torch.arange(q.shape[1])
    z, a = _attention(q, k, v, pos, 1.5)
    loo = LeaveOneOut.of(q.float(), k.float(), v.float(), z.float(), a.float(), pos, 1.5)
    p = torch.tensor([4, 6])
    k_new = torch.randn(2, q.shape[0], q.shape[2], q.shape[3], generator=gen)
    v_new = torch.randn(2, q.shape[0], q.shape[2], q.shape[3], generator=gen)
    full = loo.replace_key(p, k_new, v_new)
    assert torch.equal(loo.replace_key(p, k_new, v_new, 4), full[:, :, 4:])
    assert torch.allclose(full[:, :, :4], z.float()[None, :, :4].expand(2, -1, -1, -1, -1), atol=1e-6)


def test_sums_for_some_keys_equal_sums_for_all():
    """Built for the key positions that will change (as activation patching does), the update equals the one
    built for every position; a position outside them is an error, not a silent wrong answer."""
    import pytest

    q, k, v, gen = _sharp_run(2, 3.0)
    pos = torch.arange(q.shape[1])
    z, a = _attention(q, k, v, pos, 1.5)
    args = (q.float(), k.float(), v.float(), z.float(), a.float(), pos, 1.5)
    p = torch.tensor([6, 2, 6])
    k_new, v_new = (torch.randn(3, q.shape[0], q.shape[2], q.shape[3], generator=gen) for _ in range(2))
    some = LeaveOneOut.of(*args, keys=torch.tensor([2, 6]))
    assert torch.equal(some.replace_key(p, k_new, v_new), LeaveOneOut.of(*args).replace_key(p, k_new, v_new))
    with pytest.raises(ValueError, match=r"key positions \[3\]"):
        some.replace_key(torch.tensor([3]), k_new[:1], v_new[:1])

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


def test_replacing_the_key_a_head_attends_to_almost_alone():
    """The key holding all but 1e-8 of the attention gets a score far below the rest: the new output is the other
    keys' average, which z − a_p v_p cannot give in float32 (it cancels to rounding noise); the update sums
    those keys directly and matches float64."""
    P, scale = 6, 2.0
    k = torch.eye(P, dtype=torch.float64)[None, :, None]  # key j = e_j: query i's score of key j is q_i[j]/scale
    q = torch.full((1, P, 1, P), -17.0 * scale, dtype=torch.float64)
    q[..., 2] = scale  # score 1 for key 2, -17 for the others: a_i2 = 1 - 5e-8 at the last query
    v = torch.randn(1, P, 1, P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pos = torch.arange(P)
    z, a = _attention(q, k, v, pos, scale)
    loo = LeaveOneOut.of(q.float(), k.float(), v.float(), z.float(), a.float(), pos, scale)
    k_new = -40.0 * torch.eye(P, dtype=torch.float64)[2][None, None, None]  # score -40
    v_new = torch.randn(1, 1, 1, P, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    k2, v2 = k.clone(), v.clone()
    k2[:, 2], v2[:, 2] = k_new[0], v_new[0]
    expected, _ = _attention(q, k2, v2, pos, scale)
    others = v[0, [0, 1, 3, 4, 5], 0]
    assert torch.allclose(expected[0, P - 1, 0], others.mean(0), atol=1e-9)  # the set-up is what it says
    ours = loo.replace_key(torch.tensor([2]), k_new.float(), v_new.float())[0].double()
    assert (ours - expected).abs().max() < 1e-5 * v.abs().max()
    z_f, a_f, v_f = z.float(), a.float(), v.float()
    cancelled = (z_f[0, P - 1, 0] - a_f[0, 0, P - 1, 2] * v_f[0, 2, 0]) / (1 - a_f[0, 0, P - 1, 2])
    assert (cancelled.double() - expected[0, P - 1, 0]).abs().max() > 0.1 * v.abs().max()  # why it is needed


def test_replacing_the_key_a_head_attends_to_alone_in_float32():
    """The other keys' weights underflow to exactly 0 in the float32 pattern (scores 201 below the top key's):
    their share comes from the scores, so a new key scored between them and the old top key wins, and one
    scored below them leaves the others' average; neither is 0 / 0."""
    P = 4
    k = torch.eye(P, dtype=torch.float64)[None, :, None]  # key j = e_j: query i's score of key j is q_i[j]
    q = torch.full((1, P, 1, P), -200.0, dtype=torch.float64)
    q[..., 1] = 1.0
    v = torch.randn(1, P, 1, P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pos = torch.arange(P)
    z, a = _attention(q, k, v, pos, 1.0)
    assert a.float()[0, 0, 2:, [0, 2, 3]].max() == 0  # the set-up is what it says
    loo = LeaveOneOut.of(q.float(), k.float(), v.float(), z.float(), a.float(), pos, 1.0)
    v_new = torch.randn(1, 1, 1, P, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for new_score in (-150.0, -250.0):
        k_new = (new_score * torch.eye(P, dtype=torch.float64)[1])[None, None, None]
        k2, v2 = k.clone(), v.clone()
        k2[:, 1], v2[:, 1] = k_new[0], v_new[0]
        expected, _ = _attention(q, k2, v2, pos, 1.0)
        ours = loo.replace_key(torch.tensor([1]), k_new.float(), v_new.float())[0].double()
        assert torch.isfinite(ours).all()
        assert (ours[:, 2:] - expected[:, 2:]).abs().max() < 1e-5 * v.abs().max()  # queries 2, 3 (1 is p's own)

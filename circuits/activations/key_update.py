"""Attention after one position's key and value change: the update that per-position patches share.

When the residual stream entering a layer differs from the base run at a single position p, a query at i ≠ p
keeps its base query and every base key except key p: only its score s_ip and value v_p change. With the base
run's log-sum-exp ℓ_i of the query's scores and the sums that leave key p out,

    R[i, p] = Σ_{j ≤ i, j ≠ p} a_ij v_j        D[i, p] = Σ_{j ≤ i, j ≠ p} a_ij        (a: the base pattern)

the new output is z'_i = (R e^{ℓ_i − c} + v'_p e^{s'_ip − c}) / (D e^{ℓ_i − c} + e^{s'_ip − c}) with
c = max(ℓ_i, s'_ip): O(d_head) per query and component instead of O(pos · d_head).

R and D are not summed per key. Every key but the query's most attended one, m_i, holds at most half of the
query's attention (the weights sum to 1), so there R = z_i − a_ip v_p (formed as R[i, m_i] + a_im v_m − a_ip v_p)
and D = 1 − a_ip lose nothing to cancellation: D ≥ 1/2, and the rounding of R is of the order of z_i's own
(each term is at most Σ_j a_ij |v_j|). Only for m_i, where a head may attend almost only to it and
z_i − a_ip v_p would cancel, R and D are summed over the other keys, once per query: one more pass over the
layer's pattern, whatever the number of keys changed.
ℓ_i = s_im − log a_im, read from the most attended key (a_im ≥ 1/(i + 1), so its logarithm is exact to
rounding). The query at p itself changes too; `query_row` recomputes that one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass(frozen=True, eq=False)
class LeaveOneOut:
    """One layer of a base run, seen from queries at `q_pos`, ready to have any one key replaced.

    Example: `loo = LeaveOneOut.of(run.q[0], run.k[0], run.v[0], run.pattern[0], pos, scale)`"""

    q_pos: Int[Tensor, " nq"]
    q: Float[Tensor, "batch head nq d_head"]  # head-major, for one batched product with the new keys
    v: Float[Tensor, "batch pos head d_head"]
    a: Float[Tensor, "pos batch nq head"]  # the base pattern of the queries, key-major
    lse: Float[Tensor, "batch nq head"]
    top: Int[Tensor, "batch nq head"]  # m_i: each query's most attended key
    top_a: Float[Tensor, "batch nq head"]  # a_im
    top_v: Float[Tensor, "batch nq head d_head"]  # v_m
    top_rest_z: Float[Tensor, "batch nq head d_head"]  # R[i, m_i]
    top_rest_a: Float[Tensor, "batch nq head"]  # D[i, m_i]
    scale: float

    @classmethod
    def of(cls, q: Float[Tensor, "batch pos head d_head"], k: Float[Tensor, "batch pos head d_head"],
           v: Float[Tensor, "batch pos head d_head"], pattern: Float[Tensor, "batch head pos pos"],
           q_pos: Int[Tensor, " nq"], scale: float) -> LeaveOneOut:
        """From a layer's cached q, k, v and pattern (TransformerLens layouts)."""
        a = pattern[:, :, q_pos]  # batch head nq key
        top_a, top = a.max(-1)
        others = a.scatter(-1, top[..., None], 0.0)  # each query's pattern without its most attended key

        def at_top(t: Tensor) -> Tensor:  # [batch, pos, head, d] -> its rows at each query's top key
            return t.transpose(1, 2).gather(2, top[..., None].expand(*top.shape, t.shape[-1]))

        def query_major(t: Tensor) -> Tensor:  # batch head nq ... -> batch nq head ..., contiguous, so that
            return t.transpose(1, 2).contiguous()  # per-component results come out contiguous too

        q_at = q[:, q_pos].transpose(1, 2).contiguous()
        lse = torch.einsum("bhid,bhid->bhi", q_at, at_top(k)) / scale - top_a.log()
        return cls(q_pos=q_pos, q=q_at, v=v, a=a.permute(3, 0, 2, 1).contiguous(), lse=query_major(lse),
                   top=query_major(top), top_a=query_major(top_a), top_v=query_major(at_top(v)),
                   top_rest_z=query_major(others @ v.transpose(1, 2)), top_rest_a=query_major(others.sum(-1)),
                   scale=scale)

    def replace_key(self, p: Int[Tensor, " k"], k_new: Float[Tensor, "k batch head d_head"],
                    v_new: Float[Tensor, "k batch head d_head"], first: int = 0
                    ) -> Float[Tensor, "k batch nq head d_head"]:
        """The output of the queries `first`.. when component k replaces key and value at position p[k]
        (queries unchanged; queries before p[k] cannot see it and keep their base output, to rounding)."""
        w_old, w_new, a_p, top = self._weights(p, k_new, first)
        not_top = ~top
        # z' = R w_old + v'_p w_new, with R = R[i, m] + a_m v_m − a_p v_p where p is not the top key m, R[i, m]
        # where it is
        z = self.top_rest_z[:, first:] * w_old[..., None]
        z.addcmul_(self.top_v[:, first:], (self.top_a[:, first:] * not_top).mul_(w_old)[..., None])
        v_p = self.v.index_select(1, p).movedim(1, 0)[:, :, None]  # k batch 1 head d_head
        z.addcmul_(v_p, a_p.mul_(not_top).mul_(w_old).neg_()[..., None])
        return z.addcmul_(v_new[:, :, None], w_new[..., None])

    def _weights(self, p: Int[Tensor, " k"], k_new: Float[Tensor, "k batch head d_head"], first: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """[k, batch, nq, head] each: the weights of R and of v'_p, a_ip, and whether p is the top key."""
        b, h, nq, d = self.q[:, :, first:].shape
        unseen = self.q_pos[first:, None] < p[None, :]  # score -inf: new = 0, D = 1, w_old = 1
        bias = torch.zeros(unseen.shape, dtype=self.q.dtype, device=p.device).masked_fill_(unseen, float("-inf"))
        keys = k_new.permute(1, 2, 3, 0).reshape(b * h, d, len(p))
        s_new = torch.baddbmm(bias, self.q[:, :, first:].reshape(b * h, nq, d), keys, alpha=1 / self.scale)
        s_new = s_new.view(b, h, nq, len(p)).permute(3, 0, 2, 1).contiguous()
        lse = self.lse[:, first:]
        c = torch.maximum(lse, s_new)
        old, new = (lse - c).exp_(), s_new.sub_(c).exp_()
        a_p = self.a[p, :, first:]
        top = self.top[:, first:] == p[:, None, None, None]
        den = torch.where(top, self.top_rest_a[:, first:], 1.0 - a_p).mul_(old).add_(new)
        return old.div_(den), new.div_(den), a_p, top


def query_row(p: Int[Tensor, " k"], q_new: Float[Tensor, "k batch head d_head"],
              k_new: Float[Tensor, "k batch head d_head"], v_new: Float[Tensor, "k batch head d_head"],
              k: Float[Tensor, "batch pos head d_head"], v: Float[Tensor, "batch pos head d_head"], scale: float
              ) -> Float[Tensor, "k batch head d_head"]:
    """The output of the query at p[k] when that position's q, k and v all change (keys 0..p[k] visible).
    Example: `z_p = query_row(p, q_row, k_row, v_row, run.k[0], run.v[0], scale)`"""
    keys = torch.arange(k.shape[1], device=k.device)
    at_p = (keys[None, :] == p[:, None])[:, None, None, :]  # k 1 1 key
    scores = torch.where(at_p, torch.einsum("kbhd,kbhd->kbh", q_new, k_new)[..., None],
                         torch.einsum("kbhd,bjhd->kbhj", q_new, k)) / scale
    a = scores.masked_fill((keys[None, :] > p[:, None])[:, None, None, :], float("-inf")).softmax(-1)
    a_p = a.gather(-1, p[:, None, None, None].expand(*a.shape[:-1], 1))
    v_p = v.index_select(1, p).movedim(1, 0)
    return torch.einsum("kbhj,bjhd->kbhd", a, v) + a_p * (v_new - v_p)

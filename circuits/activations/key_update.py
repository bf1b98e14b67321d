"""Attention after one position's key and value change: the update that per-position patches share.

When the residual stream entering a layer differs from the base run at a single position p, a query at i ≠ p
keeps its base query and every base key except key p: only its score s_ip and value v_p change. With the base
run's log-sum-exp ℓ_i of the query's scores and the other keys' share

    D[i, p] = Σ_{j ≤ i, j ≠ p} a_ij        R̂[i, p] = Σ_{j ≤ i, j ≠ p} a_ij v_j / D[i, p]        (a: the base pattern)

the new output is z'_i = (R̂ e^{L − c} + v'_p e^{s'_ip − c}) / (e^{L − c} + e^{s'_ip − c}) with L = ℓ_i + log D and
c = max(L, s'_ip): O(d_head) per query and component instead of O(pos · d_head), and never 0 / 0.

R̂ and D are not summed per key. Every key but the query's most attended one, m_i, holds at most half of the
query's attention (the weights sum to 1), so there D = 1 − a_ip ≥ 1/2 and D·R̂ = z_i − a_ip v_p (the base
output less key p) loses nothing to cancellation: each term is at most Σ_j a_ij |v_j|. For m_i, where a head
may attend almost only to it and 1 − a_im or z_i − a_im v_m would cancel, the share is summed over the other
keys directly, once per query; where it is so small (D < e^-60) that the float pattern may have rounded those
weights to 0, it is read from their scores instead (log D as their log-sum-exp less ℓ_i, R̂ as their softmax
times v), so that a new key scored far below the old one still gets the right answer, not 0 / 0.
ℓ_i = s_im − log a_im (a_im ≥ 1/(i + 1): exact to rounding). The query at p itself changes too; `query_row`
recomputes that one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.engine.primitives import hidden_keys


@dataclass(frozen=True, eq=False)
class LeaveOneOut:
    """One layer of a base run, seen from queries at `q_pos`, ready to have any one key replaced.

    Example: `loo = LeaveOneOut.of(run.q[0], run.k[0], run.v[0], run.z[0], run.pattern[0], pos, scale)`"""

    q_pos: Int[Tensor, " nq"]
    q: Float[Tensor, "batch head nq d_head"]  # head-major, for one batched product with the new keys
    v: Float[Tensor, "batch pos head d_head"]
    a: Float[Tensor, "pos batch nq head"]  # the base pattern of the queries, key-major
    lse: Float[Tensor, "batch nq head"]  # ℓ_i
    top: Int[Tensor, "batch nq head"]  # m_i: each query's most attended key
    z: Float[Tensor, "batch nq head d_head"]  # z_i, the base output
    top_rest_z: Float[Tensor, "batch nq head d_head"]  # R̂[i, m_i]
    top_log_rest: Float[Tensor, "batch nq head"]  # log D[i, m_i] (−inf: no other key)
    scale: float
    causal: bool = True  # bidirectional attention: every query sees every key

    @classmethod
    def of(cls, q: Float[Tensor, "batch pos head d_head"], k: Float[Tensor, "batch pos head d_head"],
           v: Float[Tensor, "batch pos head d_head"], z: Float[Tensor, "batch pos head d_head"],
           pattern: Float[Tensor, "batch head pos pos"], q_pos: Int[Tensor, " nq"], scale: float,
           causal: bool = True) -> LeaveOneOut:
        """From a layer's cached q, k, v, z and pattern (TransformerLens layouts; q and k rotated, one key and
        value per query head)."""
        q_at = q[:, q_pos].transpose(1, 2).contiguous()  # batch head nq d_head
        a = pattern[:, :, q_pos]  # batch head nq key
        top_a, top = a.max(-1)

        def query_major(t: Tensor) -> Tensor:  # batch head nq ... -> batch nq head ..., contiguous, so that
            return t.transpose(1, 2).contiguous()  # per-component results come out contiguous too

        lse = torch.einsum("bhid,bhid->bhi", q_at, _rows_at(k, top)) / scale - top_a.log()  # a_im ≥ 1/(i + 1)
        log_rest, rest_z = _share_from_pattern(a, top, v)
        lost = (log_rest < _LOST) & ((q_pos > 0) | (not causal))  # the other keys' weights underflow: read scores
        if bool(lost.any()):
            scores = (q_at @ k.permute(0, 2, 3, 1) / scale).masked_fill_(hidden_keys(q_pos, k.shape[1], causal),
                                                                              float("-inf"))
            exact_log, exact_z = _share_from_scores(scores, top, v)
            log_rest, rest_z = torch.where(lost, exact_log, log_rest), torch.where(lost[..., None], exact_z, rest_z)
        return cls(q_pos=q_pos, q=q_at, v=v, a=a.permute(3, 0, 2, 1).contiguous(), lse=query_major(lse),
                   top=query_major(top), z=z[:, q_pos].contiguous(), top_rest_z=query_major(rest_z),
                   top_log_rest=query_major(log_rest), scale=scale, causal=causal)

    def replace_key(self, p: Int[Tensor, " k"], k_new: Float[Tensor, "k batch head d_head"],
                    v_new: Float[Tensor, "k batch head d_head"], first: int = 0
                    ) -> Float[Tensor, "k batch nq head d_head"]:
        """The output of the queries `first`.. when component k replaces key and value at position p[k]
        (queries unchanged; queries before p[k] cannot see it and keep their base output, to rounding)."""
        w_rest, w_new, a_p, top = self._weights(p, k_new, first)
        # z' = R̂ w_rest + v'_p w_new, with R̂ = (z_i − a_p v_p) / (1 − a_p) where p is not the top key m, R̂_m
        # where it is (there 1 − a_p may be 0: its quotient is masked)
        per_d = w_rest / torch.rsub(a_p, 1.0)
        z = self.z[:, first:] * per_d.masked_fill(top, 0.0)[..., None]
        z.addcmul_(self.top_rest_z[:, first:], w_rest.masked_fill_(~top, 0.0)[..., None])
        v_p = self.v.index_select(1, p).movedim(1, 0)[:, :, None]  # k batch 1 head d_head
        z.addcmul_(v_p, per_d.mul_(a_p).neg_().masked_fill_(top, 0.0)[..., None])
        return z.addcmul_(v_new[:, :, None], w_new[..., None])

    def _weights(self, p: Int[Tensor, " k"], k_new: Float[Tensor, "k batch head d_head"], first: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """[k, batch, nq, head] each: the weights of R̂ and of v'_p, a_ip, and whether p is the top key."""
        b, h, nq, d = self.q[:, :, first:].shape
        unseen = self.q_pos[first:, None] < p[None, :]  # score -inf: new = 0, D = 1, w_rest = 1
        if not self.causal:
            unseen = torch.zeros_like(unseen)
        bias = torch.zeros(unseen.shape, dtype=self.q.dtype, device=p.device).masked_fill_(unseen, float("-inf"))
        keys = k_new.permute(1, 2, 3, 0).reshape(b * h, d, len(p))
        s_new = torch.baddbmm(bias, self.q[:, :, first:].reshape(b * h, nq, d), keys, alpha=1 / self.scale)
        s_new = s_new.view(b, h, nq, len(p)).permute(3, 0, 2, 1).contiguous()
        a_p = self.a[p, :, first:]
        top = self.top[:, first:] == p[:, None, None, None]
        log_rest = torch.where(top, self.top_log_rest[:, first:], torch.log1p(-a_p)).add_(self.lse[:, first:])  # L
        c = torch.maximum(log_rest, s_new)
        rest, new = log_rest.sub_(c).exp_(), s_new.sub_(c).exp_()  # one of them is 1
        den = rest + new
        return rest.div_(den), new.div_(den), a_p, top


_LOST = -60.0  # log D below which the pattern's weights of the other keys may have underflowed (float32)


def _rows_at(t: Float[Tensor, "batch pos head d"], key: Int[Tensor, "batch head nq"]
             ) -> Float[Tensor, "batch head nq d"]:
    """t's row at position key[b, h, i] of batch b and head h, for every query i (one index_select)."""
    b, n_keys, h, d = t.shape
    rows = (torch.arange(b, device=key.device)[:, None, None] * n_keys + key) * h
    rows += torch.arange(h, device=key.device)[None, :, None]
    return t.reshape(-1, d).index_select(0, rows.flatten()).view(*key.shape, d)


def _share_from_pattern(a: Float[Tensor, "batch head nq key"], top: Int[Tensor, "batch head nq"],
                        v: Float[Tensor, "batch key head d_head"]
                        ) -> tuple[Float[Tensor, "batch head nq"], Float[Tensor, "batch head nq d_head"]]:
    """log D and R̂ of each query's keys other than its top one, summed from the pattern. No other key: −inf, 0."""
    others = a.scatter(-1, top[..., None], 0.0)
    rest = others.sum(-1)
    return rest.log(), (others @ v.transpose(1, 2)) / torch.where(rest > 0, rest, 1.0)[..., None]


def _share_from_scores(scores: Float[Tensor, "batch head nq key"], top: Int[Tensor, "batch head nq"],
                       v: Float[Tensor, "batch key head d_head"]
                       ) -> tuple[Float[Tensor, "batch head nq"], Float[Tensor, "batch head nq d_head"]]:
    """The same from the scores (masked −inf), exact where the pattern's weights have underflowed: log D is the
    log-sum-exp of the others less that of all, R̂ their softmax times v. No other key: −inf, 0."""
    others = scores.scatter(-1, top[..., None], float("-inf"))
    log_rest = others.logsumexp(-1)
    share = others.sub_(torch.where(torch.isinf(log_rest), 0.0, log_rest)[..., None]).exp_()
    return log_rest - scores.logsumexp(-1), share @ v.transpose(1, 2)


def query_row(p: Int[Tensor, " k"], q_new: Float[Tensor, "k batch head d_head"],
              k_new: Float[Tensor, "k batch head d_head"], v_new: Float[Tensor, "k batch head d_head"],
              k: Float[Tensor, "batch pos head d_head"], v: Float[Tensor, "batch pos head d_head"], scale: float,
              causal: bool = True) -> Float[Tensor, "k batch head d_head"]:
    """The output of the query at p[k] when that position's q, k and v all change (keys 0..p[k] visible, or
    every key under bidirectional attention).
    Example: `z_p = query_row(p, q_row, k_row, v_row, run.k[0], run.v[0], scale)`"""
    keys = torch.arange(k.shape[1], device=k.device)
    at_p = (keys[None, :] == p[:, None])[:, None, None, :]  # k 1 1 key
    scores = torch.where(at_p, torch.einsum("kbhd,kbhd->kbh", q_new, k_new)[..., None],
                         torch.einsum("kbhd,bjhd->kbhj", q_new, k)) / scale
    a = scores.masked_fill(hidden_keys(p, k.shape[1], causal)[:, None, None, :], float("-inf")).softmax(-1)
    a_p = a.gather(-1, p[:, None, None, None].expand(*a.shape[:-1], 1))
    v_p = v.index_select(1, p).movedim(1, 0)
    return torch.einsum("kbhj,bjhd->kbhd", a, v) + a_p * (v_new - v_p)

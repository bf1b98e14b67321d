"""Attention after one position's key and value change: the update that per-position patches share.

When the residual stream entering a layer differs from the base run at a single position p, a query at i ≠ p
keeps its base query and every base key except key p: only its score s_ip and value v_p change. With the base
run's log-sum-exp ℓ_i of the query's scores and the sums that leave key p out,

    R[i, p] = Σ_{j ≤ i, j ≠ p} a_ij v_j        D[i, p] = Σ_{j ≤ i, j ≠ p} a_ij        (a: the base pattern)

the new output is z'_i = (R e^{ℓ_i − c} + v'_p e^{s'_ip − c}) / (D e^{ℓ_i − c} + e^{s'_ip − c}) with
c = max(ℓ_i, s'_ip): O(d_head) per query and component instead of O(pos · d_head). R and D are sums of the
other keys' terms, computed once per layer for the key positions that will be changed; nothing is
subtracted, so the update keeps full precision even when a head attends almost only to p (where
z_i − a_ip v_p would cancel). The query at p
itself changes too; `query_row` recomputes that one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass(frozen=True, eq=False)
class LeaveOneOut:
    """One layer of a base run, seen from queries at `q_pos`, with each key position left out in turn.

    Example: `loo = LeaveOneOut.of(run.q[0], run.k[0], run.v[0], run.z[0], run.pattern[0], pos, scale)`"""

    q_pos: Int[Tensor, " nq"]
    q: Float[Tensor, "batch nq head d_head"]
    z: Float[Tensor, "batch nq head d_head"]
    lse: Float[Tensor, "batch nq head"]
    rest_z: Float[Tensor, "n_keys batch nq head d_head"]  # R[i, keys[n]]
    rest_a: Float[Tensor, "n_keys batch nq head"]  # D[i, keys[n]]
    slot: Int[Tensor, " pos"]  # the row of rest_z / rest_a holding key position p (−1: not computed)
    scale: float

    @classmethod
    def of(cls, q: Float[Tensor, "batch pos head d_head"], k: Float[Tensor, "batch pos head d_head"],
           v: Float[Tensor, "batch pos head d_head"], z: Float[Tensor, "batch pos head d_head"],
           pattern: Float[Tensor, "batch head pos pos"], q_pos: Int[Tensor, " nq"], scale: float,
           keys: Int[Tensor, " n"] | None = None) -> LeaveOneOut:
        """From a layer's cached q, k, v, z and pattern (TransformerLens layouts), for the key positions `keys`
        (default: every position)."""
        q_at, a = q[:, q_pos], pattern[:, :, q_pos]  # a: batch head nq key
        scores = torch.einsum("bihd,bjhd->bhij", q_at, k) / scale
        hidden = torch.arange(k.shape[1], device=k.device)[None, :] > q_pos[:, None]
        lse = scores.masked_fill(hidden, float("-inf")).logsumexp(-1)
        a_key_first = a.permute(3, 0, 2, 1)  # key batch nq head
        terms = a_key_first.new_empty(*a_key_first.shape, v.shape[-1])
        torch.mul(a_key_first[..., None], v.transpose(0, 1)[:, :, None], out=terms)  # a_ij v_j
        P = k.shape[1]
        keys = torch.arange(P, device=k.device) if keys is None else torch.unique(keys.to(k.device))
        slot = torch.full((P,), -1, dtype=torch.long, device=k.device)
        slot[keys] = torch.arange(len(keys), device=k.device)
        return cls(q_pos=q_pos, q=q_at, z=z[:, q_pos], lse=lse.transpose(1, 2),
                   rest_z=_leave_out_sums(terms, keys), rest_a=_leave_out_sums(a_key_first.contiguous(), keys),
                   slot=slot, scale=scale)

    def rest(self, p: Int[Tensor, " k"]
             ) -> tuple[Float[Tensor, "k batch nq head d_head"], Float[Tensor, "k batch nq head"]]:
        """R[i, p[k]] and D[i, p[k]] for every query i."""
        rows = self.slot[p]
        if bool((rows < 0).any()):
            raise ValueError(f"p: key positions {p[rows < 0].tolist()} were not among the keys this was built for")
        return self.rest_z[rows], self.rest_a[rows]

    def replace_key(self, p: Int[Tensor, " k"], k_new: Float[Tensor, "k batch head d_head"],
                    v_new: Float[Tensor, "k batch head d_head"], first: int = 0
                    ) -> Float[Tensor, "k batch nq head d_head"]:
        """The output of the queries `first`.. when component k replaces key and value at position p[k]
        (queries unchanged; queries before p[k] cannot see it and keep their base output)."""
        s_new = torch.einsum("bihd,kbhd->kbih", self.q[:, first:], k_new)[..., None] / self.scale
        lse = self.lse[:, first:, :, None]
        c = torch.maximum(lse, s_new)
        old, new = (lse - c).exp(), (s_new - c).exp()
        rest_z, rest_a = self.rest(p)
        den = rest_a[:, :, first:, :, None] * old + new
        sees = (self.q_pos[None, first:] >= p[:, None])[:, None, :, None, None]  # unseen: rest_z is the base z
        z = rest_z[:, :, first:]
        z.mul_(torch.where(sees, old / den, 1.0))
        return z.addcmul_(v_new[:, :, None], torch.where(sees, new / den, 0.0))


def _leave_out_sums(terms: Float[Tensor, "key ..."], keys: Int[Tensor, " n"]) -> Float[Tensor, "n ..."]:
    """out[i] = Σ_{j ≠ keys[i]} terms[j], as one matrix product with rows of the all-ones-but-the-diagonal
    matrix: each entry is a plain sum of the other terms (nothing is subtracted)."""
    P = terms.shape[0]
    others = torch.ones(len(keys), P, dtype=terms.dtype, device=terms.device)
    others[torch.arange(len(keys), device=keys.device), keys] = 0.0
    return (others @ terms.reshape(P, -1)).view(len(keys), *terms.shape[1:])


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

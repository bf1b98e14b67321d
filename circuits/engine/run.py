"""The one forward recorder: a model's forward from its `Weights`, keeping what the caller asks for.

Every method that needs an unpatched forward builds on `forward`: activation patching and attribution patching
(`circuits.activations.engine.run`, TransformerLens's hook layouts, with or without gradients) and the edge
patcher, ACDC and EAP (`circuits.graph.forward.shared_forward`, one tensor per head, heads after the run axis).
Both read the same q, k and v product, the same attention and the same blocks; they differ only in what they
keep and where the head axis sits (`heads_at`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.engine.primitives import attention_bias, mlp, per_head, rotate
from circuits.engine.weights import Weights

__all__ = ["RECORDABLE", "Record", "forward"]

RECORDABLE = ("resid_pre", "q", "k", "v", "q_rot", "k_rot", "qkv_heads", "pattern", "z", "head_out", "attn_out",
              "resid_mid", "mlp_in", "mlp", "mlp_out")
"""What `forward` can keep per layer (see `Record`)."""


@dataclass(frozen=True, eq=False)
class Record:
    """What one forward kept, one entry per layer for each name asked for (empty lists otherwise); `lead` is
    the input's leading shape (e.g. [batch] or [run, batch]) and `nq` the number of query rows (all positions,
    or the `queries` of the last layer).

    - resid_pre, attn_out (with b_O), resid_mid (resid_pre + attn_out), mlp_in (a node of its own: the block
      input for parallel blocks, resid_mid otherwise), mlp (the MLP's W_out product without b_out), mlp_out
      (with b_out): [*lead, pos, d_model]
    - q, k, v (before any rotary embedding; k and v per key/value head), q_rot, k_rot (rotated):
      [*lead, pos, head, d_head] (TransformerLens's hook layouts)
    - qkv_heads: (q, k, v) before rotary with the head axis at `heads_at` of the leading dims
      ([*lead[:heads_at], head, *lead[heads_at:], pos, d_head]), the tensors the forward continues from
    - pattern: [*lead, head, nq, pos] (with `heads_at` = len(lead): TransformerLens's layout), z: [*lead, nq,
      head, d_head]; head_out: each head's z W_O, [*lead[:heads_at], head, *lead[heads_at:], pos, d_model]
      (0 at positions that are not queries)
    - final: the residual stream entering the final norm [*lead, pos, d_model]
    """

    acts: dict[str, list] = field(repr=False)
    final: Float[Tensor, "*lead pos d_model"]

    def __getattr__(self, name: str) -> list:
        if name in RECORDABLE:
            return self.acts[name]
        raise AttributeError(name)


def forward(w: Weights, resid: Float[Tensor, "*lead pos d_model"], *, record: Collection[str] = RECORDABLE,
            heads_at: int | None = None, queries: Int[Tensor, " nq"] | None = None,
            qkv_from: Callable[[int, Tensor], Tensor] | None = None,
            attn_out_from: Callable[[int, Tensor], Tensor] | None = None) -> Record:
    """The model's forward from the embedded input `resid` (the sum of `circuits.engine.embed`), keeping the
    per-layer activations named in `record` (a subset of `RECORDABLE`), differentiable when grad is enabled.

    `heads_at`: where the head axis sits among the leading dims of `qkv_heads`, `head_out` and the attention
    computation (default: last, TransformerLens's pattern layout). `queries`: the last layer's heads attend
    from these positions only (nothing else they compute reaches a metric read there); its head outputs are 0
    at the other positions and `final` there lacks them. `qkv_from(layer, resid)`: computes ln1 and the fused
    q/k/v product of a layer in place of the forward's own ([*lead · pos, (head + 2 kv_head) · d_head] from the
    residual stream [*lead, pos, d_model]), for a caller with its own backward of that step (EAP's).
    `attn_out_from(layer, z)`: computes a layer's attention output with b_O ([*lead, nq, d_model]) from z
    ([*lead, nq, head, d_head]) in place of the W_O product, for a caller that forms it from another run's
    (EAP's corrupted run, from the clean run's and each head's difference); not called when `head_out` is kept.
    Example: `forward(w, embed(w, tokens).sum(0), record=("resid_pre", "z")).z[0]`
    """
    unknown = set(record) - set(RECORDABLE)
    if unknown:
        raise ValueError(f"record: unknown activations {sorted(unknown)}; expected some of {RECORDABLE}")
    lead = resid.shape[:-2]
    at = len(lead) if heads_at is None else heads_at
    P, D = resid.shape[-2:]
    acts: dict[str, list] = {name: [] for name in RECORDABLE}
    keep = set(record)
    pos = torch.arange(P, device=resid.device)
    bias = attention_bias(pos, P, resid.dtype, w.causal)
    H, Hkv, E = w.n_heads, w.n_kv_heads, w.W_Q.shape[-1]
    head_axis = at - len(lead) - 3  # from the end of [*outer, head, *inner, pos, d]
    for layer in range(w.n_layers):
        last = layer == w.n_layers - 1
        if "resid_pre" in keep:
            acts["resid_pre"].append(resid)
        if qkv_from is None:
            qkv = torch.addmm(w.b_QKV[layer], w.ln1.at(layer)(resid).reshape(-1, D), w.W_QKV[layer])
        else:
            qkv = qkv_from(layer, resid)
        qkv = qkv.view(*lead, P, H + 2 * Hkv, E)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=-2)  # [*lead, pos, head, d_head] views of the one product
        for name, t in (("q", q), ("k", k), ("v", v)):
            if name in keep:
                acts[name].append(t)
        q, k, v = (t.movedim(-2, head_axis) for t in (q, k, v))  # [*outer, head, *inner, pos, d_head]
        if "qkv_heads" in keep:
            acts["qkv_heads"].append((q, k, v))
        rows = queries.to(resid.device) if queries is not None and last else None
        q_rot, k_rot = rotate(w.rotary, q, pos), rotate(w.rotary, k, pos)
        if "q_rot" in keep:
            acts["q_rot"].append(q_rot.movedim(head_axis, -2))
        if "k_rot" in keep:
            acts["k_rot"].append(k_rot.movedim(head_axis, -2))
        if rows is not None:
            q_rot = q_rot[..., rows, :]
        n = q_rot.shape[-2]
        k_all, v_all = (_expand(w, t, head_axis) for t in (k_rot, v))
        scores = torch.baddbmm(bias if rows is None else bias[rows], q_rot.reshape(-1, n, E),
                               k_all.reshape(-1, P, E).transpose(-1, -2), alpha=1.0 / w.attn_scale)  # -inf: hidden
        # every query sees some key: no row is fully masked. The pattern is kept in its hook layout and the
        # values are read through that tensor, so that gradients reach it
        pattern = scores.softmax(-1).view(*q_rot.shape[:-1], P).movedim(head_axis, -3)  # [*lead, head, nq, pos]
        if "pattern" in keep:
            acts["pattern"].append(pattern)
        z = torch.bmm(pattern.movedim(-3, head_axis).reshape(-1, n, P), v_all.reshape(-1, P, E)).view(*q_rot.shape)
        z_tl = z.movedim(head_axis, -2)  # [*lead, nq, head, d_head]
        if "z" in keep:
            acts["z"].append(z_tl)
        if "head_out" in keep:
            out = per_head(z, w.W_O[layer], at)
            if rows is not None:
                out = out.new_zeros(*out.shape[:-2], P, D).index_copy(-2, rows, out)
            acts["head_out"].append(out)
            attn_out = out.sum(head_axis) + w.b_O[layer]
        else:
            if attn_out_from is None:
                attn_out = torch.addmm(w.b_O[layer], z_tl.reshape(-1, H * E), w.W_O[layer].reshape(H * E, D))
            else:
                attn_out = attn_out_from(layer, z_tl)
            attn_out = attn_out.view(*lead, n, D)
            if rows is not None:
                attn_out = w.b_O[layer].expand(*lead, P, D).index_copy(-2, rows, attn_out)
        mid = resid + attn_out
        for name, t in (("attn_out", attn_out), ("resid_mid", mid)):
            if name in keep:
                acts[name].append(t)
        if w.has_mlp:
            x = resid if w.parallel else mid
            if "mlp_in" in keep:
                x = x.clone()  # a node of its own: its gradient is the MLP's path alone
                acts["mlp_in"].append(x)
            m = mlp(w, layer, x)
            mlp_out = m + w.b_out[layer]
            for name, t in (("mlp", m), ("mlp_out", mlp_out)):
                if name in keep:
                    acts[name].append(t)
            resid = mid + mlp_out
        else:
            if "mlp_out" in keep:
                acts["mlp_out"].append(torch.zeros_like(mid))
            resid = mid
    return Record(acts, resid)


def _expand(w: Weights, t: Tensor, axis: int) -> Tensor:
    """Keys or values repeated for each query head of their group (Hugging Face's repeat_kv order)."""
    return t if w.group_size == 1 else t.repeat_interleave(w.group_size, dim=axis)

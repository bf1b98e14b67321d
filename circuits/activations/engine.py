"""Patched runs of activation patching, resumable from any layer, on the engine's forward (`circuits.engine`).

The weights, the supported architectures, the primitives and the recorded forward (`circuits.engine.run`) are
the engine's; every architecture the engine runs is supported (rotary positions, grouped-query attention,
parallel attention and MLP, bidirectional attention included).

`Run` holds every activation of one unpatched forward (the engine's recorder in TransformerLens's layouts).
`Resume` continues a forward from a stack of K modified states ([K, batch, ...]) and reads out only the
residual stream at the positions the metric reads: under causal attention positions before the earliest change
are taken from the base run (their keys and values included), a change
at one position per component updates that layer's attention by the one-key update of `key_update`,
and the last layer computes queries, attention output and MLP at the read positions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits import engine as core
from circuits.activations.key_update import LeaveOneOut, query_row
from circuits.engine import Weights, attention_bias, expand_kv, mlp_output, project_normed, rotate, unembed
from circuits.engine.run import forward

__all__ = ["FinalRows", "Resume", "Run", "Weights", "add_attn_output", "attention_pattern",
           "attention_values", "attn_output", "ln1", "mlp_output", "project_normed", "run", "run_pair", "unembed",
           "unsupported", "weights_of"]

_KV_BLOCK_BYTES = 2**20  # keys and values projected per block of output: a block and its input fit an L2 cache


def unsupported(model: TransformerBridge) -> list[str]:
    """Why the fast patched runs cannot run `model` (empty when they can): the engine's reasons
    (`circuits.engine.unsupported`), or a model without layers; callers fall back to the bridge's hooks."""
    problems = core.unsupported(model)
    if problems:
        return problems
    return ["a model without layers"] if model.cfg.n_layers == 0 else []


def weights_of(model: TransformerBridge) -> Weights:
    """The engine's weights of a model the patched runs here support; a ValueError naming what is missing
    otherwise (the hooks backend runs it). Example: `w = weights_of(model)`"""
    problems = unsupported(model)
    if problems:
        raise ValueError("model: the weights backend does not support " + "; ".join(problems)
                         + "; use backend='hooks'")
    return Weights.of(model)


def ln1(w: Weights, layer: int, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
    """The attention block's normalisation (identity without one)."""
    return w.ln1.at(layer)(x)


def _batched(t: Tensor, lead: torch.Size) -> Float[Tensor, "n rows cols"]:
    return t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:])


def attention_pattern(w: Weights, q: Float[Tensor, "*lq nq d_head"], k: Float[Tensor, "*lk pos d_head"],
                      q_pos: Int[Tensor, " nq"]) -> Float[Tensor, "*lead nq pos"]:
    """Softmax attention of (rotated) queries at positions `q_pos` over keys 0..pos-1 (one key per query head),
    causal or not as the model is; hidden entries are 0."""
    bias = attention_bias(q_pos.to(q.device), k.shape[-2], q.dtype, w.causal)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    scores = torch.baddbmm(bias, _batched(q, lead), _batched(k, lead).transpose(-1, -2), alpha=1.0 / w.attn_scale)
    return scores.softmax(-1).view(*lead, *bias.shape)  # exp(-inf) = 0: masked entries are 0


def attention_values(w: Weights, q: Float[Tensor, "*lq nq d_head"], k: Float[Tensor, "*lk pos d_head"],
                     v: Float[Tensor, "*lv pos d_head"], q_pos: Int[Tensor, " nq"]
                     ) -> Float[Tensor, "*lead nq d_head"]:
    """z of softmax attention (queries at `q_pos`) without returning the pattern, which is formed
    key-major ([..., key, query]): a softmax along keys with the queries contiguous is vectorised across
    queries (on a CPU 1.7× faster than along rows of a few dozen keys; the products are faster too)."""
    bias = attention_bias(q_pos.to(q.device), k.shape[-2], q.dtype, w.causal).T
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    scores = torch.baddbmm(bias, _batched(k, lead), _batched(q, lead).transpose(-1, -2), alpha=1.0 / w.attn_scale)
    return torch.bmm(scores.softmax(-2).transpose(-1, -2), _batched(v, lead)).view(*lead, len(q_pos), v.shape[-1])


def attn_output(w: Weights, layer: int, z: Float[Tensor, "*lead head d_head"]) -> Float[Tensor, "*lead d_model"]:
    """The attention layer's output Σ_h z_h W_O[h] + b_O, as one matrix product."""
    H, d, m = w.W_O[layer].shape
    out = torch.addmm(w.b_O[layer][None], z.reshape(-1, H * d), w.W_O[layer].reshape(H * d, m))
    return out.view(*z.shape[:-2], m)


def add_attn_output(w: Weights, layer: int, z: Float[Tensor, "*lead head d_head"], onto: Tensor
                    ) -> Float[Tensor, "*lead d_model"]:
    """`onto` (broadcast to z's leading shape) plus the attention layer's output Σ_h z_h W_O[h] + b_O: one pass
    writes `onto + b_O`, the product accumulates onto it."""
    H, d, m = w.W_O[layer].shape
    lead = z.shape[:-2]
    out = torch.add(onto.expand(*lead, m), w.b_O[layer], out=z.new_empty(*lead, m))
    out.view(-1, m).addmm_(z.reshape(-1, H * d), w.W_O[layer].reshape(H * d, m))
    return out


# ---------------------------------------------------------------------------------------------- a full run

_RUN_SITES = ("resid_pre", "q", "k", "v", "q_rot", "k_rot", "pattern", "z", "attn_out", "resid_mid", "mlp_out")


@dataclass(frozen=True, eq=False)
class Run:
    """Every activation of one forward, per layer, in TransformerLens's hook layouts:
    resid_pre/resid_mid/attn_out/mlp_out/resid_post [batch, pos, d_model]; q/k/v (before any rotary
    embedding; k and v per key/value head)/z [batch, pos, head, d_head]; pattern [batch, head, dest, src];
    q_rot/k_rot the rotated queries and keys (q and k themselves without rotary); `final` is the last
    residual stream (before ln_final). With parallel attention and MLP resid_mid is resid_pre + attn_out (the
    model has no such hook) and the MLP reads resid_pre."""

    resid_pre: list[Tensor]
    q: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]
    q_rot: list[Tensor]
    k_rot: list[Tensor]
    pattern: list[Tensor]
    z: list[Tensor]
    attn_out: list[Tensor]
    resid_mid: list[Tensor]
    mlp_out: list[Tensor]
    final: Tensor

    @property
    def resid_post(self) -> list[Tensor]:
        return self.resid_pre[1:] + [self.final]

    def site(self, name: str) -> list[Tensor]:
        """The per-layer activations of a site name.

        Names: resid_pre, resid_mid, resid_post, attn_out, mlp_out, q, k, v, z, pattern, q_rot, k_rot.
        """
        return getattr(self, name)


def run(w: Weights, tokens: Int[Tensor, "batch pos"]) -> Run:
    """One forward pass keeping every activation (differentiable when grad is enabled): the engine's recorder
    (`circuits.engine.run.forward`). Example: `run(weights_of(model), task.clean).z[0]`"""
    rec = forward(w, core.embed(w, tokens).sum(0), record=_RUN_SITES)
    return Run(**{name: rec.acts[name] for name in _RUN_SITES}, final=rec.final)


def run_pair(w: Weights, a: Int[Tensor, "batch pos"], b: Int[Tensor, "batch pos"]) -> tuple[Run, Run]:
    """`run` of two inputs of one shape as one forward of the stacked batch (fewer, larger operations), split
    back into two Runs (views). Example: `clean, corrupted = run_pair(w, task.clean, task.corrupted)`"""
    both = run(w, torch.cat([a, b]))
    n = a.shape[0]
    halves = {f.name: [(t[:n], t[n:]) for t in getattr(both, f.name)] for f in fields(Run) if f.name != "final"}
    first = Run(**{k: [x for x, _ in v] for k, v in halves.items()}, final=both.final[:n])
    second = Run(**{k: [y for _, y in v] for k, v in halves.items()}, final=both.final[n:])
    return first, second


def rotate_rows(w: Weights, x: Float[Tensor, "k *rest head d_head"], p: Int[Tensor, " k"]
                ) -> Float[Tensor, "k *rest head d_head"]:
    """Queries or keys of one position per component (component k at position p[k]), rotary-embedded
    (unchanged without rotary)."""
    if w.rotary is None:
        return x
    return rotate(w.rotary, x.movedim(0, -2), p).movedim(-2, 0)


def kv_of(w: Weights, t: Float[Tensor, "*lead kv_head d_head"]) -> Float[Tensor, "*lead head d_head"]:
    """Keys or values per query head (repeated within each group under grouped-query attention)."""
    return expand_kv(w, t, axis=-2)


# ---------------------------------------------------------------------------------------------- resuming


@dataclass(frozen=True)
class FinalRows:
    """The base run's final residual stream at the read positions (`base` [batch, n, d_model]) with one row
    per component replaced: `rows[k]` at read index `at[k]` (−1: the component changes no read position)."""

    base: Float[Tensor, "batch n d_model"]
    at: Int[Tensor, " k"]
    rows: Float[Tensor, "k batch d_model"]

    def full(self) -> Float[Tensor, "k batch n d_model"]:
        """Every component's whole residual stream at the read positions."""
        hit = (torch.arange(self.base.shape[-2], device=self.at.device)[None, :] == self.at[:, None])
        return torch.where(hit[:, None, :, None], self.rows[:, :, None], self.base)


@dataclass(frozen=True, eq=False)
class Resume:
    """Continues patched forwards from `base` (the unpatched run being patched) to the residual stream at
    `read_pos` (the positions the metric reads), which `readout` turns into one metric per component.

    A change at one position per component uses the one-key update of `key_update` in the layer it enters
    (prepared once per layer and kept). Under causal attention positions before the earliest change are the
    base run's; under bidirectional attention every position is recomputed from the layer a patch enters."""

    w: Weights
    base: Run
    read_pos: Int[Tensor, " n"]
    _loo: dict[int, LeaveOneOut] = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return self.w.n_layers

    def query_positions(self, layer: int) -> Int[Tensor, " nq"]:
        """The positions whose output block `layer` must compute: all, or the read positions in the last."""
        if layer == self.n_layers - 1:
            return self.read_pos
        return torch.arange(self.base.final.shape[-2], device=self.read_pos.device)

    def first_changed(self, p: Int[Tensor, " k"]) -> int:
        """The first position a change at positions `p` can reach: min(p) under causal attention, else 0."""
        return int(p.min()) if self.w.causal else 0

    def leave_one_out(self, layer: int) -> LeaveOneOut:
        """The base run's layer `layer`, ready to have one key replaced (see `key_update`)."""
        if layer not in self._loo:
            base, w = self.base, self.w
            self._loo[layer] = LeaveOneOut.of(base.q_rot[layer], kv_of(w, base.k_rot[layer]),
                                              kv_of(w, base.v[layer]), base.z[layer], base.pattern[layer],
                                              self.query_positions(layer), w.attn_scale, w.causal)
        return self._loo[layer]

    def from_resid(self, layer: int, x: Float[Tensor, "k batch suffix d_model"], start: int = 0
                   ) -> Float[Tensor, "k batch n d_model"]:
        """Run blocks `layer`.. on a stack of residual streams entering block `layer` at positions `start`..
        (earlier positions are the base run's: their keys and values are read from it, not recomputed; `start`
        is 0 under bidirectional attention)."""
        w = self.w
        for i in range(layer, w.n_layers):
            k, v = self._keys_values(i, x, start)
            q_pos = self.query_positions(i)
            q_pos = q_pos[q_pos >= start]
            x_q = x if i < w.n_layers - 1 else x[..., q_pos - start, :]  # the queries' rows in the suffix `x`
            q = rotate(w.rotary, project_normed(w, i, ln1(w, i, x_q), "q").transpose(-2, -3), q_pos)
            z = attention_values(w, q, k, v, q_pos).transpose(-2, -3)
            mid = add_attn_output(w, i, z, x_q)
            x = mid + mlp_output(w, i, x_q if w.parallel else mid) if w.has_mlp else mid
        if layer == w.n_layers:
            x = x[..., self.read_pos - start, :]
        return self._with_base_reads(x, start)

    def _keys_values(self, layer: int, x: Float[Tensor, "k batch suffix d_model"], start: int
                     ) -> tuple[Float[Tensor, "k batch head pos d_head"], Float[Tensor, "k batch head pos d_head"]]:
        """Keys (rotated) and values of every position per query head, head-major: the base run's before
        `start`, projected from `x` from there, in blocks of about `_KV_BLOCK_BYTES` of output (normalised rows
        and projections stay in cache between the norm, the product and the change of layout)."""
        w, base = self.w, self.base
        *lead, s, m = x.shape
        H, d = w.n_kv_heads, w.W_K.shape[-1]
        k, v = (x.new_empty(*lead, H, start + s, d) for _ in range(2))
        for out, name in ((k, "k_rot"), (v, "v")):
            out[..., :start, :] = base.site(name)[layer][:, :start].transpose(1, 2)
        n = x.numel() // (s * m)
        rows, k_rows, v_rows = x.reshape(n, s, m), k.view(n, H, start + s, d), v.view(n, H, start + s, d)
        suffix = torch.arange(start, start + s, device=x.device)
        step = max(1, _KV_BLOCK_BYTES // (4 * s * 2 * H * d))
        for a in range(0, n, step):
            xn = ln1(w, layer, rows[a:a + step])
            kv = torch.addmm(w.b_KV[layer][None], xn.reshape(-1, m), w.W_KV[layer]).view(-1, s, 2, H, d)
            k_rows[a:a + step, :, start:] = rotate(w.rotary, kv[:, :, 0].transpose(1, 2), suffix)
            v_rows[a:a + step, :, start:] = kv[:, :, 1].transpose(1, 2)
        return expand_kv(w, k, axis=-3), expand_kv(w, v, axis=-3)

    def _with_base_reads(self, x: Float[Tensor, "k batch m d_model"], start: int) -> Float[Tensor, "k batch n d_model"]:
        """The read positions from `start` on (`x`, in order) completed by the base run's final stream before."""
        late = self.read_pos >= start
        if bool(late.all()):
            return x
        out = x.new_empty(x.shape[0], x.shape[1], len(self.read_pos), x.shape[-1])
        out[:, :, ~late] = self.base.final[:, self.read_pos[~late]]
        out[:, :, late] = x
        return out

    def from_mid(self, layer: int, mid: Float[Tensor, "k batch q d_model"], start: int = 0,
                 block_in: Float[Tensor, "k batch q d_model"] | None = None) -> Float[Tensor, "k batch n d_model"]:
        """Finish block `layer` from its resid_mid at positions `query_positions(layer)[start:]`. With parallel
        attention and MLP the MLP reads the block's input `block_in` (None: the base run's, unchanged)."""
        w = self.w
        if not w.has_mlp:
            x = mid
        elif not w.parallel:
            x = mid + mlp_output(w, layer, mid)
        elif block_in is None:
            x = mid + self.base.mlp_out[layer][..., self.query_positions(layer)[start:], :]
        else:
            x = mid + mlp_output(w, layer, block_in)
        if layer == self.n_layers - 1:
            return x
        return self.from_resid(layer + 1, x, start)

    def from_mid_all(self, layer: int, mid: Float[Tensor, "k batch pos d_model"]) -> Float[Tensor, "k batch n d_model"]:
        """`from_mid` given resid_mid at every position (sliced to the read positions in the last layer), the
        block's input being the base run's."""
        if layer == self.n_layers - 1:
            mid = mid[..., self.read_pos, :]
        return self.from_mid(layer, mid)

    def from_single(self, layer: int, stage: str, p: Int[Tensor, " k"], row: Float[Tensor, "k batch d_model"]
                    ) -> Float[Tensor, "k batch n d_model"] | FinalRows:
        """Resume when the residual stream differs from the base run at one position per component.

        `stage` "pre": `row` replaces resid_pre[layer] at position p[k]; "mid": it replaces resid_mid[layer]
        (with parallel attention and MLP: the attention's side only, the MLP reads the unchanged block input).
        Only that position's q, k, v (or MLP input) are computed; the rest come from the base run.
        """
        w, base = self.w, self.base
        if stage == "mid":
            if w.has_mlp:
                mlp_out = base.mlp_out[layer][:, p].movedim(1, 0) if w.parallel else mlp_output(w, layer, row)
                row = row + mlp_out
            return self.from_single(layer + 1, "pre", p, row)
        if layer == w.n_layers:
            at = (self.read_pos[None, :] == p[:, None]).int()
            return FinalRows(base.final[..., self.read_pos, :], torch.where(at.any(1), at.argmax(1), -1), row)
        last = layer == w.n_layers - 1
        start = 0 if last else self.first_changed(p)  # positions before every component's p are the base run's
        q_pos = self.query_positions(layer)[start:]
        row_n = ln1(w, layer, row)
        q_row, k_row, v_row = (project_normed(w, layer, row_n, which) for which in "qkv")
        q_row, k_row = rotate_rows(w, q_row, p), kv_of(w, rotate_rows(w, k_row, p))
        v_row = kv_of(w, v_row)
        z = self.leave_one_out(layer).replace_key(p, k_row, v_row, start)
        hit = (q_pos[None, :] == p[:, None]).nonzero()  # (component, query index) where the query is at p
        ks, idx = hit[:, 0], hit[:, 1]
        if len(ks):
            z[ks, :, idx] = query_row(p[ks], q_row[ks], k_row[ks], v_row[ks], kv_of(w, base.k_rot[layer]),
                                      kv_of(w, base.v[layer]), w.attn_scale, w.causal)
        resid = base.resid_pre[layer][..., q_pos, :]
        mid = add_attn_output(w, layer, z, resid)
        delta = row[ks] - base.resid_pre[layer][:, p[ks]].movedim(1, 0)
        mid[ks, :, idx] += delta
        block_in = None
        if w.parallel and w.has_mlp:
            block_in = resid.expand_as(mid).clone()
            block_in[ks, :, idx] += delta
        return self.from_mid(layer, mid, start, block_in)

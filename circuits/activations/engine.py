"""The forward pass of a bridge computed from its weights, in pieces that patched runs can resume from.

`Weights.of(model)` reads the bridge's stacked weights (`W_Q, W_K, W_V, W_O, b_*, W_in, W_out, W_E, W_pos,
W_U, b_U`) and LayerNorm parameters. Two families are supported: native bridges (`boot_native`, as built by
`circuits.models`) and GPT-2 wrapped by `boot_transformers`. Both are pre-LayerNorm transformers with learned
absolute positions, causal softmax attention with scores divided by `attn_scale`, and (optionally) an MLP
`W_out·act(W_in·ln2(x) + b_in) + b_out`; the final LayerNorm is followed by `W_U` and `b_U`. Anything else
raises a ValueError (callers fall back to hooks).

`Weights.of` is cached per model while its parameters are unchanged (`circuits.model_cache`).

`Run` holds every activation of one unpatched forward. `Resume` continues a forward from a stack of K
modified states ([K, batch, ...]) and reads out only the residual stream at the positions the metric reads:
positions before the earliest change are taken from the base run (their keys and values included), a change
at one position per component updates that layer's attention by the one-key update of `key_update`,
and the last layer computes queries, attention output and MLP at the read positions only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.activations.key_update import LeaveOneOut, query_row
from circuits.allocator import settle_allocator
from circuits.causal import causal_bias
from circuits.model_cache import cached_read

_GPT2 = "GPT2LMHeadModel"
_NATIVE = "TransformerLensNative"
_KV_BLOCK_BYTES = 2**20  # keys and values projected per block of output: a block and its input fit an L2 cache


@dataclass(frozen=True, eq=False)
class Weights:
    """A supported bridge's weights, stacked TransformerLens-style (LayerNorm pairs are None without LN,
    MLP weights None for attention-only models). Example: `w = Weights.of(model); w.W_Q.shape`"""

    W_E: Float[Tensor, "vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer head d_model d_head"]
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_Q: Float[Tensor, "layer head d_head"]
    b_K: Float[Tensor, "layer head d_head"]
    b_V: Float[Tensor, "layer head d_head"]
    b_O: Float[Tensor, "layer d_model"]
    W_U: Float[Tensor, "d_model vocab_out"]
    b_U: Float[Tensor, " vocab_out"]
    ln1: list[tuple[Tensor, Tensor]] | None
    ln2: list[tuple[Tensor, Tensor]] | None
    ln_final: tuple[Tensor, Tensor] | None
    W_in: Tensor | None
    b_in: Tensor | None
    W_out: Tensor | None
    b_out: Tensor | None
    act_fn: str | None
    eps: float
    attn_scale: float

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @functools.cached_property
    def W_KV(self) -> Float[Tensor, "layer d_model kv_head_d"]:
        """Keys' and values' weights side by side ([d_model, 2 · head · d_head] per layer), for one product."""
        L, H, m, d = self.W_K.shape
        return torch.cat([self.W_K, self.W_V], 1).permute(0, 2, 1, 3).reshape(L, m, 2 * H * d)

    @functools.cached_property
    def b_KV(self) -> Float[Tensor, "layer kv_head_d"]:
        return torch.cat([self.b_K, self.b_V], 1).flatten(1)

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def has_mlp(self) -> bool:
        return self.W_in is not None

    @classmethod
    def of(cls, model: TransformerBridge) -> Weights:
        """A supported bridge's weights, cached per model while its parameters are unchanged (see
        `circuits.model_cache`); raises ValueError naming what is unsupported."""
        settle_allocator()  # patched runs reuse freed memory instead of faulting it in again
        return cached_read(model, "activations", cls.read)

    @classmethod
    def read(cls, model: TransformerBridge) -> Weights:
        """Read a supported bridge's weights now (detached), bypassing the cache of `of`."""
        problems = unsupported(model)
        if problems:
            raise ValueError("model: the weights engine does not support " + "; ".join(problems))
        cfg = model.cfg
        sd = model.state_dict()
        L = cfg.n_layers
        mlp = not cfg.attn_only

        def d(t: Tensor) -> Tensor:
            return t.detach()

        def ln(name: str) -> list[tuple[Tensor, Tensor]] | None:
            if cfg.normalization_type is None:
                return None
            return [(d(sd[f"blocks.{i}.{name}.weight"]), d(sd[f"blocks.{i}.{name}.bias"])) for i in range(L)]

        with torch.no_grad():
            return cls(
                W_E=d(model.W_E), W_pos=d(model.W_pos), W_Q=d(model.W_Q), W_K=d(model.W_K), W_V=d(model.W_V),
                W_O=d(model.W_O), b_Q=d(model.b_Q), b_K=d(model.b_K), b_V=d(model.b_V), b_O=d(model.b_O),
                W_U=d(model.W_U), b_U=d(model.b_U),
                ln1=ln("ln1"), ln2=ln("ln2") if mlp else None,
                ln_final=None if cfg.normalization_type is None
                else (d(sd["ln_final.weight"]), d(sd["ln_final.bias"])),
                W_in=d(model.W_in) if mlp else None, b_in=d(model.b_in) if mlp else None,
                W_out=d(model.W_out) if mlp else None, b_out=d(model.b_out) if mlp else None,
                act_fn=(cfg.act_fn or "gelu").lower() if mlp else None,
                eps=float(cfg.eps),
                attn_scale=_attn_scale(model),
            )


def unsupported(model: TransformerBridge) -> list[str]:
    """Why the weights engine cannot run `model` (empty when it can)."""
    cfg = model.cfg
    arch = getattr(cfg, "architecture", None)
    if arch not in (_NATIVE, _GPT2):
        return [f"architecture {arch!r} (supported: native bridges and GPT-2)"]
    problems = []
    if cfg.normalization_type not in (None, "LN"):
        problems.append(f"normalization_type={cfg.normalization_type!r}")
    if (getattr(cfg, "positional_embedding_type", "standard") or "standard") != "standard":
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    if cfg.n_key_value_heads not in (None, cfg.n_heads):
        problems.append("grouped-query attention")
    if float(getattr(cfg, "attn_scores_soft_cap", -1.0)) > 0 or float(getattr(cfg, "output_logits_soft_cap", -1.0)) > 0:
        problems.append("soft-capping")
    if getattr(cfg, "gated_mlp", False) or getattr(cfg, "final_rms", False):
        problems.append("gated MLP / final RMS")
    if cfg.attention_dir != "causal":
        problems.append(f"attention_dir={cfg.attention_dir!r}")
    if not cfg.attn_only and (cfg.act_fn or "gelu").lower() not in _ACTS:
        problems.append(f"act_fn={cfg.act_fn!r}")
    if arch == _GPT2:
        hf = model.original_model.config
        if not getattr(hf, "scale_attn_weights", True) or getattr(hf, "scale_attn_by_inverse_layer_idx", False):
            problems.append("GPT-2 attention scaling other than 1/sqrt(d_head)")
    return problems


def _attn_scale(model: TransformerBridge) -> float:
    if model.cfg.architecture == _NATIVE:
        return float(model.original_model.layers[0].attn.scale)
    return float(model.cfg.d_head) ** 0.5


_ACTS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


# ---------------------------------------------------------------------------------------------- pieces


def layer_norm(x: Float[Tensor, "*lead d_model"], params: tuple[Tensor, Tensor] | None, eps: float
               ) -> Float[Tensor, "*lead d_model"]:
    """The model's LayerNorm (identity without one)."""
    if params is None:
        return x
    return F.layer_norm(x, (x.shape[-1],), params[0], params[1], eps)


def ln1(w: Weights, layer: int, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
    """The attention block's LayerNorm (identity without one)."""
    return layer_norm(x, None if w.ln1 is None else w.ln1[layer], w.eps)


def project_normed(w: Weights, layer: int, xn: Float[Tensor, "*lead d_model"], which: str
                   ) -> Float[Tensor, "*lead head d_head"]:
    """q, k or v of every head from the normalised residual stream, as one matrix product."""
    W = {"q": w.W_Q, "k": w.W_K, "v": w.W_V}[which][layer]
    b = {"q": w.b_Q, "k": w.b_K, "v": w.b_V}[which][layer]
    H, m, d = W.shape
    out = torch.addmm(b.reshape(1, H * d), xn.reshape(-1, m), W.transpose(0, 1).reshape(m, H * d))
    return out.view(*xn.shape[:-1], H, d)


def _batched(t: Tensor, lead: torch.Size) -> Float[Tensor, "n rows cols"]:
    return t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:])


def attention_pattern(w: Weights, q: Float[Tensor, "*lead nq d_head"], k: Float[Tensor, "*lead pos d_head"],
                      q_pos: Int[Tensor, " nq"]) -> Float[Tensor, "*lead nq pos"]:
    """Causal softmax attention of queries (at positions `q_pos`) over keys 0..pos-1; masked entries are 0."""
    bias = causal_bias(q_pos.to(q.device), k.shape[-2], q.dtype)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    scores = torch.baddbmm(bias, _batched(q, lead), _batched(k, lead).transpose(-1, -2), alpha=1.0 / w.attn_scale)
    return scores.softmax(-1).view(*lead, *bias.shape)  # exp(-inf) = 0: masked entries are 0


def attention_values(w: Weights, q: Float[Tensor, "*lead nq d_head"], k: Float[Tensor, "*lead pos d_head"],
                     v: Float[Tensor, "*lead pos d_head"], q_pos: Int[Tensor, " nq"]
                     ) -> Float[Tensor, "*lead nq d_head"]:
    """z of causal softmax attention (queries at `q_pos`) without returning the pattern, which is formed
    key-major ([..., key, query]): a softmax along keys with the queries contiguous is vectorised across
    queries (on a CPU 1.7× faster than along rows of a few dozen keys; the products are faster too)."""
    bias = causal_bias(q_pos.to(q.device), k.shape[-2], q.dtype).T
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    scores = torch.baddbmm(bias, _batched(k, lead), _batched(q, lead).transpose(-1, -2), alpha=1.0 / w.attn_scale)
    return torch.bmm(scores.softmax(-2).transpose(-1, -2), _batched(v, lead)).view(*lead, len(q_pos), v.shape[-1])


def attend(w: Weights, q: Float[Tensor, "*lead nq head d_head"], k: Float[Tensor, "*lead pos head d_head"],
           v: Float[Tensor, "*lead pos head d_head"], q_pos: Int[Tensor, " nq"]
           ) -> tuple[Float[Tensor, "*lead nq head d_head"], Float[Tensor, "*lead head nq pos"]]:
    """z and the pattern ([..., head, dest, src], the hook_pattern layout) for every head."""
    pattern = attention_pattern(w, q.transpose(-2, -3), k.transpose(-2, -3), q_pos)
    z = (pattern @ v.transpose(-2, -3)).transpose(-2, -3)
    return z, pattern


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


def mlp_output(w: Weights, layer: int, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
    """The MLP's output `act(ln2(x) W_in + b_in) W_out + b_out` (zero for attention-only models)."""
    if w.W_in is None:
        return torch.zeros_like(x)
    xn = layer_norm(x, None if w.ln2 is None else w.ln2[layer], w.eps)
    return _ACTS[w.act_fn](xn @ w.W_in[layer] + w.b_in[layer]) @ w.W_out[layer] + w.b_out[layer]


# ---------------------------------------------------------------------------------------------- a full run


@dataclass(frozen=True, eq=False)
class Run:
    """Every activation of one forward, per layer, in TransformerLens's hook layouts:
    resid_pre/resid_mid/attn_out/resid_post [batch, pos, d_model]; q/k/v/z [batch, pos, head, d_head];
    pattern [batch, head, dest, src]; `final` is the last residual stream (before ln_final)."""

    resid_pre: list[Tensor]
    q: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]
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

        Names: resid_pre, resid_mid, resid_post, attn_out, q, k, v, z, pattern.
        """
        return getattr(self, name)


def run(w: Weights, tokens: Int[Tensor, "batch pos"]) -> Run:
    """One forward pass keeping every activation (differentiable when grad is enabled)."""
    P = tokens.shape[1]
    x = w.W_E[tokens.to(w.W_E.device)] + w.W_pos[:P]
    pos = torch.arange(P, device=x.device)
    acts: dict[str, list[Tensor]] = {k: [] for k in ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out",
                                                     "resid_mid", "mlp_out")}
    for layer in range(w.n_layers):
        xn = ln1(w, layer, x)
        q, k, v = (project_normed(w, layer, xn, which) for which in "qkv")
        z, pattern = attend(w, q, k, v, pos)
        attn_out = attn_output(w, layer, z)
        mid = x + attn_out
        mlp_out = mlp_output(w, layer, mid)
        for name, t in zip(acts, (x, q, k, v, pattern, z, attn_out, mid, mlp_out)):
            acts[name].append(t)
        x = mid + mlp_out if w.has_mlp else mid
    return Run(**acts, final=x)


def run_pair(w: Weights, a: Int[Tensor, "batch pos"], b: Int[Tensor, "batch pos"]) -> tuple[Run, Run]:
    """`run` of two inputs of one shape as one forward of the stacked batch (fewer, larger operations), split
    back into two Runs (views). Example: `clean, corrupted = run_pair(w, task.clean, task.corrupted)`"""
    both = run(w, torch.cat([a, b]))
    n = a.shape[0]
    halves = {f.name: [(t[:n], t[n:]) for t in getattr(both, f.name)] for f in fields(Run) if f.name != "final"}
    first = Run(**{k: [x for x, _ in v] for k, v in halves.items()}, final=both.final[:n])
    second = Run(**{k: [y for _, y in v] for k, v in halves.items()}, final=both.final[n:])
    return first, second


def unembed(w: Weights, resid: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead vocab_out"]:
    """ln_final then the unembedding."""
    return layer_norm(resid, w.ln_final, w.eps) @ w.W_U + w.b_U


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
    (prepared once per layer and kept)."""

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

    def leave_one_out(self, layer: int) -> LeaveOneOut:
        """The base run's layer `layer`, ready to have one key replaced (see `key_update`)."""
        if layer not in self._loo:
            base = self.base
            self._loo[layer] = LeaveOneOut.of(base.q[layer], base.k[layer], base.v[layer], base.z[layer],
                                              base.pattern[layer], self.query_positions(layer), self.w.attn_scale)
        return self._loo[layer]

    def from_resid(self, layer: int, x: Float[Tensor, "k batch suffix d_model"], start: int = 0
                   ) -> Float[Tensor, "k batch n d_model"]:
        """Run blocks `layer`.. on a stack of residual streams entering block `layer` at positions `start`..
        (earlier positions are the base run's: their keys and values are read from it, not recomputed)."""
        w = self.w
        for i in range(layer, w.n_layers):
            k, v = self._keys_values(i, x, start)
            q_pos = self.query_positions(i)
            q_pos = q_pos[q_pos >= start]
            x_q = x if i < w.n_layers - 1 else x[..., q_pos - start, :]  # the queries' rows in the suffix `x`
            q = project_normed(w, i, ln1(w, i, x_q), "q")
            z = attention_values(w, q.transpose(-2, -3), k, v, q_pos).transpose(-2, -3)
            mid = add_attn_output(w, i, z, x_q)
            x = mid + mlp_output(w, i, mid) if w.has_mlp else mid
        if layer == w.n_layers:
            x = x[..., self.read_pos - start, :]
        return self._with_base_reads(x, start)

    def _keys_values(self, layer: int, x: Float[Tensor, "k batch suffix d_model"], start: int
                     ) -> tuple[Float[Tensor, "k batch head pos d_head"], Float[Tensor, "k batch head pos d_head"]]:
        """Keys and values of every position, head-major: the base run's before `start`, projected from `x`
        from there, in blocks of about `_KV_BLOCK_BYTES` of output (normalised rows and projections stay in
        cache between the LayerNorm, the product and the change of layout)."""
        w, base = self.w, self.base
        *lead, s, m = x.shape
        H, d = w.n_heads, w.W_K.shape[-1]
        k, v = (x.new_empty(*lead, H, start + s, d) for _ in range(2))
        for out, name in ((k, "k"), (v, "v")):
            out[..., :start, :] = base.site(name)[layer][:, :start].transpose(1, 2)
        n = x.numel() // (s * m)
        rows, k_rows, v_rows = x.reshape(n, s, m), k.view(n, H, start + s, d), v.view(n, H, start + s, d)
        step = max(1, _KV_BLOCK_BYTES // (4 * s * 2 * H * d))
        for a in range(0, n, step):
            xn = ln1(w, layer, rows[a:a + step])
            kv = torch.addmm(w.b_KV[layer][None], xn.reshape(-1, m), w.W_KV[layer]).view(-1, s, 2, H, d)
            k_rows[a:a + step, :, start:] = kv[:, :, 0].transpose(1, 2)
            v_rows[a:a + step, :, start:] = kv[:, :, 1].transpose(1, 2)
        return k, v

    def _with_base_reads(self, x: Float[Tensor, "k batch m d_model"], start: int) -> Float[Tensor, "k batch n d_model"]:
        """The read positions from `start` on (`x`, in order) completed by the base run's final stream before."""
        late = self.read_pos >= start
        if bool(late.all()):
            return x
        out = x.new_empty(x.shape[0], x.shape[1], len(self.read_pos), x.shape[-1])
        out[:, :, ~late] = self.base.final[:, self.read_pos[~late]]
        out[:, :, late] = x
        return out

    def from_mid(self, layer: int, mid: Float[Tensor, "k batch q d_model"], start: int = 0
                 ) -> Float[Tensor, "k batch n d_model"]:
        """Finish block `layer` from its resid_mid (positions `start`..; the read positions in the last layer)."""
        x = mid + mlp_output(self.w, layer, mid) if self.w.has_mlp else mid
        if layer == self.n_layers - 1:
            return x
        return self.from_resid(layer + 1, x, start)

    def from_mid_all(self, layer: int, mid: Float[Tensor, "k batch pos d_model"]) -> Float[Tensor, "k batch n d_model"]:
        """`from_mid` given resid_mid at every position (sliced to the read positions in the last layer)."""
        if layer == self.n_layers - 1:
            mid = mid[..., self.read_pos, :]
        return self.from_mid(layer, mid)

    def from_single(self, layer: int, stage: str, p: Int[Tensor, " k"], row: Float[Tensor, "k batch d_model"]
                    ) -> Float[Tensor, "k batch n d_model"] | FinalRows:
        """Resume when the residual stream differs from the base run at one position per component.

        `stage` "pre": `row` replaces resid_pre[layer] at position p[k]; "mid": it replaces resid_mid[layer].
        Only that position's q, k, v (or MLP input) are computed; the rest come from the base run.
        """
        w, base = self.w, self.base
        if stage == "mid":
            if w.has_mlp:
                row = row + mlp_output(w, layer, row)
            return self.from_single(layer + 1, "pre", p, row)
        if layer == w.n_layers:
            at = (self.read_pos[None, :] == p[:, None]).int()
            return FinalRows(base.final[..., self.read_pos, :], torch.where(at.any(1), at.argmax(1), -1), row)
        last = layer == w.n_layers - 1
        start = 0 if last else int(p.min())  # positions before every component's p are the base run's
        q_pos = self.query_positions(layer)[start:]
        row_n = ln1(w, layer, row)
        q_row, k_row, v_row = (project_normed(w, layer, row_n, which) for which in "qkv")
        z = self.leave_one_out(layer).replace_key(p, k_row, v_row, start)
        hit = (q_pos[None, :] == p[:, None]).nonzero()  # (component, query index) where the query is at p
        ks, idx = hit[:, 0], hit[:, 1]
        if len(ks):
            z[ks, :, idx] = query_row(p[ks], q_row[ks], k_row[ks], v_row[ks], base.k[layer], base.v[layer],
                                      w.attn_scale)
        mid = add_attn_output(w, layer, z, base.resid_pre[layer][..., q_pos, :])
        mid[ks, :, idx] += row[ks] - base.resid_pre[layer][:, p[ks]].movedim(1, 0)
        return self.from_mid(layer, mid, start)

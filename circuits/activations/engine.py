"""The forward pass of a bridge computed from its weights, in pieces that patched runs can resume from.

`Weights.of(model)` reads the bridge's stacked weights (`W_Q, W_K, W_V, W_O, b_*, W_in, W_out, W_E, W_pos,
W_U, b_U`) and LayerNorm parameters. Two families are supported: native bridges (`boot_native`, as built by
`circuits.models`) and GPT-2 wrapped by `boot_transformers`. Both are pre-LayerNorm transformers with learned
absolute positions, causal softmax attention with scores divided by `attn_scale`, and (optionally) an MLP
`W_out·act(W_in·ln2(x) + b_in) + b_out`; the final LayerNorm is followed by `W_U` and `b_U`. Anything else
raises a ValueError (callers fall back to hooks).

`Run` holds every activation of one unpatched forward. The `resume_*` functions continue a forward from a
stack of K modified states ([K, batch, ...]) and read out only the residual stream at the positions the metric
reads; the last layer computes queries, attention output and MLP at those positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

_GPT2 = "GPT2LMHeadModel"
_NATIVE = "TransformerLensNative"


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

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def has_mlp(self) -> bool:
        return self.W_in is not None

    @classmethod
    def of(cls, model: TransformerBridge) -> Weights:
        """Read a supported bridge's weights (detached); raises ValueError naming what is unsupported."""
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


def project(w: Weights, layer: int, x: Float[Tensor, "*lead d_model"], which: str
            ) -> Float[Tensor, "*lead head d_head"]:
    """q, k or v (`which`) of every head from the residual stream `x` (ln1 applied here)."""
    W = {"q": w.W_Q, "k": w.W_K, "v": w.W_V}[which][layer]
    b = {"q": w.b_Q, "k": w.b_K, "v": w.b_V}[which][layer]
    xn = layer_norm(x, None if w.ln1 is None else w.ln1[layer], w.eps)
    return torch.einsum("...m,hmd->...hd", xn, W) + b


def attention_pattern(w: Weights, q: Float[Tensor, "*lead nq d_head"], k: Float[Tensor, "*lead pos d_head"],
                      q_pos: Int[Tensor, " nq"]) -> Float[Tensor, "*lead nq pos"]:
    """Causal softmax attention of queries (at positions `q_pos`) over keys 0..pos-1; masked entries are 0."""
    scores = q @ k.transpose(-1, -2) / w.attn_scale
    masked = torch.arange(k.shape[-2], device=q.device)[None, :] > q_pos.to(q.device)[:, None]
    return scores.masked_fill(masked, float("-inf")).softmax(-1).masked_fill(masked, 0.0)


def attend(w: Weights, q: Float[Tensor, "*lead nq head d_head"], k: Float[Tensor, "*lead pos head d_head"],
           v: Float[Tensor, "*lead pos head d_head"], q_pos: Int[Tensor, " nq"]
           ) -> tuple[Float[Tensor, "*lead nq head d_head"], Float[Tensor, "*lead head nq pos"]]:
    """z and the pattern ([..., head, dest, src], the hook_pattern layout) for every head."""
    pattern = attention_pattern(w, q.transpose(-2, -3), k.transpose(-2, -3), q_pos)
    z = (pattern @ v.transpose(-2, -3)).transpose(-2, -3)
    return z, pattern


def attn_output(w: Weights, layer: int, z: Float[Tensor, "*lead head d_head"]) -> Float[Tensor, "*lead d_model"]:
    """The attention layer's output Σ_h z_h W_O[h] + b_O."""
    return torch.einsum("...hd,hdm->...m", z, w.W_O[layer]) + w.b_O[layer]


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
        q, k, v = (project(w, layer, x, which) for which in "qkv")
        z, pattern = attend(w, q, k, v, pos)
        attn_out = attn_output(w, layer, z)
        mid = x + attn_out
        mlp_out = mlp_output(w, layer, mid)
        for name, t in zip(acts, (x, q, k, v, pattern, z, attn_out, mid, mlp_out)):
            acts[name].append(t)
        x = mid + mlp_out if w.has_mlp else mid
    return Run(**acts, final=x)


def unembed(w: Weights, resid: Float[Tensor, "*lead d_model"], columns: Int[Tensor, " v"] | None = None
            ) -> Float[Tensor, "*lead v"]:
    """ln_final then the unembedding, restricted to some vocabulary columns when `columns` is given."""
    xn = layer_norm(resid, w.ln_final, w.eps)
    if columns is None:
        return xn @ w.W_U + w.b_U
    return xn @ w.W_U[:, columns] + w.b_U[columns]


# ---------------------------------------------------------------------------------------------- resuming


@dataclass(frozen=True, eq=False)
class Resume:
    """Continues patched forwards from `base` (the unpatched run being patched) to the residual stream at
    `read_pos` (the positions the metric reads), which `readout` turns into one metric per component."""

    w: Weights
    base: Run
    read_pos: Int[Tensor, " n"]

    @property
    def n_layers(self) -> int:
        return self.w.n_layers

    def from_resid(self, layer: int, x: Float[Tensor, "k batch pos d_model"]) -> Float[Tensor, "k batch n d_model"]:
        """Run blocks `layer`.. on a stack of residual streams entering block `layer`."""
        w = self.w
        pos = torch.arange(x.shape[-2], device=x.device)
        for i in range(layer, w.n_layers):
            last = i == w.n_layers - 1
            q_pos = self.read_pos if last else pos
            x_q = x[..., q_pos, :] if last else x
            k, v = project(w, i, x, "k"), project(w, i, x, "v")
            z, _ = attend(w, project(w, i, x_q, "q"), k, v, q_pos)
            mid = x_q + attn_output(w, i, z)
            x = mid + mlp_output(w, i, mid) if w.has_mlp else mid
        return x if layer < w.n_layers else x[..., self.read_pos, :]

    def from_mid(self, layer: int, mid: Float[Tensor, "k batch q d_model"]) -> Float[Tensor, "k batch n d_model"]:
        """Finish block `layer` from its resid_mid (all positions; or the read positions in the last layer)."""
        x = mid + mlp_output(self.w, layer, mid) if self.w.has_mlp else mid
        if layer == self.n_layers - 1:
            return x
        return self.from_resid(layer + 1, x)

    def from_mid_all(self, layer: int, mid: Float[Tensor, "k batch pos d_model"]) -> Float[Tensor, "k batch n d_model"]:
        """`from_mid` given resid_mid at every position (sliced to the read positions in the last layer)."""
        if layer == self.n_layers - 1:
            mid = mid[..., self.read_pos, :]
        return self.from_mid(layer, mid)

    def from_single(self, layer: int, stage: str, p: Int[Tensor, " k"], row: Float[Tensor, "k batch d_model"]
                    ) -> Float[Tensor, "k batch n d_model"]:
        """Resume when the residual stream differs from the base run at one position per component.

        `stage` "pre": `row` replaces resid_pre[layer] at position p[k]; "mid": it replaces resid_mid[layer].
        Only that position's q, k, v (or MLP input) are recomputed; the rest come from the base run.
        """
        w, base = self.w, self.base
        if stage == "mid":
            if w.has_mlp:
                row = row + mlp_output(w, layer, row)
            return self.from_single(layer + 1, "pre", p, row)
        if layer == w.n_layers:
            final = base.final[..., self.read_pos, :]
            hit = (self.read_pos[None, :] == p[:, None])[:, None, :, None]
            return torch.where(hit, row[:, :, None, :], final)
        last = layer == w.n_layers - 1
        P = base.resid_pre[layer].shape[-2]
        q_pos = self.read_pos if last else torch.arange(P, device=row.device)
        at_p = (torch.arange(P, device=row.device)[None, :] == p[:, None])[:, None, :, None, None]  # k 1 pos 1 1
        q_at_p = at_p[:, :, q_pos]
        q = torch.where(q_at_p, project(w, layer, row, "q")[:, :, None], base.q[layer][..., q_pos, :, :])
        k = torch.where(at_p, project(w, layer, row, "k")[:, :, None], base.k[layer])
        v = torch.where(at_p, project(w, layer, row, "v")[:, :, None], base.v[layer])
        z, _ = attend(w, q, k, v, q_pos)
        x = torch.where(q_at_p[..., 0], row[:, :, None], base.resid_pre[layer][..., q_pos, :])
        return self.from_mid(layer, x + attn_output(w, layer, z))

"""Direct logit attribution: each component's direct contribution to a logit (difference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.engine import Weights, final_norm
from circuits.engine.weights import unsupported
from circuits.results import LabelledResult, head_labels, head_name, layer_labels
from circuits.validate import check_ids, check_tokens


@dataclass(frozen=True, eq=False)
class DLAResult(LabelledResult):
    """Direct contributions to the mean logit (difference) at the chosen positions.

    `values` per head [layer, head], per block [layer] or per component [component] (embed, pos_embed, each
    head, each layer's b_O, each MLP). `remainder` is the direct contribution of everything `values` leaves
    out (embeddings, b_O and MLPs when by="head"), `bias` the constant terms (ln_final's bias and b_U through
    the unembedding), `total` the model's actual mean logit (difference): values.sum() + remainder + bias = total.
    """

    remainder: float = 0.0
    bias: float = 0.0
    total: float = 0.0


def direct_logit_attribution(
    model: TransformerBridge,
    tokens: Int[Tensor, "batch pos"],
    answers: Int[Tensor, "batch ..."],
    wrong_answers: Int[Tensor, "batch ..."] | None = None,
    *,
    by: Literal["head", "layer", "component"] = "head",
    positions: int | list[int] | Int[Tensor, " n"] = -1,
) -> DLAResult:
    """Each component's direct effect on logit[answer] (− logit[wrong answer]) at `positions`, mean over batch.

    The final residual stream is split into embed + pos_embed + Σ heads (z W_O) + Σ b_O + Σ MLP outputs; each
    piece is centred (for LayerNorm), divided by ln_final's cached scale from this forward (hook_scale, so
    the pieces add up exactly), multiplied by ln_final's weight and read by W_U's answer columns. No folding
    is needed or assumed. `answers` is [batch] for one position or [batch, n] for n positions.
    Example: `direct_logit_attribution(model, tokens, answers, wrong, by="head").top(3)`
    """
    check_tokens(model, tokens, "tokens")
    check_ids(answers, model.cfg.d_vocab, "answers")
    if wrong_answers is not None:
        check_ids(wrong_answers, model.cfg.d_vocab, "wrong_answers")
    if by not in ("head", "layer", "component"):
        raise ValueError(f"by: expected 'head', 'layer' or 'component', got {by!r}")
    if model.cfg.n_layers == 0 and by != "component":
        raise ValueError(f"by: a 0-layer model has no heads or layers, got by={by!r}; use by='component' "
                         "(its direct path: embed and pos_embed)")
    batch, n_pos = tokens.shape
    pos = _positions(positions, n_pos)
    answers = _per_position(answers, batch, len(pos), "answers")
    wrong = None if wrong_answers is None else _per_position(wrong_answers, batch, len(pos), "wrong_answers")
    norm = final_norm(model)
    w = _weights(model)
    parts, names, logits, scale = _decomposed_residual(model, w, tokens, pos)
    direction = _unembed_direction(w, answers, wrong)  # [batch, n, d_model]
    contrib = torch.einsum("cbnm,bnm->c", norm.linear_part(parts) / scale, direction) / (batch * len(pos))
    bias = float(torch.einsum("m,bnm->", norm.offset() + torch.zeros_like(direction[0, 0]), direction)
                 / (batch * len(pos)) + _bias_u(w, answers, wrong))
    total = float(_gather(logits, answers, wrong))
    values, dims, labels = _group(contrib, names, by, model.cfg.n_layers, model.cfg.n_heads)
    remainder = float(contrib.sum() - values.sum())
    return DLAResult(values=values.detach().cpu(), dims=dims, labels=labels, method="direct_logit_attribution",
                     info={"by": by, "positions": pos.tolist(), "difference": wrong is not None},
                     remainder=remainder, bias=bias, total=total)


def _positions(positions: int | list[int] | Tensor, n_pos: int) -> Tensor:
    raw = [positions] if isinstance(positions, int) else (
        positions.tolist() if isinstance(positions, Tensor) else list(positions))
    bad = [p for p in raw if not -n_pos <= int(p) < n_pos]
    if bad or not raw:
        raise ValueError(f"positions: must lie in [-{n_pos}, {n_pos}) for {n_pos}-token inputs; got {raw}")
    return torch.tensor([int(p) % n_pos for p in raw])


def _per_position(t: Tensor, batch: int, n: int, name: str) -> Tensor:
    t = t[:, None] if t.ndim == 1 else t
    if tuple(t.shape) != (batch, n):
        raise ValueError(f"{name}: expected [batch] or [batch, n] = ({batch}, {n}) ids, got {tuple(t.shape)}")
    return t


def _decomposed_residual(model: TransformerBridge, w: _OutputWeights, tokens: Tensor, pos: Tensor):
    """The final residual stream at `pos` split into direct components [component, batch, n, d_model], their
    names, the logits at `pos`, and ln_final's cached scale [batch, n, 1]."""
    L = model.cfg.n_layers
    names = {"hook_embed", "hook_pos_embed", "ln_final.hook_in", "ln_final.hook_scale"}
    names |= {f"blocks.{i}.attn.hook_z" for i in range(L)} | {f"blocks.{i}.hook_mlp_out" for i in range(L)}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    at = (lambda x: x[:, pos.to(x.device)])
    labels = [label for label in ("embed", "pos_embed") if f"hook_{label}" in cache]  # no pos_embed under rotary
    parts = [at(cache[f"hook_{label}"]) for label in labels]
    for i in range(L):
        z = at(cache[f"blocks.{i}.attn.hook_z"])
        parts.extend(torch.einsum("bnhd,hdm->hbnm", z, w.W_O[i]).unbind(0))
        labels.extend(head_name(i, h) for h in range(model.cfg.n_heads))
        parts.append(w.b_O[i].expand_as(parts[0]))
        labels.append(f"L{i} b_O")
        if not model.cfg.attn_only:
            parts.append(at(cache[f"blocks.{i}.hook_mlp_out"]))
            labels.append(f"L{i} mlp")
    scale = at(cache["ln_final.hook_scale"]) if "ln_final.hook_scale" in cache else torch.ones_like(parts[0][..., :1])
    stacked = torch.stack(parts)
    final = at(cache["ln_final.hook_in"])
    if not torch.allclose(stacked.sum(0), final, atol=1e-4, rtol=1e-4):
        raise ValueError("model: its final residual stream is not embed + pos_embed + heads + b_O + MLPs; "
                         "direct logit attribution needs that decomposition")
    return stacked, labels, logits[:, pos.to(logits.device)], scale


def _weights(model: TransformerBridge) -> _OutputWeights:
    """W_O, b_O, W_U and b_U as the model applies them: the engine's reader where it supports the model (zero
    biases for bias-free checkpoints, the LLaMA family's), else the bridge's stacked properties."""
    if not unsupported(model):
        w = Weights.of(model)
        return _OutputWeights(w.W_O, w.b_O, w.W_U, w.b_U)
    return _OutputWeights(*(getattr(model, name).detach() for name in ("W_O", "b_O", "W_U", "b_U")))


@dataclass(frozen=True)
class _OutputWeights:
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_O: Float[Tensor, "layer d_model"]
    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, " vocab"]


def _unembed_direction(w: _OutputWeights, answers: Tensor, wrong: Tensor | None
                       ) -> Float[Tensor, "batch n d_model"]:
    W_U = w.W_U
    d = W_U.T[answers.to(W_U.device)]
    return d if wrong is None else d - W_U.T[wrong.to(W_U.device)]


def _bias_u(w: _OutputWeights, answers: Tensor, wrong: Tensor | None) -> Tensor:
    b = w.b_U
    out = b[answers.to(b.device)]
    return (out if wrong is None else out - b[wrong.to(b.device)]).mean()


def _gather(logits: Tensor, answers: Tensor, wrong: Tensor | None) -> Tensor:
    a = torch.gather(logits, -1, answers.to(logits.device)[..., None])
    if wrong is not None:
        a = a - torch.gather(logits, -1, wrong.to(logits.device)[..., None])
    return a.mean()


def _group(contrib: Tensor, names: list[str], by: str, n_layers: int, n_heads: int):
    if by == "component":
        return contrib, ("component",), (tuple(names),)
    index = {n: i for i, n in enumerate(names)}
    heads = torch.stack([contrib[index[head_name(layer, h)]] for layer in range(n_layers) for h in range(n_heads)])
    heads = heads.view(n_layers, n_heads)
    if by == "head":
        return heads, ("layer", "head"), (layer_labels(n_layers), head_labels(n_heads))
    per_layer = heads.sum(-1) + torch.stack([
        contrib[index[f"L{i} b_O"]] + (contrib[index[f"L{i} mlp"]] if f"L{i} mlp" in index else 0.0)
        for i in range(n_layers)])
    return per_layer, ("layer",), (layer_labels(n_layers),)

"""A 2-layer attention-only model with hand-set weights: a previous-token head and an induction head.

The residual stream (no LayerNorm) is split into four one-hot subspaces of `d_model = 3·d_vocab + n_ctx`:

    TOK  [0, V)            the current token          (written by W_E)
    POS  [V, V+N)          the position               (written by W_pos)
    PREV [V+N, 2V+N)       the previous token          (written by the previous-token head)
    OUT  [2V+N, 3V+N)      the predicted next token    (written by the induction head, read by W_U)

Previous-token head (layer 0): QK matches query position i with key position i−1 through POS alone;
OV copies TOK into PREV. Induction head (layer 1): QK matches the query's TOK with the key's PREV
(K-composition with the previous-token head); OV copies the key's TOK into OUT, which W_U reads out.
Every other head has small random weights (so every score is defined) and contributes next to nothing.
On [BOS, x, x] with distinct x, position T+k attends to k+1 and predicts x_{k+1}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.models.build import ModelSpec, build


@dataclass(frozen=True)
class PlantedHeads:
    """Which heads of a planted model do what; `(layer, head)` pairs."""

    previous_token: tuple[int, int]
    induction: tuple[int, int]
    inert: tuple[tuple[int, int], ...]


def planted_induction(
    d_vocab: int = 32,
    n_ctx: int = 32,
    n_heads: int = 3,
    *,
    previous_token_head: int = 2,
    induction_head: int = 1,
    sharpness: float = 16.0,
    logit_scale: float = 12.0,
    inert_std: float = 0.02,
    seed: int = 0,
) -> TransformerBridge:
    """Build the planted induction model; `model.planted` is its `PlantedHeads`.

    `sharpness` is the attention score (after the 1/√d_head scale) of a matching key, `logit_scale` the
    logit of the copied token. Token 0 is BOS: induction data should start with it and not reuse it.
    Example: `model = planted_induction(); model.planted.induction == (1, 1)`
    """
    for name, head in (("previous_token_head", previous_token_head), ("induction_head", induction_head)):
        if not 0 <= head < n_heads:
            raise ValueError(f"{name} must lie in [0, {n_heads}); got {head}")
    V, N = d_vocab, n_ctx
    d_head = max(V, N)
    spec = ModelSpec(2, 3 * V + N, n_heads, d_head, V, N, layernorm=False)
    model = build(spec, seed=seed)
    weights = _planted_weights(spec, previous_token_head, induction_head, sharpness, logit_scale, inert_std, seed)
    model.load_state_dict(_to_state_dict(weights, spec), strict=True)
    inert = tuple(
        (layer, h) for layer in range(2) for h in range(n_heads)
        if (layer, h) not in ((0, previous_token_head), (1, induction_head))
    )
    model.planted = PlantedHeads((0, previous_token_head), (1, induction_head), inert)
    return model


def _planted_weights(
    spec: ModelSpec, prev: int, ind: int, sharpness: float, logit_scale: float, inert_std: float, seed: int
) -> dict[str, Tensor]:
    V, N, H, dh, dm = spec.d_vocab, spec.n_ctx, spec.n_heads, spec.d_head, spec.d_model
    tok, pos, prv, out = 0, V, V + N, 2 * V + N
    gen = torch.Generator().manual_seed(seed)

    def inert(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen) * inert_std

    W_Q, W_K, W_V = (inert(2, H, dm, dh) for _ in range(3))
    W_O = inert(2, H, dh, dm)
    s = math.sqrt(sharpness * math.sqrt(dh))  # q·k/√d_head = sharpness for a match
    eye_v, eye_n = torch.eye(V), torch.eye(N)
    for w in (W_Q, W_K, W_V, W_O):
        w[0, prev].zero_()
        w[1, ind].zero_()
    # previous-token head: query position i ↔ key position i−1; copies TOK into PREV
    W_Q[0, prev, pos : pos + N, :N] = s * eye_n
    W_K[0, prev, pos : pos + N - 1, 1:N] = s * eye_n[: N - 1, : N - 1]
    W_V[0, prev, tok : tok + V, :V] = eye_v
    W_O[0, prev, :V, prv : prv + V] = eye_v
    # induction head: query TOK ↔ key PREV; copies the key's TOK into OUT
    W_Q[1, ind, tok : tok + V, :V] = s * eye_v
    W_K[1, ind, prv : prv + V, :V] = s * eye_v
    W_V[1, ind, tok : tok + V, :V] = eye_v
    W_O[1, ind, :V, out : out + V] = eye_v
    W_E = torch.zeros(V, dm)
    W_E[:, tok : tok + V] = eye_v
    W_pos = torch.zeros(N, dm)
    W_pos[:, pos : pos + N] = eye_n
    W_U = torch.zeros(dm, V)
    W_U[out : out + V, :] = logit_scale * eye_v
    return {"W_Q": W_Q, "W_K": W_K, "W_V": W_V, "W_O": W_O, "W_E": W_E, "W_pos": W_pos, "W_U": W_U}


def _to_state_dict(w: dict[str, Float[Tensor, "..."]], spec: ModelSpec) -> dict[str, Tensor]:
    """Stacked TransformerLens-layout weights → the native bridge's nn.Linear state dict (biases zero)."""
    dm, H, dh = spec.d_model, spec.n_heads, spec.d_head
    sd = {
        "embed.weight": w["W_E"],
        "pos_embed.weight": w["W_pos"],
        "unembed.weight": w["W_U"].T.contiguous(),
        "unembed.bias": torch.zeros(spec.d_vocab),
    }
    for layer in range(spec.n_layers):
        for name in ("Q", "K", "V"):
            sd[f"blocks.{layer}.attn.{name.lower()}.weight"] = einops.rearrange(
                w[f"W_{name}"][layer], "h m d -> (h d) m"
            )
            sd[f"blocks.{layer}.attn.{name.lower()}.bias"] = torch.zeros(H * dh)
        sd[f"blocks.{layer}.attn.o.weight"] = einops.rearrange(w["W_O"][layer], "h d m -> m (h d)")
        sd[f"blocks.{layer}.attn.o.bias"] = torch.zeros(dm)
    return sd

"""Q-, K- and V-composition scores of every pair of heads, computed through small per-head factors, with a baseline.

Score (A Mathematical Framework for Transformer Circuits): ‖W_A·W_B‖_F / (‖W_A‖_F ‖W_B‖_F), W_A = W_V·W_O of the
earlier head a, and W_B = W_Q·W_Kᵀ (Q), W_K·W_Qᵀ (K) or W_V·W_O (V) of the later head b, exactly as
transformer_lens's `TransformerBridge.all_composition_scores` defines them.

How it is computed: every matrix is a product X·Y of a [d_model, d_head] and a [d_head, d_model] factor.
Because ‖W·M‖_F = ‖R·M‖_F whenever RᵀR = WᵀW, the triangular square roots R of the outer factors' small
d_head × d_head Gram matrices (W_V of the earlier head, Yᵀ of the later one; Cholesky, or a thin QR when
singular) reduce the norms to those of R·W_O [k, d_model] and X·R'ᵀ [d_model, k], k = min(d_head, d_model).
All pairs then come from one [earlier heads·k, d_model] × [d_model, heads·k] product per later layer, whose
k×k blocks are summed in squares, or, when d_model is large against k (GPT-2 small), from ‖Ã·B̃‖² = ⟨ÃᵀÃ, B̃B̃ᵀ⟩
with one d_model × d_model Gram matrix per head, of which only the blocks on and above the diagonal are formed.
No d_model × d_model product is formed per pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.results import LabelledResult, head_labels, head_name, layer_labels
from circuits.weights._common import (
    check_choice,
    read_weights,
    require_attention,
    require_learned_positions,
    stacked,
)

KINDS: tuple[str, ...] = ("Q", "K", "V")


@dataclass(frozen=True)
class CompositionBaseline:
    """Mean and standard deviation of the composition score of random matrices of the heads' shapes.

    Measured (not derived): `n_samples` independent pairs of products X·Y with Gaussian i.i.d. factors of
    shapes [d_model, d_head]·[d_head, d_model] on both sides, seeded by `seed` (see `composition_baseline`).
    The same baseline serves Q, K and V (all three are such products on both sides).
    """

    mean: float
    std: float
    n_samples: int
    seed: int
    d_model: int
    d_head: int


@dataclass(frozen=True, eq=False)
class CompositionScores(LabelledResult):
    """Composition scores [layer_a, head_a, layer_b, head_b] (earlier head a → later head b).

    `values` (alias `scores`) is 0 where layer_a ≥ layer_b, as in transformer_lens; `mask` marks the
    defined pairs. `zscores` = (score − baseline.mean) / baseline.std on defined pairs, 0 elsewhere.
    """

    kind: str = "K"
    baseline: CompositionBaseline | None = None
    zscores: Tensor | None = None
    mask: Tensor | None = None
    fold_layernorm: bool = True

    @property
    def scores(self) -> Float[Tensor, "layer_a head_a layer_b head_b"]:
        return self.values

    def top_pairs(self, k: int = 5, *, by: str = "score") -> list[tuple[str, str, float]]:
        """The k defined pairs with the largest score (or z-score): ("L0H2", "L1H1", value)."""
        check_choice("by", by, ("score", "zscore"))
        source = self.values if by == "score" else self.zscores
        flat = torch.where(self.mask, source, torch.full_like(source, -torch.inf)).flatten()
        n_defined = int(self.mask.sum())
        out = []
        for i in flat.argsort(descending=True)[: min(k, n_defined)].tolist():
            la, ha, lb, hb = (int(j) for j in torch.unravel_index(torch.tensor(i), self.values.shape))
            out.append((head_name(la, ha), head_name(lb, hb), float(flat[i])))
        return out

    def to_networkx(self, min_zscore: float = 3.0):
        """A networkx DiGraph of heads with an edge a → b for every defined pair with z-score ≥ `min_zscore`.

        Edge attributes: `score`, `zscore`, `kind`. Example: `composition_scores(model, "K").to_networkx(5)`
        """
        import networkx as nx

        graph = nx.DiGraph(kind=self.kind)
        L, H = self.values.shape[:2]
        graph.add_nodes_from(head_name(lay, h) for lay in range(L) for h in range(H))
        keep = self.mask & (self.zscores >= min_zscore)
        for la, ha, lb, hb in keep.nonzero().tolist():
            graph.add_edge(head_name(la, ha), head_name(lb, hb), score=float(self.values[la, ha, lb, hb]),
                           zscore=float(self.zscores[la, ha, lb, hb]), kind=self.kind)
        return graph


def _thin_r(W: Float[Tensor, "*batch d_model d_head"]) -> Float[Tensor, "*batch k d_head"]:
    """A square root R of the Gram matrix WᵀW (RᵀR = WᵀW), so ‖W·M‖_F = ‖R·M‖_F for every M.

    The Cholesky factor of the d_head × d_head Gram matrix, formed in float64 (fast for a batch of small
    matrices); when a Gram matrix is singular (rank-deficient W, or d_head > d_model) the R of a thin QR.
    """
    if W.shape[-1] <= W.shape[-2]:
        W64 = W.double()
        lower, info = torch.linalg.cholesky_ex(W64.transpose(-2, -1) @ W64)
        if not bool(info.any()):
            return lower.transpose(-2, -1).to(W.dtype)
    return torch.linalg.qr(W, mode="r").R


def _left_factor(W_V: Tensor, W_O: Tensor) -> Float[Tensor, "*batch k d_model"]:
    """Ã = R_V·W_O with ‖Ã·M‖_F = ‖W_V·W_O·M‖_F for every M (the earlier head's OV circuit)."""
    return _thin_r(W_V) @ W_O


def _right_factor(X: Tensor, Y: Tensor) -> Float[Tensor, "*batch d_model k"]:
    """B̃ = X·R'ᵀ (R' of Yᵀ) with ‖M·B̃‖_F = ‖M·X·Y‖_F for every M (the later head's circuit)."""
    return X @ _thin_r(Y.transpose(-2, -1)).transpose(-2, -1)


def _right_factors(model: TransformerBridge, kind: str, fold_layernorm: bool) -> Float[Tensor, "layer head d_model k"]:
    if kind == "V":
        return _right_factor(read_weights(model, "W_V", fold_layernorm), stacked(model, "W_O"))
    W_Q = read_weights(model, "W_Q", fold_layernorm)
    W_K = read_weights(model, "W_K", fold_layernorm)
    if kind == "Q":
        return _right_factor(W_Q, W_K.transpose(-2, -1))
    return _right_factor(W_K, W_Q.transpose(-2, -1))


class _EarlierHeads:
    """The earlier heads' side of every pair: Ã [layer, head, k, d_model], its norms, and (on demand) ÃᵀÃ."""

    def __init__(self, left: Float[Tensor, "layer head k d_model"]):
        self.factor = left
        self.norm = left.pow(2).sum((-2, -1)).sqrt()
        self._gram: Tensor | None = None

    @property
    def gram(self) -> Float[Tensor, "layer head n_upper"]:
        """ÃᵀÃ per head of every layer but the last, as its upper block triangle (`_upper_gram`).

        ‖Ã·B̃‖² = ⟨ÃᵀÃ, B̃B̃ᵀ⟩, and both Gram matrices are symmetric, so the inner product runs over the
        blocks on and above the diagonal, the off-diagonal ones counted twice.
        """
        if self._gram is None:
            # the last layer is never an earlier head
            self._gram = _upper_gram(self.factor[:-1].transpose(-2, -1), doubled=True)
        return self._gram


_BLOCK = 128  # rows per block of the block-triangular Gram matrices


def _upper_gram(X: Float[Tensor, "*batch n k"], doubled: bool) -> Float[Tensor, "*batch n_upper"]:
    """The blocks on and above the diagonal of the symmetric X·Xᵀ, flattened; off-diagonal blocks ×2 if `doubled`.

    For symmetric G and T, ⟨G, T⟩ = Σ_i ⟨G_ii, T_ii⟩ + 2 Σ_{i<j} ⟨G_ij, T_ij⟩ over blocks of `_BLOCK` rows, so the
    inner product of `_upper_gram(X, True)` with `_upper_gram(Y, False)` is ⟨X·Xᵀ, Y·Yᵀ⟩ from about half of the
    Gram products and half of the terms.
    """
    n = X.shape[-2]
    spans = [(start, min(start + _BLOCK, n)) for start in range(0, n, _BLOCK)]
    parts = []
    for i, (a0, a1) in enumerate(spans):
        for b0, b1 in spans[i:]:
            block = X[..., a0:a1, :] @ X[..., b0:b1, :].transpose(-2, -1)
            parts.append((2 * block if doubled and b0 != a0 else block).flatten(-2))
    return torch.cat(parts, dim=-1)


def _upper_size(n: int) -> int:
    sizes = [min(start + _BLOCK, n) - start for start in range(0, n, _BLOCK)]
    return sum(a * b for i, a in enumerate(sizes) for b in sizes[i:])


def _use_gram(left: Tensor, right: Tensor) -> bool:
    """Whether per-head d_model × d_model Gram matrices cost fewer flops than the k × k pair blocks."""
    L, H, k, dm = left.shape
    k2 = right.shape[-1]
    pairs = H * H * L * (L - 1) // 2
    blocks = pairs * k * dm * k2
    n_upper = _upper_size(dm)
    gram = L * H * n_upper * (k + k2) + pairs * n_upper
    return gram < blocks


def _pair_scores(
    earlier: _EarlierHeads, rights: list[Float[Tensor, "layer head d_model k2"]], method: str = "auto"
) -> list[Float[Tensor, "layer head layer head"]]:
    """‖Ã_a·B̃_b‖ / (‖Ã_a‖ ‖B̃_b‖) for layer_a < layer_b, 0 elsewhere, for each kind's right factors in `rights`.

    method "blocks": the k × k blocks Ã_a·B̃_b from [earlier heads·k, d_model] × [d_model, heads·k], summed in
    squares (cost ∝ pairs·k²·d_model); "gram": ⟨ÃᵀÃ, B̃B̃ᵀ⟩ over the upper block triangles of per-head d_model²
    Gram matrices (cost ∝ heads·d_model²·k + pairs·d_model², each about halved by the symmetry; cheaper when
    d_model is below about 2k²), every kind's later heads in one product per later layer; "auto" picks the
    cheaper.
    """
    check_choice("method", method, ("auto", "blocks", "gram"))
    left = earlier.factor
    L, H, k, _ = left.shape
    if method == "auto":
        method = "gram" if _use_gram(left, rights[0]) else "blocks"
    scores = [left.new_zeros(L, H, L, H) for _ in rights]
    right_norms = [right.pow(2).sum((-2, -1)).sqrt() for right in rights]
    for lb in range(1, L):
        if method == "blocks":
            a = einops.rearrange(left[:lb], "la ha k m -> (la ha k) m")
            numers = []
            for right in rights:
                b = einops.rearrange(right[lb], "hb m k2 -> m (hb k2)")
                blocks = einops.rearrange(a @ b, "(la ha k) (hb k2) -> la ha hb k k2", la=lb, ha=H, hb=H)
                numers.append(blocks.pow(2).sum((-2, -1)).sqrt())
        else:
            t = torch.cat([_upper_gram(right[lb], doubled=False) for right in rights])  # [kinds·hb, n_upper]
            both = einops.einsum(earlier.gram[:lb], t, "la ha n, khb n -> la ha khb").clamp(min=0).sqrt()
            numers = both.split(H, dim=-1)
        for score, numer, right_norm in zip(scores, numers, right_norms):
            score[:lb, :, lb, :] = numer / earlier.norm[:lb, :, None] / right_norm[lb][None, None, :]
    return scores


def pair_mask(n_layers: int, n_heads: int, device: torch.device | str | None = None) -> Bool[Tensor, "la ha lb hb"]:
    """True where layer_a < layer_b (the pairs whose composition is defined)."""
    layers = torch.arange(n_layers, device=device)
    return (layers[:, None, None, None] < layers[None, None, :, None]).expand(n_layers, n_heads, n_layers, n_heads)


_Grams = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _baseline_from_grams(grams: _Grams) -> Float[Tensor, " n"]:
    """Scores of W_A = W_V·W_O, W_B = X·Y from G_V = W_VᵀW_V, G_O = W_O·W_Oᵀ, M = W_O·X, G_X = XᵀX, G_Y = Y·Yᵀ.

    ‖W_A·W_B‖² = tr(G_V·M·G_Y·Mᵀ), ‖W_A‖² = tr(G_V·G_O), ‖W_B‖² = tr(G_X·G_Y): all d_head × d_head.
    """
    G_V, G_O, M, G_X, G_Y = grams

    def trace(A: Tensor, B: Tensor) -> Tensor:  # tr(A·B), batched
        return (A * B.transpose(-2, -1)).sum((-2, -1))

    return (trace(G_V @ M, G_Y @ M.transpose(-2, -1)) / trace(G_V, G_O) / trace(G_X, G_Y)).sqrt()


def _direct_grams(n: int, d_model: int, d_head: int, seed: int) -> _Grams:
    """The five d_head × d_head matrices of `_baseline_from_grams` from explicit Gaussian W_V, W_O, X, Y."""
    gen = torch.Generator().manual_seed(seed)
    W_V, X = (torch.randn(n, d_model, d_head, generator=gen, dtype=torch.float64) for _ in range(2))
    W_O, Y = (torch.randn(n, d_head, d_model, generator=gen, dtype=torch.float64) for _ in range(2))
    return W_V.mT @ W_V, W_O @ W_O.mT, W_O @ X, X.mT @ X, Y @ Y.mT


def _bartlett(n: int, d: int, dof: int) -> Float[Tensor, "n d d"]:
    """Lower-triangular L with L·Lᵀ ~ Wishart_d(dof, I) (Bartlett): L_ii² ~ χ²(dof − i), L_ij ~ N(0, 1) below."""
    chi2 = torch.distributions.Chi2(torch.arange(dof, dof - d, -1, dtype=torch.float64)).sample((n,))
    return torch.randn(n, d, d, dtype=torch.float64).tril(-1) + torch.diag_embed(chi2.sqrt())


def _reduced_grams(n: int, d_model: int, d_head: int, seed: int) -> _Grams:
    """The same five matrices drawn in distribution without forming any d_model-sized matrix (d_model ≥ d_head).

    G_V and G_Y are Wishart(d_model). With W_Oᵀ = Q·R (thin QR; Q uniform and independent of the Bartlett R),
    G_O = RᵀR and M = Rᵀ·(QᵀX), where QᵀX is a d_head × d_head Gaussian and XᵀX = (QᵀX)ᵀ(QᵀX) + a
    Wishart(d_model − d_head) independent of it (rotation invariance of X). Seeded through a forked global RNG
    (torch's χ² sampler takes no generator), leaving the caller's RNG state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        L_V, R_O, L_Y = (_bartlett(n, d_head, d_model) for _ in range(3))
        Z1 = torch.randn(n, d_head, d_head, dtype=torch.float64)
        rest = d_model - d_head
        if rest >= d_head:
            L_2 = _bartlett(n, d_head, rest)
            G_2 = L_2 @ L_2.mT
        else:
            Z2 = torch.randn(n, rest, d_head, dtype=torch.float64)
            G_2 = Z2.mT @ Z2
    return L_V @ L_V.mT, R_O @ R_O.mT, R_O @ Z1, Z1.mT @ Z1 + G_2, L_Y @ L_Y.mT


@lru_cache(maxsize=32)
def composition_baseline(d_model: int, d_head: int, n_samples: int = 256, seed: int = 0) -> CompositionBaseline:
    """The composition score of random Gaussian matrices of the heads' shapes: mean and std over `n_samples` pairs.

    W_A = W_V·W_O and W_B = X·Y with i.i.d. N(0, 1) factors of shapes [d_model, d_head]·[d_head, d_model]. The
    score depends on them only through five d_head × d_head matrices (`_baseline_from_grams`), which are drawn
    directly in distribution when d_model ≥ d_head (`_reduced_grams`: Bartlett factors of Wishart matrices),
    else computed from explicit Gaussian factors. Float64. Pure function of its arguments (cached).
    Example: `composition_baseline(768, 64).mean`
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2 (a std needs two samples), got {n_samples}")
    draw = _reduced_grams if d_model >= d_head else _direct_grams
    s = _baseline_from_grams(draw(n_samples, d_model, d_head, seed))
    return CompositionBaseline(float(s.mean()), float(s.std()), n_samples, seed, d_model, d_head)


def composition_scores(
    model: TransformerBridge,
    kind: str,
    *,
    fold_layernorm: bool = True,
    baseline_samples: int = 256,
    seed: int = 0,
    method: str = "auto",
) -> CompositionScores:
    """Composition scores of `kind` ("Q", "K" or "V") for every head pair, [layer_a, head_a, layer_b, head_b].

    `fold_layernorm=True` (the default) folds each reading head's ln1 centring and weight into its W_Q, W_K,
    W_V (as `process_weights(fold_ln=True)` would), so the scores describe the matrices the model applies;
    `fold_layernorm=False` uses the raw weights and equals `model.all_composition_scores(kind)` of
    transformer_lens. The baseline (see `composition_baseline`) is measured with `baseline_samples`
    random pairs from `seed`. `method` ("auto", "blocks", "gram") picks how the pairs' norms are computed
    (same result; see `_pair_scores`). Example: `composition_scores(model, "K").top_pairs(3)`
    """
    check_choice("kind", kind, KINDS)
    check_choice("method", method, ("auto", "blocks", "gram"))
    require_attention(model, "composition_scores")
    if kind != "V":
        require_learned_positions(model, f'composition_scores(kind="{kind}")')
    with torch.no_grad():
        earlier = _EarlierHeads(_left_factor(read_weights(model, "W_V", fold_layernorm), stacked(model, "W_O")))
        (scores,) = _pair_scores(earlier, [_right_factors(model, kind, fold_layernorm)], method)
    return _result(model, kind, scores, fold_layernorm, baseline_samples, seed)


def all_composition_scores(
    model: TransformerBridge,
    *,
    fold_layernorm: bool = True,
    baseline_samples: int = 256,
    seed: int = 0,
    method: str = "auto",
) -> dict[str, CompositionScores]:
    """`composition_scores` for "Q", "K" and "V" at once, sharing the earlier heads' factors.

    Same arguments and defaults as `composition_scores`. Example: `all_composition_scores(model)["V"].scores`
    """
    check_choice("method", method, ("auto", "blocks", "gram"))
    require_attention(model, "all_composition_scores")
    require_learned_positions(model, 'all_composition_scores (composition_scores(model, "V") does not need them)')
    with torch.no_grad():
        earlier = _EarlierHeads(_left_factor(read_weights(model, "W_V", fold_layernorm), stacked(model, "W_O")))
        rights = [_right_factors(model, kind, fold_layernorm) for kind in KINDS]
        scores = dict(zip(KINDS, _pair_scores(earlier, rights, method)))
    return {kind: _result(model, kind, s, fold_layernorm, baseline_samples, seed) for kind, s in scores.items()}


def _result(
    model: TransformerBridge, kind: str, scores: Tensor, fold_layernorm: bool, baseline_samples: int, seed: int
) -> CompositionScores:
    L, H = scores.shape[:2]
    base = composition_baseline(int(model.cfg.d_model), int(model.cfg.d_head), baseline_samples, seed)
    mask = pair_mask(L, H, scores.device)
    z = torch.where(mask, (scores - base.mean) / base.std, torch.zeros_like(scores))
    return CompositionScores(
        values=scores,
        dims=("layer_a", "head_a", "layer_b", "head_b"),
        labels=(layer_labels(L), head_labels(H), layer_labels(L), head_labels(H)),
        method=f"composition_scores[{kind}]",
        info=dict(kind=kind, fold_layernorm=fold_layernorm, baseline_mean=base.mean, baseline_std=base.std),
        kind=kind,
        baseline=base,
        zscores=z,
        mask=mask,
        fold_layernorm=fold_layernorm,
    )


__all__ = ["KINDS", "CompositionBaseline", "CompositionScores", "all_composition_scores", "composition_baseline",
           "composition_scores", "pair_mask"]

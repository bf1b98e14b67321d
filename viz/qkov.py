"""Full QK and OV circuits: the top token pairs as a table, and the eigenvalue spectrum behind copying scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Complex, Float
from torch import Tensor
from transformer_lens import FactoredMatrix

from viz.theme import BASELINE, SERIES, TEMPLATE


def top_pairs(
    matrix: FactoredMatrix | Float[Tensor, "rows cols"], k: int = 20, *, largest: bool = True, chunk: int = 4096
) -> tuple[list[tuple[int, int]], list[float]]:
    """The k largest (or smallest) entries of a [rows, cols] matrix as ((row, col), value), best first.

    Ties are listed in row-major order.
    A `FactoredMatrix` is expanded `chunk` rows at a time (A[rows] @ B), so a d_vocab × d_vocab product is
    never held whole. Example: `top_pairs(full_ov_circuit(model, 1, 1), 10)`
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(matrix.shape) != 2:
        raise ValueError(f"matrix: expected one [rows, cols] matrix, got shape {tuple(matrix.shape)}")
    n_rows, n_cols = matrix.shape
    k = min(k, n_rows * n_cols)
    best_vals = torch.empty(0)
    best_idx = torch.empty(0, dtype=torch.long)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        if isinstance(matrix, FactoredMatrix):
            block = (matrix.A[start:stop] @ matrix.B).detach()
        else:
            block = matrix[start:stop].detach()
        block = block.double().cpu().flatten()
        vals, idx = block.topk(min(k, block.numel()), largest=largest)
        best_vals = torch.cat([best_vals.double(), vals])
        best_idx = torch.cat([best_idx, idx + start * n_cols])
        keep = best_vals.topk(min(k, len(best_vals)), largest=largest).indices
        best_vals, best_idx = best_vals[keep], best_idx[keep]
    # best first; ties in row-major order (which of several tied entries at the k-th place is kept is arbitrary)
    sign = -1.0 if largest else 1.0
    order = sorted(range(len(best_vals)), key=lambda i: (sign * float(best_vals[i]), int(best_idx[i])))
    pairs = [(int(best_idx[i]) // n_cols, int(best_idx[i]) % n_cols) for i in order]
    return pairs, [float(best_vals[i]) for i in order]


def draw_top_pairs(
    matrix: FactoredMatrix | Float[Tensor, "rows cols"],
    row_tokens: Sequence[str],
    col_tokens: Sequence[str],
    *,
    k: int = 20,
    largest: bool = True,
    row_name: str = "source token",
    col_name: str = "output token",
    title: str = "top token pairs",
) -> go.Figure:
    """A table of the k largest (or smallest) entries of a full QK or OV circuit, with their token strings.

    For an OV circuit (`full_ov_circuit`, [attended token, output token]) the pairs are "attending to this
    token raises that logit"; for a QK circuit ([query token, key token]) "this query attends to that key".
    Example: `draw_top_pairs(full_ov_circuit(model, 1, 1), vocab, vocab, k=10)`
    """
    n_rows, n_cols = matrix.shape[-2:]
    if len(row_tokens) != n_rows or len(col_tokens) != n_cols:
        raise ValueError(f"row_tokens/col_tokens: expected {n_rows} and {n_cols} strings for a {n_rows} × {n_cols} "
                         f"matrix, got {len(row_tokens)} and {len(col_tokens)}")
    pairs, values = top_pairs(matrix, k, largest=largest)
    columns = [
        list(range(1, len(pairs) + 1)),
        [repr(row_tokens[r]) for r, _ in pairs],
        [repr(col_tokens[c]) for _, c in pairs],
        [f"{v:.4g}" for v in values],
    ]
    fig = go.Figure(go.Table(
        header={"values": ["rank", row_name, col_name, "score"], "fill_color": "#e8e8e8", "align": "left",
                "font": {"size": 14}},
        cells={"values": columns, "align": "left", "height": 26, "font": {"size": 13}},
        columnwidth=[0.6, 2, 2, 1.2],
    ))
    fig.update_layout(template=TEMPLATE, title={"text": title}, height=min(900, 130 + 27 * len(pairs)), width=640)
    return fig


def copying_score(eigenvalues: Complex[Tensor, " n"] | Float[Tensor, " n"]) -> float:
    """Σλ / Σ|λ| over a matrix's eigenvalues: 1 for a pure copying map, −1 for a pure anti-copying one."""
    lam = eigenvalues.detach().cpu().to(torch.complex128)
    return float(lam.sum().real / lam.abs().sum())


def draw_eigenvalues(
    eigenvalues: Mapping[str, Any] | Any,
    *,
    title: str = "eigenvalues of the full OV circuit",
) -> go.Figure:
    """Eigenvalues in the complex plane, one series per head, each named with its copying score Σλ/Σ|λ|.

    `eigenvalues` is a 1-d (complex) tensor, a `FactoredMatrix` (its `.eigenvalues` are used), or a mapping
    {head name: either}. Points on the positive real axis mean copying. Equal scales on both axes.
    Example: `draw_eigenvalues({"L1H1": full_ov_circuit(model, 1, 1)})`
    """
    if not isinstance(eigenvalues, Mapping):
        eigenvalues = {"": eigenvalues}
    fig = go.Figure()
    for i, (name, item) in enumerate(eigenvalues.items()):
        lam = item.eigenvalues if isinstance(item, FactoredMatrix) else item
        if not isinstance(lam, Tensor) or lam.ndim != 1:
            raise ValueError(f"eigenvalues[{name!r}]: expected a 1-d tensor or a FactoredMatrix, got {type(item)}")
        lam = lam.detach().cpu().to(torch.complex128)
        score = copying_score(lam)
        label = f"{name} (copying {score:.3f})" if name else f"copying score {score:.3f}"
        fig.add_trace(go.Scatter(
            x=lam.real.numpy(), y=lam.imag.numpy(), mode="markers", name=label,
            marker={"color": SERIES[i % len(SERIES)], "size": 8, "opacity": 0.75, "line": {"width": 0}},
            hovertemplate="Re %{x:.4g}<br>Im %{y:.4g}<extra>" + (name or "λ") + "</extra>",
        ))
    fig.add_hline(y=0, line={"color": BASELINE, "width": 1})
    fig.add_vline(x=0, line={"color": BASELINE, "width": 1})
    single = len(eigenvalues) == 1
    fig.update_layout(template=TEMPLATE, title={"text": title if not single else f"{title} · {fig.data[0].name}"},
                      xaxis={"title": {"text": "Re λ"}, "zeroline": False},
                      yaxis={"title": {"text": "Im λ"}, "scaleanchor": "x", "scaleratio": 1, "zeroline": False},
                      showlegend=not single, height=520, width=640)
    return fig


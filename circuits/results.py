"""The base of every method's result: a tensor with named, labelled axes and a record of how it was made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class LabelledResult:
    """A result tensor whose axes have names and tick labels.

    `values` has one axis per entry of `dims` (for example ("layer", "head", "pos")); `labels[i]` holds one
    string per index of axis i (for example "L0", "H3", or the token string at a position). `method` names
    what computed it, and `info` records how (metric, direction, ablation, baselines ...). Method-specific
    results subclass this and add fields. Example: `result.top(5)` lists the five largest |values|.
    """

    values: Tensor
    dims: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != len(self.dims):
            raise ValueError(f"values has {self.values.ndim} axes but dims names {len(self.dims)}: {self.dims}")
        if len(self.labels) != len(self.dims):
            raise ValueError(f"labels: expected one label tuple per axis ({len(self.dims)}), got {len(self.labels)}")
        for dim, size, labels in zip(self.dims, self.values.shape, self.labels):
            if len(labels) != size:
                raise ValueError(f"labels for axis {dim!r}: expected {size}, got {len(labels)}")

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def top(self, k: int = 5, *, by_abs: bool = True) -> list[tuple[tuple[str, ...], float]]:
        """The k largest entries (by |value| unless `by_abs=False`) as (labels, value) pairs; nan entries (not
        computed, e.g. left out by `heads=`/`positions=`, or not an edge) are never listed. Ties keep index order."""
        flat = self.values.detach().flatten().float()
        key = (flat.abs() if by_abs else flat).nan_to_num(nan=-torch.inf).masked_fill(flat.isnan(), -torch.inf)
        order = torch.sort(key, descending=True, stable=True).indices[:k]
        out = []
        for i in order.tolist():
            if torch.isnan(flat[i]):
                continue
            idx = torch.unravel_index(torch.tensor(i), self.values.shape)
            out.append((tuple(self.labels[a][int(j)] for a, j in enumerate(idx)), float(flat[i])))
        return out

    def table(self) -> list[dict[str, Any]]:
        """One dict per entry: each axis's label plus `value`."""
        rows = []
        flat = self.values.detach().flatten().float().tolist()
        for i, v in enumerate(flat):
            idx = torch.unravel_index(torch.tensor(i), self.values.shape)
            row = {d: self.labels[a][int(j)] for a, (d, j) in enumerate(zip(self.dims, idx))}
            row["value"] = v
            rows.append(row)
        return rows


@dataclass(frozen=True, eq=False)
class HeadScores(LabelledResult):
    """One score per head, [layer, head]: what the weight signatures (`circuits.weights`) and the attention
    scores measured on a forward pass (`circuits.models.head_scores`) both return; `method` says which."""

    @classmethod
    def of(cls, values: Tensor, method: str, **info: Any) -> HeadScores:
        """Scores [layer, head] with the labels L0.., H0..; `info` records how they were computed."""
        L, H = values.shape
        return cls(values=values, dims=("layer", "head"), labels=(layer_labels(L), head_labels(H)), method=method,
                   info=info)


def layer_labels(n: int) -> tuple[str, ...]:
    return tuple(f"L{i}" for i in range(n))


def head_labels(n: int) -> tuple[str, ...]:
    return tuple(f"H{i}" for i in range(n))


def head_name(layer: int, head: int) -> str:
    """The conventional name of a head: `L1H3`."""
    return f"L{layer}H{head}"


def position_labels(str_tokens: list[str] | None, n: int) -> tuple[str, ...]:
    """Tick labels for positions: `3:tok` when token strings are known, else `3`."""
    if str_tokens is None:
        return tuple(str(i) for i in range(n))
    if len(str_tokens) != n:
        raise ValueError(f"str_tokens: expected {n} token strings, got {len(str_tokens)}")
    return tuple(f"{i}:{t}" for i, t in enumerate(str_tokens))

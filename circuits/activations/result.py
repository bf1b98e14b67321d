"""The result of activation and attribution patching."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.results import LabelledResult
from circuits.tasks import normalise
from circuits.validate import check_gap


@dataclass(frozen=True, eq=False)
class PatchResult(LabelledResult):
    """Patching scores per component, shaped by the site: [layer, pos], [layer], [layer, head, pos],
    [layer, head] or [layer, head, dest_pos].

    `values` is the normalised metric of each patched run: 0 at the corrupted baseline, 1 at the clean one,
    in both directions. `raw` is the metric itself; `clean_metric` and `corrupted_metric` are the unpatched
    baselines; `effect` = raw − the unpatched run's metric (denoising: corrupted; noising: clean). Components
    left out by `heads`/`positions` are NaN. Attribution patching fills `raw` with its first-order estimate.
    Example: `result.top(5)`; `result.effect`.
    """

    raw: Tensor | None = None
    site: str = ""
    direction: str = "denoising"
    metric: str = ""
    clean_metric: float = float("nan")
    corrupted_metric: float = float("nan")

    @property
    def unpatched_metric(self) -> float:
        """The metric of the run being patched (corrupted when denoising, clean when noising)."""
        return self.corrupted_metric if self.direction == "denoising" else self.clean_metric

    @property
    def effect(self) -> Tensor:
        """metric(patched) − metric(unpatched) per component."""
        return self.raw - self.unpatched_metric


def make_result(raw: Tensor, *, method: str, dims: tuple[str, ...], labels: tuple[tuple[str, ...], ...],
                site: str, direction: str, metric: str, clean: float, corrupted: float,
                info: dict | None = None) -> PatchResult:
    raw = raw.detach().cpu()
    if check_gap(float(clean), float(corrupted), name="task", raise_on_zero=False):
        values = torch.as_tensor(normalise(raw, corrupted, clean))
    else:  # 0/0: no normalised value exists (warned); the raw metric and the effect stay
        values = torch.full_like(raw, float("nan"))
        info = {**(info or {}), "normalised": "undefined: the clean and corrupted runs score the same"}
    return PatchResult(values=values, dims=dims, labels=labels, method=method, info=dict(info or {}), raw=raw,
                       site=site, direction=direction, metric=metric, clean_metric=float(clean),
                       corrupted_metric=float(corrupted))

"""The tidy table of a sweep: one row per run (pandas), saved as Parquet or CSV.

Columns: `key`, `label`, `model`, `task`, `method`, `seed`, one `param.<name>` column per method parameter
(empty where a method does not take it), `status`, `error`, the metrics (`n_edges`, `n_edges_total`,
`faithfulness`, `roc_auc`, ... and each method's own), the digests and versions, then the measurements:
`total_s`, `build_s`, `method_s`, `score_s`, `peak_rss_mb`, `host`, `pid`, `writer`, `finished_at`.
`result_columns` are the columns a run's result determines (all but the measurements): two sweeps of the
same grid agree on them exactly, whichever backend ran them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

METRICS = ("n_edges", "n_edges_total", "faithfulness", "roc_auc")  # columns present even when every run lacks them
MEASUREMENTS = ("total_s", "build_s", "method_s", "score_s", "peak_rss_mb", "host", "pid", "writer", "finished_at")


def tidy_table(entries: Iterable[dict[str, Any]]):
    """A DataFrame with one row per entry, in the order given. Example: `tidy_table(result.entries)`"""
    import pandas as pd

    rows = [_row(e) for e in entries]
    table = pd.DataFrame(rows)
    for c in METRICS:
        if c not in table.columns:
            table[c] = float("nan")
    for c in [c for c in table.columns if c.startswith("param.")] + ["top_component", "error"]:
        if c in table.columns:
            table[c] = _uniform(table[c])
    first = ["key", "label", "model", "task", "method", "seed"]
    params = sorted(c for c in table.columns if c.startswith("param."))
    status = ["status", "error", *METRICS]
    measured = [c for c in MEASUREMENTS if c in table.columns]
    rest = [c for c in table.columns if c not in first + params + status + measured]
    return table[first + params + status + rest + measured]


def result_columns(table) -> list[str]:
    """The columns a run's result determines: every column but the timings, memory and who wrote it."""
    return [c for c in table.columns if c not in MEASUREMENTS]


def save_table(table, path: str | Path) -> Path:
    """Write the table as Parquet (`.parquet`) or CSV (`.csv`). Example: `save_table(result.table, "t.parquet")`"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        raise ValueError(f"path: expected a .parquet or .csv file name, got {path.name!r}")
    return path


def roc_curves(entries: Sequence[dict[str, Any]], *, by: str = "label") -> dict[str, tuple[list, list]]:
    """{run label (or another column of the row, e.g. "method"): (fpr, tpr)} of the runs with an ROC."""
    out = {}
    for e in entries:
        if e.get("roc"):
            name = e["label"] if by == "label" else str(_row(e)[by])
            out[name] = (e["roc"]["fpr"], e["roc"]["tpr"])
    return out


def _row(e: dict[str, Any]) -> dict[str, Any]:
    run = e["identity"]["run"]
    row: dict[str, Any] = {"key": e["key"], "label": e["label"], "model": run["model"]["name"],
                           "task": run["task"]["name"], "method": run["method"], "seed": run["seed"]}
    row.update({f"param.{k}": v for k, v in run["params"].items()})
    row.update(status=e["status"], error=e["error"])
    row.update(e["metrics"])
    row.update(model_digest=e["identity"]["model_digest"], task_digest=e["identity"]["task_digest"])
    row.update(e["identity"]["versions"])
    row.update(e.get("timings", {}))
    row.update({k: e.get(k) for k in ("peak_rss_mb", "host", "pid", "writer", "finished_at")})
    return row


def _uniform(column):
    """Numbers stay numbers; a column mixing types (or holding lists) becomes text (JSON for non-strings),
    so that Parquet can store it."""
    values = [v for v in column if not (v is None or (isinstance(v, float) and math.isnan(v)))]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return column
    if all(isinstance(v, str) for v in values) or all(isinstance(v, bool) for v in values):
        return column
    return column.map(lambda v: v if v is None or isinstance(v, str) else json.dumps(v))

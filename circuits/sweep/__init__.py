"""Sweeps: grids of runs (models × tasks × methods with their parameters × seeds), in-process or on Ray,
each finished run written at once to a results folder keyed by a hash of its configuration, and one tidy
table of all runs.

Files: `grid` (the grid and its TOML form), `build` (models, tasks, known circuits; the digests are
`circuits.digest`), `methods` (one adapter per method), `store` (the results folder: atomic, checksummed
entries), `runner` (keys, cache, backends), `table` (the DataFrame). Figures: `viz.sweep`. Command line:
`python -m circuits.sweep sweep.toml`.
pandas, pyarrow and Ray come with `pip install 'circuits[sweep]'`.

Example:
    from circuits.sweep import MethodEntry, ModelEntry, Sweep, TaskEntry
    sweep = Sweep([ModelEntry("planted", builder="planted_induction")],
                  [TaskEntry("induction", "induction_task", dict(batch=8, half_len=6))],
                  [MethodEntry("acdc", grid={"threshold": [0.01, 0.1]}, params={"ablation": "zero"})])
    sweep.run("out/sweep", progress=False).table
"""

from circuits.digest import weights_digest
from circuits.sweep.build import known_circuit, register_model, register_task
from circuits.sweep.grid import METHODS, MethodEntry, ModelEntry, Run, Sweep, TaskEntry, load_toml
from circuits.sweep.methods import MethodOutput, register_method
from circuits.sweep.runner import SweepResult, run_sweep
from circuits.sweep.store import Store
from circuits.sweep.table import result_columns, roc_curves, save_table, tidy_table

__all__ = [
    "METHODS", "MethodEntry", "MethodOutput", "ModelEntry", "Run", "Store", "Sweep", "SweepResult", "TaskEntry",
    "known_circuit", "load_toml", "register_method", "register_model", "register_task", "result_columns",
    "roc_curves", "run_sweep", "save_table", "tidy_table", "weights_digest",
]

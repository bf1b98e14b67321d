"""Run a sweep declared in a TOML file: `python -m circuits.sweep sweep.toml [--results DIR] [--backend ray]`.

The file's `[run]` table gives the defaults of the options below (`results`, `backend`, `address`, `num_cpus`,
`threads_per_run`, `max_retries`, `retry_errors`, `progress`); the command line overrides them. Writes the
table to `<results>/table.parquet` (or `--table PATH`, .parquet or .csv) and with `--figures DIR` the
sweep's figures as HTML. Started again on the same folder it reruns only what is missing or corrupt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuits.sweep.grid import load_toml
from circuits.sweep.runner import run_sweep
from circuits.sweep.table import save_table

_OPTIONS = ("results", "backend", "address", "num_cpus", "threads_per_run", "max_retries", "retry_errors", "progress")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circuits.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="the sweep's TOML file")
    parser.add_argument("--results", type=Path, help="the results folder (default: [run] results)")
    parser.add_argument("--backend", choices=("inprocess", "ray"))
    parser.add_argument("--address", help="with --backend ray: an existing cluster's address")
    parser.add_argument("--num-cpus", type=int, help="with --backend ray and no address: the local Ray's CPUs")
    parser.add_argument("--threads-per-run", type=int, help="torch threads of each run")
    parser.add_argument("--max-retries", type=int, help="Ray: retries of a run whose worker died (default 3)")
    parser.add_argument("--retry-errors", action="store_true", default=None, help="rerun runs recorded with an error")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    parser.add_argument("--table", type=Path, help="where to write the table (default <results>/table.parquet)")
    parser.add_argument("--figures", type=Path, help="write the sweep's figures as HTML into this folder")
    args = parser.parse_args(argv)
    try:
        sweep, options = load_toml(args.file)
    except (OSError, ValueError) as err:
        parser.error(f"{args.file}: {err}")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        parser.error(f"{args.file}: unknown [run] options {unknown}; expected some of {list(_OPTIONS)}")
    options.update({k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None})
    results = options.pop("results", None)
    if results is None:
        parser.error("the results folder: give --results or [run] results")
    try:
        result = run_sweep(sweep, results, **options)
    except ValueError as err:  # the grid itself is wrong (a model or task that cannot be built, an option)
        parser.error(str(err))
    table_path = save_table(result.table, args.table or Path(results) / "table.parquet")
    if args.figures:
        from viz.sweep import sweep_figures

        args.figures.mkdir(parents=True, exist_ok=True)
        for name, fig in sweep_figures(result.table, result.entries).items():
            fig.write_html(args.figures / f"{name}.html", include_plotlyjs="directory")
    print(f"{len(result.entries)} runs: computed {result.n_computed}, reused {result.n_reused}, "
          f"with an error {result.n_failed}; table {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

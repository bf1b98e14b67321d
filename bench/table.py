"""Run the benchmark suite and print the table of ratios (reference time / our time) with peak memory.

    python -m bench.table [--short] [--out bench/latest.json] [--readme README.md ...] [-k EXPR [--merge]]

Every group in bench/ holds one `ours` and one `reference` benchmark (see bench/conftest.py). The table is
written as JSON and, with --readme, replaces the block between the README's `<!-- bench:start -->` and
`<!-- bench:end -->` markers, with the date and the machine. With `-k` and `--merge`, the groups run replace
their rows in the existing `--out` file and the other rows are kept (each row records its date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from circuits.markers import rewrite_marked_block


def run_suite(short: bool, select: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench", "--benchmark-enable",
               f"--benchmark-json={out}", "--benchmark-warmup=off"]
        if short:
            cmd += ["--benchmark-min-rounds=1", "--benchmark-max-time=0.05"]
        else:
            cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=2"]
        if select:
            cmd += ["-k", select]
        env = dict(os.environ, BENCH_FULL="0" if short else "1")
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def ratio_table(raw: dict) -> list[dict]:
    groups: dict[str, dict] = {}
    for b in raw["benchmarks"]:
        side = b.get("extra_info", {}).get("side")
        if side not in ("ours", "reference"):
            continue
        groups.setdefault(b["group"] or b["name"], {})[side] = b
    rows = []
    for group, sides in sorted(groups.items()):
        if set(sides) != {"ours", "reference"}:
            continue
        ours, ref = sides["ours"], sides["reference"]
        rows.append({
            "benchmark": group,
            "ours_s": ours["stats"]["median"],
            "reference_s": ref["stats"]["median"],
            "ratio": ref["stats"]["median"] / ours["stats"]["median"],
            "ours_peak_mib": ours["extra_info"].get("peak_mb"),
            "reference_peak_mib": ref["extra_info"].get("peak_mb"),
            "rounds": [ours["stats"]["rounds"], ref["stats"]["rounds"]],
            "full_size": bool(ours["extra_info"].get("full")),
            "extra": {k: v for k, v in ours["extra_info"].items() if k not in ("side", "peak_mb", "full")},
        })
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with the rows of the benchmarks in `new` replaced or added, sorted by benchmark."""
    merged = {r["benchmark"]: r for r in old}
    merged.update({r["benchmark"]: r for r in new})
    return [merged[k] for k in sorted(merged)]


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def against_goal(row: dict) -> str:
    """What a row whose reference is a unit of cost, not a competing implementation, measures against its goal:
    EAP in forward-equivalents against its budget (`forward_equivalents`, `budget`), or a stated `goal`."""
    extra = row.get("extra", {})
    if "forward_equivalents" in extra:
        return f"{extra['forward_equivalents']:.1f} forwards (budget {extra['budget']})"
    if "goal" in extra:
        return f"{1 / row['ratio']:.2f}× the reference (goal {extra['goal']})"
    return ""


def markdown(rows: list[dict], machine: str, date: str) -> str:
    lines = [f"Measured {date} on {machine} (`python -m bench.table --readme README.md`; medians).", "",
             "| benchmark | ours | reference | ratio (reference / ours) | peak MiB ours / reference "
             "| against its goal |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {_seconds(r['ours_s'])} | {_seconds(r['reference_s'])} | "
                     f"{r['ratio']:.1f}× | {r['ours_peak_mib']} / {r['reference_peak_mib']} | {against_goal(r)} |")
    return "\n".join(lines)


def machine_description() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="small shapes, few rounds (CI's mode)")
    parser.add_argument("--out", type=Path, default=Path("bench/latest.json"))
    parser.add_argument("--readme", type=Path, action="append", default=[],
                        help="replace the benchmark block of this markdown file (repeatable)")
    parser.add_argument("-k", dest="select", help="pytest -k expression")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of the existing --out file")
    args = parser.parse_args(argv)
    date = dt.date.today().isoformat()
    rows = [dict(r, date=date) for r in ratio_table(run_suite(args.short, args.select))]
    if args.merge and args.out.exists():
        rows = merge_rows(json.loads(args.out.read_text())["rows"], rows)
    machine = machine_description()
    dates = sorted({r.get("date", date) for r in rows})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    args.out.write_text(json.dumps({"date": when, "machine": machine, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, machine, when)
    print(table)
    for page in args.readme:
        rewrite_marked_block(page, "bench", table)


if __name__ == "__main__":
    main()

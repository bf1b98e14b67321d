"""bench.table: the ratio table and the merging of a partial run into the last full one."""

from __future__ import annotations

from bench.table import merge_rows, ratio_table


def _bench(group: str, side: str, median: float) -> dict:
    return {"group": group, "name": f"{group}-{side}", "stats": {"median": median, "rounds": 3},
            "extra_info": {"side": side, "peak_mb": 1.0, "full": True}}


def test_ratio_is_reference_over_ours_and_unpaired_groups_are_dropped():
    raw = {"benchmarks": [_bench("a", "ours", 2.0), _bench("a", "reference", 10.0), _bench("b", "ours", 1.0)]}
    rows = ratio_table(raw)
    assert [r["benchmark"] for r in rows] == ["a"]
    assert rows[0]["ratio"] == 5.0


def test_merge_replaces_the_rerun_groups_and_keeps_the_others():
    old = [{"benchmark": "a", "ratio": 1.0}, {"benchmark": "c", "ratio": 3.0}]
    new = [{"benchmark": "b", "ratio": 2.0}, {"benchmark": "c", "ratio": 4.0}]
    assert merge_rows(old, new) == [{"benchmark": "a", "ratio": 1.0}, {"benchmark": "b", "ratio": 2.0},
                                    {"benchmark": "c", "ratio": 4.0}]

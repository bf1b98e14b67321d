"""bench.table: the ratio table and the merging of a partial run into the last full one."""

from __future__ import annotations

from bench.table import against_goal, markdown, merge_rows, ratio_table


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


def test_rows_measured_in_units_of_their_reference_state_the_cost_against_the_goal():
    eap = {"ratio": 0.25, "extra": {"forward_equivalents": 3.96, "budget": 4}}
    vocab = {"ratio": 0.4, "extra": {"goal": "≤ 2× the 1,000-token walk"}}
    assert against_goal(eap) == "4.0 forwards (budget 4)"
    assert against_goal(vocab) == "2.50× the reference (goal ≤ 2× the 1,000-token walk)"
    assert against_goal({"ratio": 3.0, "extra": {}}) == ""
    line = markdown([dict(benchmark="g", ours_s=2.0, reference_s=0.5, ours_peak_mib=1, reference_peak_mib=2, **eap)],
                    "m", "d").splitlines()[-1]
    assert line == "| g | 2.00 s | 500.0 ms | 0.2× | 1 / 2 | 4.0 forwards (budget 4) |"

"""circuits.sweep: the grid, the results folder (atomic, checksummed, shared), the backends and the table.

Oracles: the in-process table (Ray must give the same results), the planted model's known circuit (ACDC
with zero ablation must find exactly it), the bytes of entries written before a kill (kept as they were),
and counts of what a restarted sweep computed."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from circuits.graph import acdc
from circuits.models import planted_induction
from circuits.sweep import (
    MethodEntry,
    ModelEntry,
    Store,
    Sweep,
    TaskEntry,
    known_circuit,
    load_toml,
    result_columns,
    save_table,
)
from circuits.sweep.store import run_key
from circuits.tasks import induction_task

pd = pytest.importorskip("pandas")
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

PLANTED = ModelEntry("planted", builder="planted_induction", params=dict(d_vocab=16, n_ctx=16))
TINY = ModelEntry("tiny", builder="attn_only", params=dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=24,
                                                            n_ctx=24, seed=1))
INDUCTION = TaskEntry("induction", "induction_task", dict(batch=6, half_len=6))
# 2 models × 6 method points = 12 runs; "faithfulness" of the known circuit fails on the random model (it has none)
METHODS_12 = [
    MethodEntry("acdc", grid={"threshold": [0.01, 0.1]}, params={"ablation": "zero", "metric": "kl"}),
    MethodEntry("eap", params={"top_n": 8, "ablation": "zero"}),
    MethodEntry("eap-ig", params={"top_n": 8, "ig_steps": 4, "ablation": "zero"}),
    MethodEntry("faithfulness", params={"ablation": "zero"}),
    MethodEntry("activation_patching", params={"site": "z"}),
]
SWEEP_12 = Sweep([PLANTED, TINY], [INDUCTION], METHODS_12)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for this module: 2 CPUs, 127.0.0.1 only, no dashboard; shut down after the module."""
    pytest.importorskip("ray")
    import ray

    from circuits.sweep.runner import start_local_ray

    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    start_local_ray(num_cpus=2)
    assert ray._private.worker.global_worker.node.node_ip_address == "127.0.0.1"
    yield ray
    ray.shutdown()


def _results(table):
    return table[result_columns(table)].sort_values("key").reset_index(drop=True)


def test_grid_order_and_points():
    runs = Sweep([PLANTED], [INDUCTION], [MethodEntry("acdc", params={"mode": "exact"},
                                                      grid={"threshold": [0.1, 0.2], "metric": ["kl", "logprob"]})],
                 seeds=[3, 4]).runs()
    assert len(runs) == 8
    assert [(r.params["threshold"], r.params["metric"], r.seed) for r in runs[:4]] == [
        (0.1, "kl", 3), (0.1, "kl", 4), (0.1, "logprob", 3), (0.1, "logprob", 4)]
    assert all(r.params["mode"] == "exact" for r in runs)


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match=r"grid\['threshold'\]"):
        MethodEntry("acdc", grid={"threshold": 0.1}).points()
    with pytest.raises(ValueError, match="either fixed or swept"):
        MethodEntry("acdc", params={"threshold": 0.1}, grid={"threshold": [0.1]}).points()
    with pytest.raises(ValueError, match="seeds"):
        Sweep([PLANTED], [INDUCTION], METHODS_12, seeds=[])
    with pytest.raises(ValueError, match="names must be distinct"):
        Sweep([PLANTED, PLANTED], [INDUCTION], METHODS_12)
    with pytest.raises(ValueError, match="backend"):
        Sweep([PLANTED], [INDUCTION], METHODS_12).run("unused", backend="dask")


def test_unknown_method_or_parameter_is_recorded_not_raised(tmp_path):
    sweep = Sweep([PLANTED], [INDUCTION], [MethodEntry("acdc", params={"threshold": 0.1, "treshold": 1}),
                                           MethodEntry("no-such-method")])
    result = sweep.run(tmp_path, progress=False)
    errors = result.table["error"].tolist()
    assert result.n_failed == 2
    assert "unknown parameters ['treshold']" in errors[0]
    assert "unknown method 'no-such-method'" in errors[1]


def test_known_circuit_of_the_planted_model_is_what_acdc_finds():
    model = planted_induction(d_vocab=16, n_ctx=16)
    task = induction_task(6, 6, 16, seed=0)
    found = acdc(model, task, threshold=0.01, metric="kl", ablation="zero", progress=False).circuit
    known = known_circuit(model)
    assert known.n_edges == 7
    assert torch.equal(found.members, known.members)


def test_twelve_runs_in_process_and_on_ray_give_the_same_table(tmp_path, local_ray):
    here = SWEEP_12.run(tmp_path / "inprocess", progress=False, threads_per_run=1)
    there = SWEEP_12.run(tmp_path / "ray", backend="ray", progress=False, threads_per_run=1)
    assert len(here.table) == len(there.table) == 12
    assert (here.n_computed, there.n_computed) == (12, 12)
    assert here.n_failed == there.n_failed == 1  # the random model has no known circuit
    failed = here.table[here.table["status"] == "error"]
    assert failed["model"].tolist() == ["tiny"] and failed["method"].tolist() == ["faithfulness"]
    assert "has no known circuit" in failed["error"].iloc[0]
    assert (there.table["pid"] != os.getpid()).all() and (here.table["pid"] == os.getpid()).all()
    pd.testing.assert_frame_equal(_results(here.table), _results(there.table))
    planted = here.table[(here.table["model"] == "planted") & (here.table["method"] == "acdc")]
    assert planted["roc_auc"].tolist() == [1.0, 1.0] and planted["faithfulness"].tolist() == [1.0, 1.0]


def test_a_ray_worker_that_dies_is_retried_and_the_table_matches(tmp_path, local_ray):
    methods = [MethodEntry("eap-dies-once", params={"top_n": 6},
                           grid={"marker": [str(tmp_path / "died-a"), str(tmp_path / "died-b")]})]
    sweep = Sweep([PLANTED], [INDUCTION], methods, imports=["sweep_plugin"])
    there = sweep.run(tmp_path / "ray", backend="ray", progress=False, threads_per_run=1, max_retries=2)
    assert (tmp_path / "died-a").exists() and (tmp_path / "died-b").exists()  # each run's first worker died
    assert there.n_failed == 0 and (there.table["status"] == "ok").all()
    here = sweep.run(tmp_path / "inprocess", progress=False, threads_per_run=1)  # the markers exist: no death
    pd.testing.assert_frame_equal(_results(here.table), _results(there.table))


def test_a_corrupt_entry_is_recomputed_never_read(tmp_path):
    sweep = Sweep([PLANTED], [INDUCTION], [MethodEntry("eap", grid={"top_n": [4, 8]})])
    first = sweep.run(tmp_path, progress=False)
    store = Store(tmp_path)
    truncated, edited = (store.path(e["key"]) for e in first.entries)
    good = {p: p.read_bytes() for p in (truncated, edited)}
    truncated.write_bytes(good[truncated][: len(good[truncated]) // 2])  # a partial write
    entry = json.loads(good[edited])
    entry["metrics"]["faithfulness"] = 0.123  # valid JSON, wrong checksum
    edited.write_text(json.dumps(entry))
    assert store.read(first.entries[0]["key"]) is None and store.read(first.entries[1]["key"]) is None
    again = sweep.run(tmp_path, progress=False)
    assert (again.n_computed, again.n_reused) == (2, 0)
    assert all(store.read(e["key"]) is not None for e in again.entries)
    pd.testing.assert_frame_equal(_results(first.table), _results(again.table))
    third = sweep.run(tmp_path, progress=False)
    assert (third.n_computed, third.n_reused) == (0, 2)


def _write_entries(args: tuple[str, int]) -> None:
    root, worker = args
    store = Store(Path(root))
    for i in range(30):
        identity = {"run": i % 10}
        store.write({"key": run_key(identity), "identity": identity, "worker": worker, "blob": "x" * 20000})


def test_concurrent_writers_sharing_a_folder_do_not_clobber(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_write_entries, [(str(tmp_path), w) for w in range(4)])
    store = Store(tmp_path)
    keys = store.keys()
    assert len(keys) == 10
    assert all(store.read(k) is not None for k in keys)
    assert not [p for p in store.runs.iterdir() if p.name.startswith(".")]  # no temporary left behind


def _cli(toml: Path, results: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "circuits.sweep", str(toml), "--results", str(results),
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _valid_entries(store: Store) -> dict[str, bytes]:
    return {k: store.path(k).read_bytes() for k in store.keys() if store.read(k) is not None}


@pytest.mark.slow
def test_a_killed_sweep_restarted_finishes_every_run_exactly_once(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text(
        'seeds = [0, 1, 2]\nimports = ["sweep_plugin"]\n'
        '[[models]]\nname = "planted"\nbuilder = "planted_induction"\nparams = { d_vocab = 16, n_ctx = 16 }\n'
        '[[tasks]]\nname = "induction"\ngenerator = "induction_task"\nparams = { batch = 6, half_len = 6 }\n'
        '[[methods]]\nmethod = "slow-eap"\nparams = { sleep = 0.4 }\ngrid = { top_n = [4, 6, 8, 10] }\n')
    results, store = tmp_path / "results", Store(tmp_path / "results")
    proc = _cli(toml, results)
    deadline = time.time() + 120
    while len(_valid_entries(store)) < 3:
        assert proc.poll() is None, f"the sweep ended before it was killed: {proc.communicate()}"
        assert time.time() < deadline, "the sweep wrote fewer than 3 runs in 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _valid_entries(store)
    assert 3 <= len(before) < 12
    restarted = _cli(toml, results)
    out, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, err
    assert f"12 runs: computed {12 - len(before)}, reused {len(before)}, with an error 0" in out
    after = _valid_entries(store)
    assert len(after) == 12 and set(after) >= set(before)
    assert all(after[k] == before[k] for k in before)  # finished runs were not run or written again
    assert not [p for p in store.runs.iterdir() if p.name.startswith(".")]  # the killed writer's temporary is gone
    table = pd.read_parquet(results / "table.parquet")
    assert len(table) == 12 and table["key"].is_unique and (table["status"] == "ok").all()
    sweep, _ = load_toml(toml)
    assert sorted(table["key"]) == sorted(after)
    assert len(sweep.runs()) == 12


def test_toml_and_python_declare_the_same_runs(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text(
        'seeds = [0]\n[run]\nresults = "x"\n'
        '[[models]]\nname = "planted"\nbuilder = "planted_induction"\nparams = { d_vocab = 16, n_ctx = 16 }\n'
        '[[tasks]]\nname = "induction"\ngenerator = "induction_task"\nparams = { batch = 6, half_len = 6 }\n'
        '[[methods]]\nmethod = "acdc"\nparams = { ablation = "zero", metric = "kl" }\n'
        'grid = { threshold = [0.01, 0.1] }\n')
    sweep, options = load_toml(toml)
    assert options == {"results": "x"}
    assert [r.describe() for r in sweep.runs()] == [r.describe() for r in Sweep([PLANTED], [INDUCTION],
                                                                                 METHODS_12[:1]).runs()]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nname = "m"\nbuilder = "attn_only"\nparms = {}\n')
    with pytest.raises(ValueError, match="unknown keys \\['parms'\\]"):
        load_toml(bad)


def test_the_key_follows_the_weights_not_the_name(tmp_path):
    a = Sweep([ModelEntry("m", builder="attn_only", params={**TINY.params, "seed": 1})], [INDUCTION],
              [MethodEntry("eap", params={"top_n": 4})])
    b = Sweep([ModelEntry("m", builder="attn_only", params={**TINY.params, "seed": 2})], [INDUCTION],
              [MethodEntry("eap", params={"top_n": 4})])
    ra, rb = a.run(tmp_path, progress=False), b.run(tmp_path, progress=False)
    assert ra.entries[0]["identity"]["model_digest"] != rb.entries[0]["identity"]["model_digest"]
    assert rb.n_computed == 1 and len(Store(tmp_path).keys()) == 2


def test_table_saves_and_figures_draw(tmp_path):
    import viz.sweep

    sweep = Sweep([PLANTED], [INDUCTION], [
        MethodEntry("acdc", grid={"threshold": [0.003, 0.03, 0.3]}, params={"ablation": "zero", "metric": "kl"}),
        MethodEntry("eap", grid={"top_n": [2, 7, 20]}, params={"ablation": "zero"})])
    result = sweep.run(tmp_path, progress=False)
    for name in ("t.parquet", "t.csv"):
        save_table(result.table, tmp_path / name)
    back = pd.read_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(back, result.table)
    figures = viz.sweep.sweep_figures(result.table, result.entries)
    assert set(figures) == {"faithfulness", "roc", "threshold"}
    faith = {t.name: list(t.x) for t in figures["faithfulness"].data}
    assert faith["eap"] == [2, 7, 20]
    roc_names = [t.name for t in figures["roc"].data]
    assert sum(n.startswith("eap") for n in roc_names) == 1  # top_n does not change EAP's scores: one curve
    threshold = next(t for t in figures["threshold"].data if t.name == "acdc")
    assert list(threshold.x) == [0.003, 0.03, 0.3] and list(threshold.y) == sorted(threshold.y, reverse=True)

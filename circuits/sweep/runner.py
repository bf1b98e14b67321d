"""Running a sweep: keys, the cache check, in-process or Ray execution, and the result.

Every run is keyed before anything runs: the driver builds each model and task once (cheap next to the
methods) for the digests of their weights and data. Runs with a valid entry in the results folder are
reused; the others run in-process (a tqdm bar over runs) or as Ray tasks, and each is written to the
folder the moment it finishes, by whichever process ran it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import circuits
from circuits.digest import task_digest
from circuits.sweep.build import build_model, build_task, import_modules, known_circuit
from circuits.sweep.grid import Run, Sweep
from circuits.sweep.methods import MethodOutput, adapter
from circuits.sweep.store import Store, run_key

WORKER_DIED = "worker_died"
_NAMED_METRICS = ("kl", "logit_diff", "logprob")


@dataclass(frozen=True)
class Keyed:
    """A run with its identity (what its key hashes) and key."""

    run: Run
    identity: dict[str, Any]
    key: str


@dataclass
class SweepResult:
    """The entries of a sweep's runs, in grid order, and what this call did: `n_computed` runs run now,
    `n_reused` found in the folder, `n_failed` recorded with an error. `table` is the tidy DataFrame
    (one row per run, see `circuits.sweep.table`). Example: `result.table.groupby("method").faithfulness.max()`
    """

    root: Path
    entries: list[dict[str, Any]]
    n_computed: int = 0
    n_reused: int = 0
    n_failed: int = 0
    _table: Any = field(default=None, repr=False)

    @property
    def table(self):
        if self._table is None:
            from circuits.sweep.table import tidy_table

            self._table = tidy_table(self.entries)
        return self._table

    def circuit(self, key: str):
        """The circuit of the run with key `key` (a `Circuit`), or None if it has none."""
        from circuits.graph.circuit import Circuit

        entry = next(e for e in self.entries if e["key"] == key)
        return None if entry.get("circuit") is None else Circuit.from_json(entry["circuit"])


def versions() -> dict[str, str]:
    """The versions that are part of every run's key."""
    from importlib.metadata import version

    return {"circuits": circuits.__version__, "torch": torch.__version__,
            "transformer_lens": version("transformer_lens")}


def key_runs(runs: Sequence[Run]) -> list[Keyed]:
    """Each run's identity (its description, the weights' and the task data's digests, the versions) and key."""
    v = versions()
    out = []
    for run in runs:
        model, model_digest = build_model(run.model)
        task = build_task(run.task, model, run.seed)
        identity = {"run": run.describe(), "model_digest": model_digest, "task_digest": task_digest(task),
                    "versions": v}
        out.append(Keyed(run, identity, run_key(identity)))
    return out


def run_sweep(
    sweep: Sweep,
    results: str | Path,
    *,
    backend: str = "inprocess",  # "inprocess" or "ray", checked below with a clear error
    address: str | None = None,
    num_cpus: int | None = None,
    threads_per_run: int | None = None,
    max_retries: int = 3,
    retry_errors: bool = False,
    progress: bool = True,
) -> SweepResult:
    """Run every run of `sweep` that has no valid entry in the folder `results`, and return them all.

    `backend="inprocess"` (the default) runs them here, one after another, behind a tqdm bar (`progress=False`
    silences it). `backend="ray"` runs each as a Ray task (`num_cpus=threads_per_run or 1`): on the cluster at
    `address`, or on a local Ray started here on 127.0.0.1 with `num_cpus` CPUs (all by default), no
    dashboard, no usage reporting, shut down at the end; a Ray already initialised in this process is used
    as it is. A Ray worker that dies mid-run is retried up to `max_retries` times. `threads_per_run` sets
    torch's threads for each run (in-process and in workers alike, so both give the same floats). A run that
    raises is recorded with its error and the sweep goes on; `retry_errors=True` runs recorded errors again.
    Example: `run_sweep(sweep, "out/sweep", backend="ray", num_cpus=2).table`
    """
    if backend not in ("inprocess", "ray"):
        raise ValueError(f"backend: expected 'inprocess' or 'ray', got {backend!r}")
    if address is not None and backend != "ray":
        raise ValueError("address: only with backend='ray'")
    if threads_per_run is not None and (not isinstance(threads_per_run, int) or threads_per_run < 1):
        raise ValueError(f"threads_per_run: expected a positive integer or None, got {threads_per_run!r}")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries: expected an integer >= 0, got {max_retries!r}")
    import_modules(sweep.imports)
    store = Store(Path(results))
    store.remove_stale_temporaries()
    keyed = key_runs(sweep.runs())
    pending, seen = [], set()
    for k in keyed:
        if k.key in seen:
            continue
        seen.add(k.key)
        entry = store.read(k.key)
        if entry is None or (entry["status"] == "error" and (retry_errors or entry.get("error_kind") == WORKER_DIED)):
            pending.append(k)
    writer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if backend == "inprocess":
        for k in tqdm(pending, desc="sweep", unit="run", disable=not progress):
            execute(k, store.root, writer, threads_per_run)
    else:
        _run_on_ray(pending, store, writer, sweep.imports, address, num_cpus, threads_per_run, max_retries,
                    progress)
    entries = []
    for k in keyed:
        entry = store.read(k.key)
        if entry is None:  # written a moment ago: only a concurrent corruption of the folder gets here
            raise RuntimeError(f"results: the entry of run {k.run.label} ({k.key}) is missing or corrupt after "
                               f"its run")
        entries.append(entry)
    computed = {k.key for k in pending}
    return SweepResult(store.root, entries, n_computed=len(computed), n_reused=len(seen) - len(computed),
                       n_failed=sum(e["status"] == "error" for e in {e["key"]: e for e in entries}.values()))


def execute(keyed: Keyed, root: str | Path, writer: str, threads: int | None) -> str:
    """Run one grid point and write its entry (an error entry if it raised); returns its status."""
    run = keyed.run
    entry = _entry(keyed, writer)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with _torch_threads(threads), PeakRSS() as peak:
        try:
            model, _ = build_model(run.model)
            task = build_task(run.task, model, run.seed)
            timings["build_s"] = time.perf_counter() - start
            torch.manual_seed(run.seed)
            t = time.perf_counter()
            out = adapter(run.method)(model, task, run.params)
            timings["method_s"] = time.perf_counter() - t
            t = time.perf_counter()
            entry.update(score_output(model, task, out))
            timings["score_s"] = time.perf_counter() - t
        except Exception as err:
            entry.update(status="error", error=f"{type(err).__name__}: {err}", error_kind="exception",
                         traceback=traceback.format_exc())
    timings["total_s"] = time.perf_counter() - start
    entry.update(timings=timings, peak_rss_mb=peak.mb, finished_at=time.time())
    Store(Path(root)).write(entry)
    return entry["status"]


def score_output(model, task, out: MethodOutput) -> dict[str, Any]:
    """The entry fields of a method's output: its circuit (JSON), scores and metrics, plus for a circuit its
    size, faithfulness (with the circuit's own ablation and named metric) and ROC against a known circuit."""
    from circuits.graph import faithfulness, roc

    metrics = dict(out.metrics)
    fields: dict[str, Any] = {"scores": out.scores, "circuit": None, "roc": None}
    c = out.circuit
    if c is not None:
        metric = c.attrs.get("metric")
        f = faithfulness(model, task, c, metric=metric if metric in _NAMED_METRICS else None)
        metrics.update(n_edges=c.n_edges, n_edges_total=int(c.graph.valid.sum()), faithfulness=f.normalised,
                       faithfulness_metric=f.info["metric"], ablation=f.info["ablation"])
        known = known_circuit(model)
        if known is not None and bool(c.scores[c.graph.valid].isfinite().any()):
            r = roc(c, known, c.graph.valid)
            metrics["roc_auc"] = r.auc
            fields["roc"] = {"fpr": r.fpr.tolist(), "tpr": r.tpr.tolist(), "auc": r.auc}
        fields["circuit"] = c.to_json()
    fields["metrics"] = metrics
    return fields


class PeakRSS:
    """The peak resident memory of this process during a block, in MiB (Linux: VmHWM, reset on entry by
    writing 5 to /proc/self/clear_refs; elsewhere the process's lifetime peak from getrusage)."""

    mb: float = float("nan")

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._source = "vmhwm"
        except OSError:
            self._source = "rusage"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._source == "vmhwm":
            with open("/proc/self/status") as f:
                line = next(x for x in f if x.startswith("VmHWM:"))
            self.mb = int(line.split()[1]) / 1024
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


@contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _ray_task(keyed: Keyed, root: str, writer: str, threads: int | None, imports: Sequence[str],
              paths: Sequence[str]) -> str:
    """What a Ray worker runs: import the registering modules, then `execute`."""
    import_modules(imports, paths)
    return execute(keyed, root, writer, threads)


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray on 127.0.0.1 only: no dashboard, no usage reporting, logs not echoed here.

    Ray's single-machine mode (its `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) is what keeps every address on
    loopback; Ray reads that variable when it is imported, so where Ray was imported already the constant it
    set is switched for the start. Both are restored afterwards; the processes Ray started keep them.
    Raises RuntimeError (after shutting Ray down) if the node came up on another address."""
    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    import ray
    from ray._private import ray_constants

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        context = ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                           log_to_driver=False, configure_logging=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    address = context.address_info.get("node_ip_address")
    if address != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"backend='ray': the local Ray started on {address}, not on 127.0.0.1")


def _run_on_ray(pending: list[Keyed], store: Store, writer: str, imports: Sequence[str], address: str | None,
                num_cpus: int | None, threads: int | None, max_retries: int, progress: bool) -> None:
    try:
        import ray
    except ModuleNotFoundError:
        raise ModuleNotFoundError("backend='ray' needs Ray: pip install 'circuits[sweep]'") from None
    started = False
    if not ray.is_initialized():
        if address is None:
            start_local_ray(num_cpus)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        started = True
    try:
        paths = [os.getcwd() if p == "" else p for p in sys.path if p == "" or os.path.isdir(p)]
        task = ray.remote(_ray_task).options(num_cpus=threads or 1, max_retries=max_retries, retry_exceptions=False)
        refs = {task.remote(k, str(store.root), writer, threads, tuple(imports), paths): k for k in pending}
        with tqdm(total=len(refs), desc="sweep (ray)", unit="run", disable=not progress) as bar:
            waiting = list(refs)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as err:
                        _record_lost(refs[ref], store, writer, err, max_retries)
                    bar.update(1)
    finally:
        if started:
            ray.shutdown()


def _record_lost(k: Keyed, store: Store, writer: str, err: Exception, max_retries: int) -> None:
    """An error entry for a run Ray could not finish: its worker died on every try (recomputed by the next
    sweep), or the task failed outside the run (importing the registering modules, say)."""
    if store.read(k.key) is not None:  # written before the worker died
        return
    import ray

    died = isinstance(err, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError))
    message = f"the run's worker died {max_retries + 1} times: {err}" if died else str(err)
    store.write(_entry(k, writer, status="error", error=f"{type(err).__name__}: {message}",
                       error_kind=WORKER_DIED if died else "exception"))


def _entry(k: Keyed, writer: str, **fields: Any) -> dict[str, Any]:
    """An entry's fields with their defaults (a finished run with nothing recorded yet), then `fields`."""
    return {"key": k.key, "identity": k.identity, "label": k.run.label, "status": "ok", "error": None,
            "error_kind": None, "traceback": None, "metrics": {}, "circuit": None, "scores": None, "roc": None,
            "timings": {}, "peak_rss_mb": float("nan"), "host": socket.gethostname(), "pid": os.getpid(),
            "writer": writer, "finished_at": time.time(), **fields}

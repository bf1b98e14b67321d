"""ACDC's checkpoint: a run killed for real (SIGKILL) and restarted finishes with the uninterrupted run's circuit
and recomputes no destination the checkpoint records; a checkpoint of another run, or a damaged one, is refused."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from circuits.graph import acdc
from circuits.models.zoo import available, load_pretrained
from circuits.tasks import induction_task

pytestmark = pytest.mark.skipif("attn2l-induction" not in available(), reason="zoo checkpoint not built")
ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.005
acdc_module = importlib.import_module("circuits.graph.acdc")  # the package exports the function `acdc`

# the child slows each evaluated destination down (a sleep after it) so that the parent can kill it mid-walk
CHILD = textwrap.dedent(f"""
    import importlib, sys, time
    from circuits.graph import acdc
    from circuits.models.zoo import load_pretrained
    from circuits.tasks import induction_task
    walk = importlib.import_module("circuits.graph.acdc")._Walk
    evaluate = walk.exact_destination
    def slow(self, d):
        evaluate(self, d)
        time.sleep(0.4)
    walk.exact_destination = slow
    model, task = load_pretrained("attn2l-induction"), induction_task(8, 10, 64, seed=0)
    acdc(model, task, threshold={THRESHOLD}, metric="kl", checkpoint=sys.argv[1], progress=False)
    print("finished")
""")


@pytest.fixture(scope="module")
def model():
    return load_pretrained("attn2l-induction")


@pytest.fixture(scope="module")
def task():
    return induction_task(8, 10, 64, seed=0)


@pytest.fixture(scope="module")
def uninterrupted(model, task):
    return acdc(model, task, threshold=THRESHOLD, metric="kl", progress=False)


def _done(path: Path) -> int:
    try:
        return json.loads(path.read_text())["state"]["done"]
    except (OSError, ValueError, KeyError):
        return 0


def _walked(monkeypatch) -> list[int]:
    """Record the destinations whose candidates are evaluated."""
    walked: list[int] = []
    evaluate = acdc_module._Walk.exact_destination

    def spy(self, d):
        walked.append(d)
        return evaluate(self, d)

    monkeypatch.setattr(acdc_module._Walk, "exact_destination", spy)
    return walked


def test_a_killed_run_resumes_to_the_same_circuit_and_recomputes_no_finished_destination(
        tmp_path, model, task, uninterrupted, monkeypatch):
    path = tmp_path / "acdc.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _done(path) < 8 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        out, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, (child.returncode, out, err[-2000:])
    n_destinations = uninterrupted.circuit.graph.n_destinations
    done = _done(path)
    assert 8 <= done < n_destinations  # killed mid-walk, after some destinations were written
    assert not list(tmp_path.glob(".*.tmp"))  # what a kill mid-write would leave is never the checkpoint

    walked = _walked(monkeypatch)
    resumed = acdc(model, task, threshold=THRESHOLD, metric="kl", checkpoint=path, progress=False)
    order = list(range(n_destinations - 1, -1, -1))  # the walk's order, logits first
    assert resumed.info["resumed_after"] == done
    assert walked and set(walked) <= set(order[done:])  # no destination the checkpoint records is recomputed
    assert torch.equal(resumed.circuit.members, uninterrupted.circuit.members)
    # the resumed circuit's run is recomputed by one patched forward: equal to the incremental one to float
    # rounding, which the scores (KL differences of order 1e-2) carry at the 1e-6 level
    tested = ~uninterrupted.values.isnan()
    assert torch.equal(~resumed.values.isnan(), tested)
    torch.testing.assert_close(resumed.values[tested], uninterrupted.values[tested], rtol=1e-4, atol=1e-6)

    # the finished checkpoint: a rerun evaluates nothing and returns the same circuit
    walked.clear()
    again = acdc(model, task, threshold=THRESHOLD, metric="kl", checkpoint=path, progress=False)
    assert walked == [] and again.info["resumed_after"] == n_destinations
    assert torch.equal(again.circuit.members, resumed.circuit.members)
    assert torch.equal(again.values.nan_to_num(7.0), resumed.values.nan_to_num(7.0))


def test_a_checkpoint_of_another_run_or_a_damaged_one_is_refused(tmp_path, model, task, uninterrupted):
    path = tmp_path / "acdc.json"
    first = acdc(model, task, threshold=THRESHOLD, metric="kl", checkpoint=path, progress=False)
    assert torch.equal(first.circuit.members, uninterrupted.circuit.members)
    assert first.info["resumed_after"] == 0
    with pytest.raises(ValueError, match="belongs to another run.*threshold"):
        acdc(model, task, threshold=2 * THRESHOLD, metric="kl", checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="belongs to another run.*task_sha256"):
        acdc(model, induction_task(8, 10, 64, seed=1), threshold=THRESHOLD, metric="kl", checkpoint=path,
             progress=False)
    other = load_pretrained("attn2l-induction")
    with torch.no_grad():
        next(other.parameters()).mul_(1.0 + 1e-6)  # one weight tensor scaled by a rounding-sized factor
    with pytest.raises(ValueError, match="belongs to another run.*weights_sha256"):
        acdc(other, task, threshold=THRESHOLD, metric="kl", checkpoint=path, progress=False)
    # a changed chunk size is the same run (it changes the cost, not a decision)
    same = acdc(model, task, threshold=THRESHOLD, metric="kl", checkpoint=path, chunk_size=1, progress=False)
    assert torch.equal(same.circuit.members, first.circuit.members)
    text = path.read_text()
    path.write_text(text.replace('"loss": ', '"loss": 1', 1))
    with pytest.raises(ValueError, match="checksum"):
        acdc(model, task, threshold=THRESHOLD, metric="kl", checkpoint=path, progress=False)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="unreadable"):
        acdc(model, task, threshold=THRESHOLD, metric="kl", checkpoint=path, progress=False)


def test_a_walk_stopped_after_its_mlps_resumes_with_their_shared_guesses(tmp_path, monkeypatch):
    """On a model with MLPs (whose destinations share one kind of first guesses, `_Walk.kind`), a walk stopped
    after 20 destinations resumes from the checkpoint, guesses included, to the uninterrupted run's circuit and
    scores."""
    from circuits.models import ModelSpec, build

    model = build(ModelSpec(3, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=3)
    task = induction_task(8, 9, 24, seed=1)
    uninterrupted = acdc(model, task, threshold=1e-4, metric="kl", progress=False)
    evaluate, count = acdc_module._Walk.exact_destination, [0]

    def stop_after_20(self, d):
        count[0] += 1
        if count[0] > 20:
            raise KeyboardInterrupt
        evaluate(self, d)

    path = tmp_path / "acdc.json"
    monkeypatch.setattr(acdc_module._Walk, "exact_destination", stop_after_20)
    with pytest.raises(KeyboardInterrupt):
        acdc(model, task, threshold=1e-4, metric="kl", checkpoint=path, progress=False)
    monkeypatch.setattr(acdc_module._Walk, "exact_destination", evaluate)
    kinds = {tuple(k[:2]) for k in json.loads(path.read_text())["state"]["decided"]}
    assert (None, "mlp") in kinds
    resumed = acdc(model, task, threshold=1e-4, metric="kl", checkpoint=path, progress=False)
    assert resumed.info["resumed_after"] == 20
    assert torch.equal(resumed.circuit.members, uninterrupted.circuit.members)
    torch.testing.assert_close(resumed.values, uninterrupted.values, equal_nan=True, rtol=0, atol=1e-6)

"""settle_allocator: after it, the memory of a patching call's chunks is reused, not faulted in again (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PATCHING = """
import resource, sys, torch
import circuits.allocator
from circuits.activations import activation_patch
from circuits.models.zoo import load_pretrained
from circuits.tasks import induction_task

if sys.argv[1] == "plain":
    circuits.allocator._settled = True  # as if settled already: glibc's thresholds stay where they are
model, task = load_pretrained("attn2l-induction"), induction_task(32, 17, 64, seed=0)
for _ in range(2):
    activation_patch(model, task, "resid_pre", progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    activation_patch(model, task, "resid_pre", progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PATCHING, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's adaptive thresholds only")
def test_settled_allocator_reuses_freed_memory():
    plain, settled = _faults("plain"), _faults("settled")
    assert plain > 8000  # measured 24,000-27,000: each call gives its chunks' memory back and faults it in again
    assert settled < plain / 10  # measured 0-700

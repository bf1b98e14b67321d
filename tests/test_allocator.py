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
for site in ("resid_pre", "z"):
    activation_patch(model, task, site, progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for site in ("resid_pre", "z", "resid_pre", "z"):
    activation_patch(model, task, site, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PATCHING, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's adaptive thresholds only")
def test_settled_allocator_reuses_freed_memory():
    plain, settled = _faults("plain"), _faults("settled")
    assert plain > 8000  # measured 14,500-36,000: the calls give their chunks' memory back and fault it in again
    assert settled < 3000  # measured 530-1,300

"""settle_allocator: after it, the memory of a patching call's chunks is reused, not faulted in again; heap_reuse:
within it, blocks above 32 MiB are reused too, and leaving it returns their memory to the system (glibc)."""

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


_BLOCKS = """
import resource, sys, torch
import circuits.allocator
from circuits.allocator import heap_reuse

def faults_of_blocks(n=8, mib=96):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(mib * 2**18)  # filled, so every page is touched, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20

plain = faults_of_blocks()
with heap_reuse():
    with heap_reuse():  # nested: the inner exit must not restore the thresholds
        pass
    faults_of_blocks()  # the heap grows to hold the blocks (the first pass still faults most pages in)
    lifted = faults_of_blocks()
    held = rss_mib()
print(plain, lifted, circuits.allocator._depth, held - rss_mib())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_heap_reuse_keeps_large_blocks_then_returns_them():
    out = subprocess.run([sys.executable, "-c", _BLOCKS], capture_output=True, text=True, check=True)
    plain, lifted, depth, released = (float(v) for v in out.stdout.split())
    pages = 8 * 96 * 2**20 / 4096  # eight 96 MiB blocks
    assert plain > 0.9 * pages  # above 32 MiB each block is mapped afresh: every page faulted each time
    assert lifted < 0.5 * pages  # within the scope, once the heap has grown, its memory serves the blocks (measured
    # 0-25% of their pages faulted, by where the heap could grow)
    assert depth == 0  # the outermost exit restored the thresholds (the inner one did not)
    assert released > 64  # leaving the scope returned the block it kept (96 MiB) to the system

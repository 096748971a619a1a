"""dynconv.malloc: freed memory is reused, so a large tensor allocated again costs no page faults."""
import platform
import subprocess
import sys

import pytest

from dynconv.malloc import reuse_freed_memory

# A loop that allocates, fills and frees a 256 MiB tensor, as a training step does its per-sample kernels:
# the minor page faults of each round. The first rounds may grow the heap (small allocations in between
# fragment it), then it holds room for the tensor.
SCRIPT = """
import resource, sys, torch
from dynconv.malloc import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[5:]))
"""
PAGES = 5 * 256 * 2**20 // 4096


def _faults(mode: str):
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    applied, faults = done.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    _, system_faults = _faults("system")
    applied, reuse_faults = _faults("reuse")
    assert applied
    assert system_faults > PAGES // 2  # glibc unmapped each tensor: every page faulted in again
    assert reuse_faults < PAGES // 20


def test_calling_it_again_is_harmless():
    assert reuse_freed_memory() == reuse_freed_memory()

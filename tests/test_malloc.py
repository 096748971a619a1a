"""dynconv.malloc: freed memory is reused, so a large tensor allocated again costs no page faults."""
import platform
import subprocess
import sys

import pytest

from dynconv import malloc
from dynconv.malloc import reuse_freed_memory

# A loop that allocates, fills and frees a 256 MiB tensor, as a training step does its per-sample kernels:
# the minor page faults of each round. The first rounds may grow the heap (small allocations in between
# fragment it), then it holds room for the tensor.
SCRIPT = """
import resource, sys, torch
from dynconv.malloc import reuse_freed_memory
applied = {"reuse": reuse_freed_memory, "twice": lambda: reuse_freed_memory() and reuse_freed_memory(),
           "system": lambda: False}[sys.argv[1]]()
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


class _Libc:
    """Records ``mallopt`` calls instead of changing this test process's allocator."""

    def __init__(self, result: int = 1) -> None:
        self.calls, self.result = [], result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def _fake_glibc(monkeypatch, libc: _Libc) -> None:
    monkeypatch.setattr(malloc, "_applied", False)
    monkeypatch.setattr(malloc.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda name: libc)


def test_calling_it_again_is_harmless(monkeypatch):
    """A second call reports the setting still in effect and sets nothing else (mallopt(3): M_TRIM_THRESHOLD
    is -1, M_MMAP_MAX -4 in glibc's malloc.h)."""
    libc = _Libc()
    _fake_glibc(monkeypatch, libc)
    assert reuse_freed_memory() is True
    first = list(libc.calls)
    assert first == [(-1, 2**31 - 1), (-4, 0)]  # the trim threshold before mmap is turned off
    assert reuse_freed_memory() is True and reuse_freed_memory("cpu") is True
    assert set(libc.calls) == set(first)
    # where mallopt refuses, every call says it is not in effect
    refused = _Libc(result=0)
    _fake_glibc(monkeypatch, refused)
    assert reuse_freed_memory() is False and reuse_freed_memory() is False
    # an accelerator run changes nothing
    _fake_glibc(monkeypatch, libc := _Libc())
    assert reuse_freed_memory("meta") is False and libc.calls == []


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_a_second_call_keeps_freed_memory_reused():
    applied, faults = _faults("twice")
    assert applied
    assert faults < PAGES // 20

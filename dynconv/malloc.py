"""Keep freed CPU memory in the process for reuse, instead of returning it to the OS after every step.

PyTorch's CPU tensors come from ``malloc``. glibc serves a request of over 32 MiB (its largest dynamic
mmap threshold) with fresh ``mmap`` pages and unmaps them on ``free``, so every such tensor costs one page
fault per 4 KiB the first time it is written, every step. A dynamic layer's per-sample kernels are
``B`` times its weights (151 MB for one 512x512 3x3 conv of ResNet18 at batch 16): measured on 2 CPU
cores, mixing them took 46 ms with fresh pages and 8 ms with reused ones, and ResNet18 training steps
with DY-Conv 4x, ODConv 4x and KernelWarehouse 1x got 23-25% faster (the static one 2%;
``results/system_malloc/bench_cpu.md`` against ``results/bench_cpu.md``).

:func:`reuse_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (every allocation from the heap, where freed
memory is reused) and ``M_TRIM_THRESHOLD`` to its maximum (the heap is not shrunk after a free). The
process's memory then stays at its peak rather than falling between steps. It is the allocator tuning
Intel's PyTorch performance guide reaches with jemalloc / tcmalloc, done without preloading a library.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Union

import torch

# mallopt(3) parameter numbers in glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1

_applied = False


def reuse_freed_memory(device: Union[torch.device, str] = "cpu") -> bool:
    """Make glibc's malloc keep and reuse freed memory for the rest of the process (see the module
    docstring), for a run on ``device``: nothing is changed for an accelerator, whose tensors do not
    come from ``malloc``. Returns whether it is in effect: ``False`` also where the C library is not
    glibc (macOS, musl, Windows); with a preloaded jemalloc / tcmalloc the call has no effect."""
    global _applied
    if _applied:
        return True
    if (torch.device(device).type != "cpu" or platform.system() != "Linux"
            or platform.libc_ver()[0] != "glibc"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # trim first: with M_MMAP_MAX 0 and the default threshold, a large free would still shrink the heap
    _applied = bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
    return _applied

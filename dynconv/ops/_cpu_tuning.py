"""Every measured CPU threshold and cost model of :mod:`dynconv.ops`, each next to what measures it.

The layers state their math; the hot paths (:mod:`~dynconv.ops.functional`, :mod:`~dynconv.ops._matmul`,
:mod:`~dynconv.ops._cells`, :mod:`~dynconv.ops._unfolded`, DGC's sparse path, IC-Conv's pack planner) read
their tuning from here, at call time (``_cpu_tuning.NAME``, never ``from ... import NAME``), so that a test
or a benchmark may patch one value and see its effect. The numbers were fitted on a 2-core x86 CPU
(oneDNN fp32); on GPUs the thresholds that depend on the device say so and do not apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# --- per-sample convolution path (functional.choose_path) -------------------------------------------------

# Output pixels up to which the batched matmul over the unfolded input beats the grouped convolution (the
# batch folded into the groups) for a kxk per-sample kernel, on CPU only. Measured forward + backward with
# ResNet18's shapes at batch 16: results/per_sample_paths_cpu.md (scripts/bench_conv_paths.py). At 14x14
# outputs (196 pixels) the two tie or the matmul wins; at 28x28 (784) the grouped conv wins.
MATMUL_MAX_PIXELS = 256

# --- training memory: how much is formed at once on the matmul path ---------------------------------------

# The most bytes of per-sample kernels (or of their gradient) the mixed-kernel matmul forms at once
# (_matmul._MixedMatmul: a slice of output channels at a time), and of KernelWarehouse cells
# (_cells._MixedCellMatmul: a chunk of mixtures at a time). The training-memory table of
# results/bench_cpu.md (scripts/bench.py --tables memory) is measured with it; tests/test_memory_floor.py
# checks what it saves.
MIX_CHUNK_BYTES = 16 * 2**20

# The most bytes of unfolded input (per chunk of samples) the matmul path's backward forms at once
# (_unfolded.SampleChunkedMatmul). Same table (results/bench_cpu.md, memory), tests/ops/test_unfolded_backward.py.
UNFOLD_CHUNK_BYTES = 8 * 2**20


def cell_mixtures_per_chunk(mixtures: int, batch: int, num_cells: int, bytes_per_mixture: int) -> int:
    """How many KernelWarehouse mixtures :class:`~dynconv.ops._cells._MixedCellMatmul` mixes at once.

    At most :data:`MIX_CHUNK_BYTES` of cells, but never more than ``mixtures * batch / num_cells`` chunks: each
    chunk reads the whole warehouse, so more chunks would read the bank more often than the cells would be
    written and read whole. KW 4x ResNet18 layer4 (9 x 16 mixtures of a 108-cell warehouse at batch 16): one
    chunk; 16 MiB chunks there trained 40% slower (results/bench_cpu.md, memory table, KW rows).
    """
    most_chunks = max(1, (mixtures * batch) // num_cells)
    return max(1, MIX_CHUNK_BYTES // max(1, bytes_per_mixture), -(-mixtures // most_chunks))


# --- DGC's eval-only sparse path (dgc.DGCConv2d.forward_sparse) ---------------------------------------------

# Output pixels up to which the sparse path's unfold + batched matmul beats oneDNN's grouped convolution of
# the gathered channels (1x1 kernels always take the matmul): scripts/bench_dgc.py, per-layer table of
# results/dgc_sparse_cpu.md.
DGC_SPARSE_MATMUL_MAX_PIXELS = 256

# Channels per head rounded up to this on the sparse path, per device type: oneDNN's CPU kernels work in
# blocks of 16 fp32 channels (AVX-512), where a grouped convolution of 29 channels per group ran twice as
# slow as one of 32 (scripts/bench_dgc.py; results/dgc_sparse_cpu.md is measured with the block).
DGC_CHANNEL_BLOCK = {"cpu": 16}

# --- IC-Conv's pack planner (_icconv_plan.plan_members) -------------------------------------------------

# fp32 lanes of oneDNN's CPU kernels (16 with AVX-512, 8 with AVX2), read at import: torch.compile cannot
# trace the string the capability query returns
SIMD_BLOCK = 16 if "512" in torch.backends.cpu.get_cpu_capability() else 8


@dataclass(frozen=True)
class ConvCost:
    """Predicted milliseconds of one convolution call with ``n`` output channels, ``taps`` kernel taps,
    ``reduction`` input channels per group and ``out_pixels`` output pixels (batch included)::

        overhead + unit * ceil(n / block) * taps * reduction * out_pixels  [+ embed * n * reduction * taps]

    ``block`` is the number of output channels the backend computes together; the bracketed term, for
    packs of several members only, builds the zero-filled packed kernel. A merge must save ``margin``
    of the pair's predicted time, so near-ties the model cannot resolve stay apart.
    """

    overhead: float
    unit: float
    embed: float
    block: int
    margin: float = 0.1

    def __call__(self, n: int, taps: int, reduction: int, out_pixels: int, packed: bool) -> float:
        t = self.overhead + self.unit * math.ceil(n / self.block) * taps * reduction * out_pixels
        return t + (self.embed * n * reduction * taps if packed else 0.0)


def cpu_conv_cost(training: bool = False) -> ConvCost:
    """oneDNN fp32 on CPU, fitted (relative least squares) on single convolutions of the ic_resnet50
    layer shapes at batch 1 and 16 by ``scripts/bench_icconv.py`` (results/icconv_fused_cpu.md);
    ``training``: forward + backward.

    oneDNN computes output channels in SIMD-width blocks (16 fp32 lanes with AVX-512, 8 with AVX2), in
    the backward pass too: a member with 1..16 channels costs as much as one with 16, which is what
    makes a loop of narrow members slow and packing them into one wider conv with a few zero taps
    worthwhile. ``embed`` is the zero-filled packed kernel and its gradient (packed kernels are cached
    when autograd is off).
    """
    block = SIMD_BLOCK
    if training:
        return ConvCost(overhead=0.45, unit=2.8e-7, embed=1.5e-6, block=block)
    return ConvCost(overhead=0.10, unit=8.3e-8, embed=0.0, block=block)  # packed kernels are cached

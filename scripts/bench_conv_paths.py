"""The per-sample convolution's paths against a static convolution of the same shape, per ResNet18 layer shape.

Measures what :data:`dynconv.ops._cpu_tuning.MATMUL_MAX_PIXELS` rests on: for each shape, forward + backward
of ``per_sample_conv2d`` with ``B`` per-sample kernels on the grouped path (the batch folded into the groups)
and on the matmul path (one batched matmul over the unfolded input), each as a ratio to one ``F.conv2d``
with a shared kernel; and the matmul path's own input-gradient product (``_PerSampleMatmul``) against
autograd's ``torch.matmul`` backward on the 7x7 layer. Round-robin medians. Writes
``results/per_sample_paths_<device>.md``.

    python scripts/bench_conv_paths.py [--batch 16] [--threads 2] [--repeats 10]
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.benchmark import interleaved_medians, machine_summary  # noqa: E402
from dynconv.ops._matmul import _PerSampleMatmul  # noqa: E402
from dynconv.ops.functional import per_sample_conv2d  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
# (channels, input size, kernel, stride): ResNet18's per-stage 3x3 shapes, its strided 14x14 one, a 1x1
SHAPES = [(64, 56, 3, 1), (128, 28, 3, 1), (256, 28, 3, 2), (256, 14, 3, 1), (512, 7, 3, 1), (256, 14, 1, 1)]


def train_step(fn, *leaves):
    def step():
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    return step


def shape_row(batch: int, channels: int, size: int, kernel: int, stride: int, repeats: int):
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    shared = torch.randn(channels, channels, kernel, kernel, requires_grad=True)
    kernels = torch.randn(batch, channels, channels, kernel, kernel, requires_grad=True)
    geometry = dict(stride=(stride, stride), padding=(kernel // 2,) * 2)
    cases = {"static": train_step(lambda: F.conv2d(x, shared, None, **geometry), x, shared)}
    for path in ("grouped", "matmul"):
        cases[path] = train_step(lambda p=path: per_sample_conv2d(x, kernels, None, **geometry, path=p), x, kernels)
    times = interleaved_medians(cases, repeats, 2)
    out = size // stride
    return f"| {out}x{out} | {kernel}x{kernel} | {channels} | " + " | ".join(
        f"{times[p] / times['static']:.2f}" for p in ("grouped", "matmul")) + " |"


def matmul_backward_row(batch: int, repeats: int) -> str:
    kernels = torch.randn(batch, 1, 512, 512 * 9, requires_grad=True)
    cols = torch.randn(batch, 1, 512 * 9, 49, requires_grad=True)
    cases = {name: train_step(lambda f=f: f(kernels, cols), kernels, cols)
             for name, f in (("_PerSampleMatmul", _PerSampleMatmul.apply), ("torch.matmul", torch.matmul))}
    times = interleaved_medians(cases, repeats, 2)
    return " | ".join(f"{name}: {seconds * 1e3:.1f} ms" for name, seconds in times.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "per_sample_paths_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [shape_row(args.batch, *shape, args.repeats) for shape in SHAPES]
    lines = ["# Per-sample convolution paths on CPU", "",
             f"Command: `python scripts/bench_conv_paths.py {shlex.join(sys.argv[1:])}`  ",
             f"Machine: {machine_summary()}", "",
             f"Forward + backward at batch {args.batch}, each path / a static conv of the same shape (median of "
             f"{args.repeats} round-robin calls).", "",
             "| output map | kernel | channels | grouped | matmul |", "|---|---|---|---|---|", *rows, "",
             f"Input gradient of the 7x7 layer's matmul (512 channels, 3x3): {matmul_backward_row(args.batch, args.repeats)}",
             ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

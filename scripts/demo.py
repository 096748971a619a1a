"""The embedded default: every conv variant on one backbone, measured on this machine.

For each variant of ``--arch`` (ResNet18 by default, the backbone of the papers' main table) it
builds the model, counts parameters and MACs the way the papers' tables do and prints them beside
the published numbers (``results/reference_params.csv``), then times a few SGD training steps on
generated images and checks the loss is finite. Nothing is downloaded.

    python scripts/demo.py [--arch resnet18] [--batch 8] [--size 112] [--steps 3]
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import dynconv

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference_params.csv"


def reference_numbers(arch: str) -> dict:
    with open(REFERENCE, newline="") as f:
        return {row["conv"]: row for row in csv.DictReader(f) if row["arch"] == arch}


def train_step_ms(model: torch.nn.Module, batch: int, size: int, steps: int) -> tuple[float, float]:
    """Median wall time of an SGD step on generated images, and the last loss."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times, loss = [], torch.tensor(float("nan"))
    for step in range(steps + 1):  # the first step warms up allocators and is not timed
        dynconv.set_progress(model, step / 10)
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{type(model).__name__}: loss is {loss.item()} after {steps} steps")
    return 1000 * sorted(times)[len(times) // 2], loss.item()


def delta(ours: float, paper: str) -> str:
    if not paper:
        return ""
    return f"{100 * (ours - float(paper)) / float(paper):+.1f}%".replace("-0.0%", "+0.0%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", choices=dynconv.list_archs())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    paper = reference_numbers(args.arch)
    table = Table(title=f"dynconv variants on {args.arch} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for column in ("conv", "params M", "paper M", "Δ", "GMACs 224²", "paper G", "Δ ",
                   f"train step ms (B={args.batch}, {args.size}²)", f"loss after {args.steps + 1} steps"):
        table.add_column(column, justify="left" if column == "conv" else "right")
    for conv in dynconv.list_convs():
        ref = paper.get(conv, {})
        model = dynconv.create_model(args.arch, conv)
        params = dynconv.count_params(model) / 1e6
        macs = dynconv.count_macs(model) / 1e9
        trainee = dynconv.create_model(args.arch, conv, num_classes=10)
        step_ms, loss = train_step_ms(trainee, args.batch, args.size, args.steps)
        table.add_row(conv, f"{params:.2f}", ref.get("params_m", ""), delta(params, ref.get("params_m", "")),
                      f"{macs:.3f}", ref.get("madds_g", ""), delta(macs, ref.get("madds_g", "")),
                      f"{step_ms:.0f}", f"{loss:.3f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()

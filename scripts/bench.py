"""Dynamic convolutions against the static network: training step, eval throughput, batch-1 latency
and peak training memory of each conv variant, as ratios to ``static`` measured side by side in one run
(``dynconv.benchmark.compare_convs``). Writes ``results/bench_<device>.json`` and ``.md``.

    python scripts/bench.py                                   # the full table (about 25 min on 2 CPU cores)
    python scripts/bench.py --cases resnet18:odconv_4x,kw_1x --repeats 3
    python scripts/bench.py --device cuda --batch 64          # on a GPU: results/bench_cuda.*
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from dynconv.benchmark import BenchSettings, compare_convs, machine_summary

RESULTS = Path(__file__).resolve().parents[1] / "results"
DEFAULT_CASES = ("resnet18:odconv_1x,odconv_4x,dyconv_4x,condconv_8x,kw_1x,kw_4x,dcd,dgc,icconv",
                 "mobilenetv2_100:odconv_4x,kw_1x", "convnext_tiny:odconv_4x,kw_1x")
# The speed issue's targets on ResNet18 (training step time / static); every variant: batch-1 latency
# <= 1.3 and training memory <= 1.5.
TRAIN_TARGETS = {"odconv_1x": 1.5, "odconv_4x": 1.6, "dyconv_4x": 1.5, "condconv_8x": 1.6, "kw_1x": 1.8,
                 "kw_4x": 2.0}
LATENCY_TARGET, MEMORY_TARGET = 1.3, 1.5


def parse_cases(specs: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``["resnet18:odconv_1x,kw_1x", ...]`` as ``[("resnet18", ["odconv_1x", "kw_1x"]), ...]``."""
    out = []
    for spec in specs:
        arch, _, convs = spec.partition(":")
        if not convs:
            raise SystemExit(f"--cases: {spec!r} is not ARCH:CONV[,CONV...]")
        out.append((arch, [c for c in convs.split(",") if c]))
    return out


def _mark(value: Optional[float], target: Optional[float]) -> str:
    if value is None:
        return ""
    if target is None:
        return f"{value:.2f}"
    return f"{value:.2f} {'ok' if value <= target else 'over'} (<= {target})"


def markdown(command: str, machine: Dict, settings: BenchSettings, rows: List[Dict]) -> str:
    s = settings
    lines = [
        f"# Dynamic convolutions against static: {s.device}", "",
        f"`{command}`", "",
        f"Machine: {machine}. Training step: forward, backward and SGD step at batch {s.batch}, "
        f"{s.image_size}x{s.image_size}; eval throughput at batch {s.eval_batch}; latency at batch 1 (eval mode); "
        f"median of {s.repeats} after {s.warmup} warm-up rounds, the cases of one arch timed round-robin. "
        "Memory: peak training memory of a fresh process per case (CPU: rise of the peak RSS over the "
        "process before the model is built; CUDA: max allocated). Ratios are variant / static of the same "
        "arch; targets (ResNet18) from the speed issue.", "",
        "| arch | conv | MACs ratio | train step (s) | train ratio | eval img/s | eval ratio | latency (ms) "
        "| latency ratio | train memory (MB) | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        resnet18 = r["arch"] == "resnet18" and r["conv"] != "static"
        train_target = TRAIN_TARGETS.get(r["conv"]) if r["arch"] == "resnet18" else None
        lines.append(
            f"| {r['arch']} | {r['conv']} | {r['macs_ratio']:.3f} | {r['train_step_s']:.3f} | "
            f"{_mark(r['train_step_ratio'], train_target)} | {r['eval_images_per_s']:.1f} | "
            f"{r['eval_batch_ratio']:.2f} | {r['latency_s'] * 1e3:.1f} | "
            f"{_mark(r['latency_ratio'], LATENCY_TARGET if resnet18 else None)} | "
            f"{r.get('train_memory_mb', '')} | "
            f"{_mark(r.get('train_memory_ratio'), MEMORY_TARGET if resnet18 else None)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="ARCH:CONV[,CONV...] ...")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc as it is (default: keep freed memory, dynconv.malloc)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory processes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for bench_<device>.{json,md}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = BenchSettings(batch=args.batch, eval_batch=args.eval_batch, image_size=args.image_size,
                             repeats=args.repeats, warmup=args.warmup, device=args.device,
                             reuse_freed_memory=not args.system_malloc)
    rows: List[Dict] = []
    for arch, convs in parse_cases(args.cases):
        for row in compare_convs(arch, convs, settings, memory=not args.no_memory):
            rows.append(row)
            print(json.dumps(row), flush=True)
    command = "python scripts/bench.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine = machine_summary()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_{torch.device(args.device).type}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": machine, "settings": settings.__dict__, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(command, machine, settings, rows))
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

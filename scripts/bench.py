"""Dynamic convolutions against the static network: training step, eval throughput, batch-1 latency
and peak training memory of each conv variant, as ratios to ``static`` measured side by side in one run
(``dynconv.benchmark.compare_convs``). Writes ``results/bench_<device>.json`` and ``.md``.

    python scripts/bench.py                                   # all three tables (speed, latency, memory)
    python scripts/bench.py --cases resnet18:odconv_4x,kw_1x --repeats 3
    python scripts/bench.py --device cuda --batch 64          # on a GPU: results/bench_cuda.*
    python scripts/bench.py --tables latency                  # only batch-1 latency against its bound
    python scripts/bench.py --tables latency --runtimes eager # ... eager only (about 5 min)
    python scripts/bench.py --tables memory                   # live training memory against its floor

The latency table (``--tables latency``) compares each variant's batch-1 latency with the bound its method
imposes on this machine (``dynconv.latency_bound``), for ResNet18 and MobileNetV2 1.0 at 224 px, every conv
variant; a run of one table keeps the other table's rows (and, per row, runtimes not rerun) from the last run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import dynconv
from dynconv.benchmark import BenchSettings, compare_convs, latency_vs_bound, machine_summary
from dynconv.memory_floor import FLOOR_TARGET, memory_rows

RESULTS = Path(__file__).resolve().parents[1] / "results"
DEFAULT_CASES = ("resnet18:odconv_1x,odconv_4x,dyconv_4x,condconv_8x,kw_1x,kw_4x,dcd,dgc,icconv",
                 "mobilenetv2_100:odconv_4x,kw_1x", "convnext_tiny:odconv_4x,kw_1x")
# The speed issue's targets on ResNet18 (training step time / static); every variant: batch-1 latency
# <= 1.3 and training memory <= 1.5.
TRAIN_TARGETS = {"odconv_1x": 1.5, "odconv_4x": 1.6, "dyconv_4x": 1.5, "condconv_8x": 1.6, "kw_1x": 1.8,
                 "kw_4x": 2.0}
LATENCY_TARGET, MEMORY_TARGET = 1.3, 1.5
# Issue 21, point 2: batch-1 eager latency within 1.15x of the method's bound; the 1x variants within 1.3x
# of static.
BOUND_TARGET, ONE_X, ONE_X_TARGET = 1.15, ("odconv_1x", "kw_1x", "dcd"), 1.3
LATENCY_ARCHS = ("resnet18", "mobilenetv2_100")
# Issue 21, point 3: live training memory within 1.2x of its floor (dynconv.memory_floor.FLOOR_TARGET), ResNet18
# at batch 16 and MobileNetV2 1.0 at batch 32.
MEMORY_BATCH = {"resnet18": 16, "mobilenetv2_100": 32}
# Why a row is over its floor, read from the holders at the peak (memory_floor.peak_holders) per variant.
_KW_MEMORY_NOTE = (
    "peak in the backward of layer4's first 3x3 conv. Beyond the floor: the layer's cells, mixed in at most "
    "m B / n chunks because each chunk reads the whole warehouse (KW 4x: 144 MiB, one chunk; 16 MiB chunks trained "
    "KW 4x 40% slower), and a second copy of the stage's warehouse gradient (1x / 2x / 4x: 27 / 54 / 108 MiB): "
    "the warehouse is one parameter shared by the stage's layers, and autograd sums the layers' gradients of a "
    "shared parameter out of place (torch 2.14's engine: aten.add, the old sum and the new term both alive). "
    "The second is the price of sharing; the first a speed trade-off (slicing the cells by output channel "
    "would read the warehouse once per slice: not built).")
MEMORY_NOTES = {
    ("resnet18", "kw_1x"): _KW_MEMORY_NOTE, ("resnet18", "kw_2x"): _KW_MEMORY_NOTE,
    ("resnet18", "kw_4x"): _KW_MEMORY_NOTE,
    ("resnet18", "dgc"): ("DGC's layers are pre-activation, ReLU(BN(x)) inside each layer as in the official "
                          "ResNet-DGC: each keeps one more map than the static conv (the normalised input; 118 MiB "
                          "at the peak, the holders 'forward *.norm'), an activation of the method's architecture "
                          "that the floor, which counts attention branches only, leaves out: without it 1.04."),
    ("mobilenetv2_100", "cbam"): ("CBAM (timm's CbamModule in the SE slot) multiplies the expanded map by the "
                                  "channel and then the spatial attention, and both products are kept for their "
                                  "gradients: two expanded-width maps per block that the floor (attention branches "
                                  "of dynamic convs only) leaves out."),
    ("resnet18", "fdconv"): ("FDConv forms every sample's kernels whole (the inverse FFT of the modulated spectrum) "
                             "and their gradient in the backward; slicing them by output channel, as the other "
                             "families' mixing is, would need the FFT per slice (not built)."),
    ("mobilenetv2_100", "fdconv"): "as on ResNet18: the per-sample kernels and their gradient are formed whole.",
}
RUNTIMES = ("eager", "compile", "onnx")
# Why a row misses a target, measured (torch.profiler at batch 1, scripts/bench.py --tables latency).
_ICCONV_NOTE = ("bound = static: IC-Conv has the static conv's MACs and weights. Its per-dilation member convs run in "
                "oneDNN's 16-channel blocks with a per-call overhead: at batch 1 the best packing of ic_resnet50's "
                "layers takes 2.5x a dense conv of the same MACs (results/icconv_fused_cpu.md), a price of mixed "
                "dilations on oneDNN that the byte / MAC bound does not see.")
_DGC_NOTE = ("the bound prices the 55% pruned MACs at the dense static rate; the sparse path gathers each head's "
             "kept channels into a 4-group conv / small matmul (scripts/bench_dgc.py), which runs far below that "
             "rate at batch 1.")
_KW_LATENCY_NOTE = ("the cell mixing, per layer one (mixtures x cells) @ (cells x cell size) product with few rows, "
                    "runs far below the 1024^3 matmul's rate the bound prices it at: KW 1x 81 GMAC/s (4.7 ms for "
                    "2.9), KW 4x 37 GMAC/s (41.7 ms for 11.5), measured layer by layer by "
                    "scripts/profile_kw_mixing.py.")
# MobileNetV2 at batch 1: the methods' small ops, priced in the model's context (scripts/profile_batch1_layers.py)
_SMALL_OPS_NOTE = ("MobileNetV2's dynamic layers are small (51 of them; their static convs take 0.16 ms each on "
                   "average at batch 1), and per layer the method adds 10-30 small ops (attention, kernel mixing "
                   "and scaling) whose bytes and MACs are negligible but which cost eager PyTorch 10-13 us each "
                   "inside the model, five times the tight-loop dispatch probe (the attentions alone: DY-Conv "
                   "4.1 ms, ODConv 5.1-5.9, KW 6.2-6.5; scripts/profile_batch1_layers.py, "
                   "results/profile_batch1_cpu.md): eager PyTorch's time per op, not work of the method, and "
                   "torch.compile, which fuses the ops, runs below the bound (compiled / bound).")
_FDCONV_LATENCY_NOTE = ("not FDConv's bound: it prices FDConv as an unknown family (its parameters read once, one "
                        "per-sample kernel) and counts none of its FFTs (per call an inverse real FFT of the "
                        "C_out k x C_in k kernel spectrum, and FBM's forward and inverse FFTs of the input map per "
                        "band), most of its extra time (MobileNetV2: 26.8 of 34.9 ms outside the convolutions and "
                        "attentions, results/profile_batch1_cpu.md). An FFT term is not built.")
BOUND_NOT_MODELED = ("fdconv",)  # dynconv.latency_bound prices it generically (see its note)
LATENCY_NOTES: Dict[Tuple[str, str], str] = {
    ("resnet18", "icconv"): _ICCONV_NOTE, ("mobilenetv2_100", "icconv"): _ICCONV_NOTE,
    ("resnet18", "dgc"): _DGC_NOTE, ("mobilenetv2_100", "dgc"): _DGC_NOTE,
    ("resnet18", "dcd"): ("Q and P are 1x1 convs at full resolution with L = 16-45 latent channels, priced at the "
                          "static network's average MAC rate, which such narrow convs do not reach."),
    ("mobilenetv2_100", "dcd"): "narrow full-resolution Q / P convs as on ResNet18. " + _SMALL_OPS_NOTE,
    **{("resnet18", conv): _KW_LATENCY_NOTE for conv in ("kw_1d4x", "kw_1d2x", "kw_1x", "kw_2x", "kw_4x")},
    **{("mobilenetv2_100", conv): _SMALL_OPS_NOTE for conv in (
        "cbam", "condconv_8x", "dyconv_4x", "odconv_1x", "odconv_2x", "odconv_4x", "kw_1d4x", "kw_1d2x", "kw_1x",
        "kw_2x", "kw_4x")},
    ("resnet18", "fdconv"): _FDCONV_LATENCY_NOTE, ("mobilenetv2_100", "fdconv"): _FDCONV_LATENCY_NOTE,
}


def _dispatch_note(row: Dict) -> str:
    """Why an eager row is over its bound, measured: the dispatch of the aten ops the method adds."""
    if "aten_ops" not in row or row["eager_bound_ratio"] <= BOUND_TARGET:
        return ""
    return (f"{row['aten_ops']} aten ops against static's {row['static_aten_ops']}: at "
            f"{row['op_dispatch_us']:.1f} us each (the dispatch probe) {row['dispatch_s'] * 1e3:.1f} ms the bound "
            f"does not count; eager / (bound + dispatch) {row['eager_bound_dispatch_ratio']:.2f}.")


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


def latency_markdown(latency: Dict) -> str:
    """The latency-vs-bound table of ``latency`` (``bench_<device>.json``'s ``"latency"`` entry)."""
    measured = "; ".join(
        f"{row['arch']}: {row['rates']['bandwidth']:.1f} GB/s, {row['rates']['matmul_macs_per_s']:.0f} and "
        f"{row['rates']['small_macs_per_s']:.1f} GMAC/s" for row in latency["rows"] if row["conv"] == "static")
    lines = [
        "## Batch-1 latency against its bound", "",
        "; ".join(f"`{c}`" for c in latency["commands"]), "",
        "Bound: the static network's measured time plus what the method must add at batch 1 "
        "(`dynconv.latency_bound`): the bytes that must move (bank read once, mixed kernel written and read once, "
        "the attention's pool read of the input; SE-type and DCD scalings on the smaller of kernel and map) at "
        "the measured bandwidth (a 512 MB `copy_`, read + write), kernel-mixing MACs in a roofline with them at "
        "the MAC rate of a 1024^3 matmul, extra convolution MACs at the static network's own rate, attention MACs "
        "at the rate of batch-1 512 -> 32 -> 512 products. The rates are timed round-robin with the models, under "
        f"the same load ({measured}). Every model is timed as `dynconv.deploy(model)` gives it (BatchNorms "
        "folded); the bound is for that model; `model (ms)` is the model as built. Denormal floats are flushed "
        "(`torch.set_flush_denormal(True)`, as a CPU deployment should: the random weights' saturated attentions "
        "give denormal factors that slow whole convolutions several-fold). Eager: the fastest of "
        f"{latency['repeats']} batch-1 forwards (on a machine shared with other jobs the minimum is the time least "
        "inflated by them; the rates likewise: fastest copy, fastest matmul), all cases of one arch and the "
        "rate probes round-robin in one process; the JSON keeps the medians too; compiled "
        "(`torch.compile`, default mode) and onnxruntime (`torch.onnx.export(dynamo=True)` with a symbolic "
        "batch, CPU provider, same thread count, no spin-waiting) likewise among themselves. Targets (issue 21): "
        f"eager / bound <= {BOUND_TARGET} for every variant; eager / static <= {ONE_X_TARGET} for the 1x "
        f"variants ({', '.join(ONE_X)}); where the bound itself is above {ONE_X_TARGET}x static, that is the "
        f"method's price. `aten ops`: what one deployed forward dispatches (`count_aten_ops`); where eager is over "
        "its bound, the note prices the ops a method adds at the eager dispatch cost of one op (100 one-element "
        "`mul`s, `dispatch_probe`, timed round-robin with the models: a lower bound, the Python around a "
        "model's op comes on top), the part of eager time that neither the bytes nor the MACs explain and that a "
        "compiler removes (`compiled / bound`). "
        f"Machine: {latency['machine']} (`load_average`: 1-minute load at the start and the "
        "end of the last run, on its 2 cores).", "",
        "| arch | conv | bound (ms) | bound / static | eager (ms) | eager / bound | eager / static | model (ms) "
        "| compiled (ms) | compiled / bound | onnxruntime (ms) | MB moved | mixing MMACs | conv MMACs | aten ops "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(value) -> str:
        return f"{value * 1e3:.1f}" if isinstance(value, (int, float)) else "-"

    for row in latency["rows"]:
        conv, key = row["conv"], (row["arch"], row["conv"])
        misses = row["eager_bound_ratio"] > BOUND_TARGET or (conv in ONE_X and row["eager_static_ratio"] > ONE_X_TARGET)
        note = ((LATENCY_NOTES.get(key, "") if misses else "") + " " + _dispatch_note(row)).strip()
        if row["bound_ratio"] > ONE_X_TARGET and conv not in BOUND_NOT_MODELED:
            note = (f"bound {row['bound_ratio']:.2f}x static: the method's price. " + note).strip()
        compiled = f"{row['compiled_s'] / row['bound_s']:.2f}" if "compiled_s" in row else "-"
        for runtime, error in row.get("errors", {}).items():
            note = (note + f" {runtime} failed: {error}").strip()
        lines.append(
            f"| {row['arch']} | {conv} | {ms(row['bound_s'])} | {row['bound_ratio']:.2f} | {ms(row['eager_s'])} | "
            f"{_mark(row['eager_bound_ratio'], BOUND_TARGET if conv != 'static' else None)} | "
            f"{_mark(row['eager_static_ratio'], ONE_X_TARGET if conv in ONE_X else None)} | "
            f"{ms(row['eager_model_s'])} | {ms(row.get('compiled_s'))} | {compiled} | {ms(row.get('onnxruntime_s'))} | "
            f"{row['bytes_mb']:.0f} | {row['mixing_macs_m']:.0f} | {row['conv_macs_m']:.0f} | "
            f"{row.get('aten_ops', '-')} | {note} |")
    return "\n".join(lines) + "\n"


def memory_markdown(memory: Dict) -> str:
    """The memory-vs-floor table of ``memory`` (``bench_<device>.json``'s ``"memory"`` entry)."""
    lines = [
        "## Training memory against its floor", "",
        f"`{memory['command']}`", "",
        f"Live tensor bytes of two training steps (forward, backward, SGD with momentum) at "
        f"{memory.get('image_size', 224)} px "
        "(`dynconv.memory_floor.live_training_memory`: every storage alive, counted once: what "
        "`torch.cuda.max_memory_allocated` reports on a GPU, up to allocator rounding and conv workspaces; "
        "deterministic, whatever else runs on the machine) against the floor the variant cannot go below "
        "(`training_memory_floor`: the static step's peak, plus the variant's extra parameters, their gradients "
        f"and momentum, plus the activations its attention keeps for the backward). Target (issue 21): peak / "
        f"floor <= {FLOOR_TARGET}. Holders: the largest tensors alive at the peak beyond what the static step "
        "holds too.", "",
        "| arch | batch | conv | peak (MiB) | floor (MiB) | peak / floor | peak / static | largest holders at the peak "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in memory["rows"]:
        holders = ", ".join(f"{label} {mib}" for label, mib in r.get("holders", []))
        ratio = r["peak_over_floor"]
        mark = f"{ratio:.2f} {'ok' if ratio <= FLOOR_TARGET else 'over'} (<= {FLOOR_TARGET})"
        note = MEMORY_NOTES.get((r["arch"], r["conv"]), "") if ratio > FLOOR_TARGET else ""
        lines.append(f"| {r['arch']} | {r.get('batch', memory['batch'])} | {r['conv']} | {r['peak_mib']} | "
                     f"{r['floor_mib']} | {mark} | {r['peak_over_static']:.2f} | {holders} | {note} |")
    return "\n".join(lines) + "\n"


def _merge_latency(old: Optional[Dict], new: Dict) -> Dict:
    """``new`` over ``old``: rows by (arch, conv), each row's keys from the newer run where it has them."""
    if not old:
        return new
    rows = {(r["arch"], r["conv"]): dict(r) for r in old["rows"]}
    for r in new["rows"]:
        rows.setdefault((r["arch"], r["conv"]), {}).update(r)
    merged = dict(new, rows=list(rows.values()))
    merged["commands"] = [c for c in old.get("commands", []) if c not in new["commands"]] + new["commands"]
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=None, help="ARCH:CONV[,CONV...] ...")
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
    parser.add_argument("--tables", nargs="+", choices=("speed", "latency", "memory"), default=None,
                        help="speed: train step / eval throughput / memory (--cases); latency: batch-1 latency "
                             "against its bound; memory: live training memory against its floor "
                             "(dynconv.memory_floor, --memory-archs) (default: all three, or speed alone "
                             "when --cases is given)")
    parser.add_argument("--memory-archs", nargs="+", default=list(MEMORY_BATCH),
                        help="at the batch of MEMORY_BATCH (ResNet18 16, MobileNetV2 32), else --batch")
    parser.add_argument("--memory-convs", nargs="+", default=None, help="default: every dynconv.list_convs()")
    parser.add_argument("--latency-archs", nargs="+", default=list(LATENCY_ARCHS))
    parser.add_argument("--latency-convs", nargs="+", default=None, help="default: every dynconv.list_convs()")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for bench_<device>.{json,md}")
    args = parser.parse_args(argv)
    if args.tables is None:
        args.tables = ["speed"] if args.cases is not None else ["speed", "latency", "memory"]
    args.cases = args.cases or list(DEFAULT_CASES)
    torch.set_num_threads(args.threads)
    settings = BenchSettings(batch=args.batch, eval_batch=args.eval_batch, image_size=args.image_size,
                             repeats=args.repeats, warmup=args.warmup, device=args.device,
                             reuse_freed_memory=not args.system_malloc)
    command = "python scripts/bench.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine = machine_summary()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_{torch.device(args.device).type}"
    previous = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    result = dict(previous)
    if "speed" in args.tables:
        rows: List[Dict] = []
        for arch, convs in parse_cases(args.cases):
            for row in compare_convs(arch, convs, settings, memory=not args.no_memory):
                rows.append(row)
                print(json.dumps(row), flush=True)
        result.update(command=command, machine=machine, settings=settings.__dict__, rows=rows)
    if "latency" in args.tables:
        convs = args.latency_convs or dynconv.list_convs()
        load = [round(os.getloadavg()[0], 2)]  # (1-minute load at the start and the end: the machine may be shared)
        rows = []
        for arch in args.latency_archs:
            for row in latency_vs_bound(arch, convs, settings, args.runtimes, args.latency_repeats):
                rows.append(row)
                print(json.dumps(row), flush=True)
        load.append(round(os.getloadavg()[0], 2))
        latency = {"commands": [command], "machine": dict(machine, load_average=load),
                   "repeats": args.latency_repeats, "rows": rows}
        result["latency"] = _merge_latency(previous.get("latency"), latency)
    if "memory" in args.tables:
        rows = []
        for arch in args.memory_archs:
            at_batch = dataclasses.replace(settings, batch=MEMORY_BATCH.get(arch, settings.batch))
            for row in memory_rows(arch, args.memory_convs or dynconv.list_convs(), at_batch):
                rows.append(row)
                print(json.dumps(row), flush=True)
        result["memory"] = {"command": command, "machine": machine, "batch": settings.batch,
                            "image_size": settings.image_size, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    parts = []
    if "rows" in result:
        speed = BenchSettings(**result["settings"])
        parts.append(markdown(result["command"], result["machine"], speed, result["rows"]))
    if "latency" in result:
        parts.append(latency_markdown(result["latency"]))
    if "memory" in result:
        parts.append(memory_markdown(result["memory"]))
    text = "\n".join(parts)
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

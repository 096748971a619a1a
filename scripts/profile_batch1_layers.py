"""Where a deployed dynamic model's batch-1 forward goes, layer by layer.

For every dynamic layer of ``dynconv.deploy(create_model(arch, conv))`` at 224 px (BatchNorms calibrated as
in ``scripts/bench.py``), on the layer's own input
(each the fastest of ``--repeats`` calls, all of them round-robin):

- ``layer``: the whole layer;
- ``conv``: ``F.conv2d`` of the same shapes with a fixed kernel (what the static network pays for this conv);
- ``fresh conv``: the same with a kernel computed in the call (``w * 1``): what a kernel that changes every
  call costs the convolution on top, oneDNN reordering it into its blocked layout each time included;
- ``attention``: the layer's attention module alone, where it has one;
- ``ops``: the aten ops the layer dispatches (``dynconv.latency_bound.count_aten_ops``).

The sums over layers split the dynamic model's extra time against static into the convolution's share,
the attention's and the rest (kernel mixing and scaling). ``us / attention op`` is the attention's time over
its op count: its ops are tiny but for the pool, which reads the input map, so that is about what one small
op costs in eager PyTorch inside a model (the caches and thread pool as the layers around it leave them).

    python scripts/profile_batch1_layers.py --arch mobilenetv2_100 --convs odconv_1x kw_1x [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynconv  # noqa: E402
from dynconv.benchmark import calibrate_norms, interleaved_times, machine_summary  # noqa: E402
from dynconv.latency_bound import count_aten_ops  # noqa: E402
from dynconv.ops._base import DynamicConv2dBase  # noqa: E402


def fastest(cases: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    return {k: min(v) for k, v in interleaved_times(cases, repeats, 2, torch.device("cpu")).items()}


def layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    inputs: Dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            inputs.setdefault(name, args[0])
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, DynamicConv2dBase)]
    model(x)
    for h in hooks:
        h.remove()
    return inputs


def profile(arch: str, conv: str, repeats: int) -> Dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    calibration = torch.randn(2, 3, 224, 224)  # BatchNorm statistics, as a trained model has (the benchmark's)
    model = dynconv.deploy(calibrate_norms(dynconv.create_model(arch, conv), calibration), x)
    static = dynconv.deploy(calibrate_norms(dynconv.create_model(arch, "static"), calibration), x)
    totals = dict.fromkeys(("layer", "conv", "fresh conv", "attention", "ops", "attention ops", "layers"), 0.0)
    inputs = layer_inputs(model, x)
    for name, xi in inputs.items():
        layer = model.get_submodule(name)
        w = torch.randn(layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
        cases = {"layer": lambda: layer(xi), "conv": lambda: F.conv2d(xi, w, None, *geometry),
                 "fresh conv": lambda: F.conv2d(xi, w * 1, None, *geometry)}
        attention = getattr(layer, "attention", None)
        if isinstance(attention, torch.nn.Module):
            cases["attention"] = lambda: attention(xi)
            totals["attention ops"] += count_aten_ops(attention, xi)
        for key, seconds in fastest(cases, repeats).items():
            totals[key] += seconds
        totals["ops"] += count_aten_ops(layer, xi)
        totals["layers"] += 1
    whole = fastest({"static": lambda: static(x), "dynamic": lambda: model(x)}, repeats)
    totals.update(whole)
    totals["model ops"], totals["static ops"] = count_aten_ops(model, x), count_aten_ops(static, x)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mobilenetv2_100")
    parser.add_argument("--convs", nargs="+", default=["odconv_1x", "kw_1x", "dcd"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-denormals", action="store_true",
                        help="leave denormal floats on (default: flushed, as scripts/bench.py --tables latency does)")
    parser.add_argument("--out", type=Path, default=None, help="also append the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    denormals = "kept" if args.keep_denormals else "flushed"
    lines = [f"`python scripts/profile_batch1_layers.py {' '.join(sys.argv[1:])}`", "",
             f"{args.arch}, batch 1, 224 px, {args.threads} threads, denormals {denormals}; ms, fastest of "
             f"{args.repeats}; machine {machine_summary()}", "",
             "| conv | static model | dynamic model | extra | layers | sum layer | sum conv | sum fresh conv "
             "| sum attention | rest | attention ops | us / attention op | layer ops | extra ops |",
             "|---" * 14 + "|"]
    print("\n".join(lines), flush=True)
    with torch.no_grad():
        for conv in args.convs:
            t = profile(args.arch, conv, args.repeats)
            ms = {k: v * 1e3 for k, v in t.items()}
            rest = ms["layer"] - ms["fresh conv"] - ms["attention"]
            per_op = f"{ms['attention'] * 1e3 / t['attention ops']:.1f}" if t["attention ops"] else "-"
            lines.append(
                f"| {conv} | {ms['static']:.2f} | {ms['dynamic']:.2f} | {ms['dynamic'] - ms['static']:.2f} "
                f"| {int(t['layers'])} | {ms['layer']:.2f} | {ms['conv']:.2f} | {ms['fresh conv']:.2f} "
                f"| {ms['attention']:.2f} | {rest:.2f} | {int(t['attention ops'])} | {per_op} "
                f"| {int(t['ops'])} | {int(t['model ops'] - t['static ops'])} |")
            print(lines[-1], flush=True)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

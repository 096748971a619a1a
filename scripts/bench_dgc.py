"""DGC's channel-skipping inference path against its dense path and the static network.

The official DGC code convolves every head over every input channel and zeroes the pruned ones,
so it saves no time. ``DGCConv2d`` in eval mode gathers only the kept channels per sample and head.
This script measures, side by side in one run (round-robin medians), eval-mode latency at batch 1
(and optionally larger batches) of:

- every distinct DGC layer shape of ResNet18 at 224x224: a static ``nn.Conv2d``, the DGC layer's dense
  path and its sparse path;
- the whole network: static ResNet18, ``dgc`` ResNet18 forced dense, and ``dgc`` ResNet18 sparse;

next to the MAC ratio ``count_macs(sparse) / count_macs(dense)`` the speed-up should approach.
Writes ``results/dgc_sparse_<device>.json`` and ``.md``.

    python scripts/bench_dgc.py [--batch 1] [--threads 2] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

import dynconv
from dynconv.benchmark import interleaved_medians, machine_summary
from dynconv.ops.dgc import DGCConv2d

RESULTS = Path(__file__).resolve().parents[1] / "results"


def set_sparse(model: nn.Module, sparse: bool) -> nn.Module:
    for m in model.modules():
        if isinstance(m, DGCConv2d):
            m.sparse = sparse
    return model


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of the benchmark images (plus random ones up to 8), so that the eval-mode
    activations of the randomly initialised network stay finite: DGC's saliencies multiply the
    kernels, so a random net's activations grow from layer to layer where BN does not hold them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.cat([x, torch.randn(max(8 - x.shape[0], 0), *x.shape[1:])]))
    return model.eval()


def layer_shapes(model: nn.Module, size: int):
    """``(name, layer, input shape)`` for the first layer of each distinct shape."""
    seen, out, hooks = set(), [], []
    for name, m in model.named_modules():
        if isinstance(m, DGCConv2d):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: out.append((name, mod, inp[0].shape))))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    unique = []
    for name, layer, shape in out:
        key = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, tuple(shape[2:]))
        if key not in seen:
            seen.add(key)
            unique.append((name, layer, shape))
    return unique


def bench_layers(model: nn.Module, batch: int, size: int, repeats: int):
    rows = []
    for name, layer, shape in layer_shapes(model, size):
        x = torch.randn(batch, *shape[1:])
        static = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                           bias=False).eval()
        with torch.no_grad():
            def run(flag, x=x, layer=layer):
                layer.sparse = flag
                return layer(x)

            times = interleaved_medians({"static": lambda: static(x), "dense": lambda: run(False),
                                         "sparse": lambda: run(True)}, repeats=repeats)
        kept = layer.in_channels - layer.inactive_channels
        rows.append({
            "layer": name, "shape": f"{layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]} "
                                    f"s{layer.stride[0]} @{shape[2]}x{shape[3]}",
            "kept_fraction": kept / layer.in_channels,
            "static_ms": 1e3 * times["static"], "dense_ms": 1e3 * times["dense"], "sparse_ms": 1e3 * times["sparse"],
            "speedup_sparse_vs_dense": times["dense"] / times["sparse"],
            "conv_mac_ratio": layer.in_channels / kept,
        })
    return rows


def bench_network(arch: str, batch: int, size: int, repeats: int):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    static = calibrated(dynconv.create_model(arch), x)
    dgc = calibrated(dynconv.create_model(arch, "dgc"), x)
    macs = {"static": dynconv.count_macs(static, (1, 3, size, size)),
            "sparse": dynconv.count_macs(set_sparse(dgc, True), (1, 3, size, size)),
            "dense": dynconv.count_macs(set_sparse(dgc, False), (1, 3, size, size))}

    def run(flag):
        set_sparse(dgc, flag)
        return dgc(x)

    with torch.no_grad():
        sparse, dense = run(True), run(False)
        assert torch.isfinite(dense).all(), "non-finite logits: the calibration did not hold the activations"
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max()))
        times = interleaved_medians({"static": lambda: static(x), "dense": lambda: run(False),
                                     "sparse": lambda: run(True)}, repeats=repeats)
    return dgc, {
        "arch": arch, "batch": batch, "size": size,
        **{f"{k}_ms": 1e3 * v for k, v in times.items()},
        **{f"{k}_gmacs": v / 1e9 for k, v in macs.items()},
        "speedup_sparse_vs_dense": times["dense"] / times["sparse"],
        "mac_ratio_dense_vs_sparse": macs["dense"] / macs["sparse"],
        "sparse_vs_static": times["sparse"] / times["static"],
    }


def markdown(command: str, machine: dict, network: list, layers: list) -> str:
    lines = [
        "# DGC: channel-skipping inference vs the dense path (eval mode)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}",
        "",
        "Dense = every head over every input channel, the pruned ones zeroed (what the official code computes);",
        "sparse = only the kept channels gathered per sample and head (`DGCConv2d.forward_sparse`).",
        "MACs from `dynconv.count_macs` (the paper's counting: kept fraction of the dense conv plus the",
        "saliency generators).",
        "",
        "## Whole network",
        "",
        "| arch | batch | static ms | DGC dense ms | DGC sparse ms | sparse speed-up | MAC ratio dense/sparse | GMACs static / dense / sparse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in network:
        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['static_ms']:.1f} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | "
            f"{r['speedup_sparse_vs_dense']:.2f}x | {r['mac_ratio_dense_vs_sparse']:.2f}x | "
            f"{r['static_gmacs']:.3f} / {r['dense_gmacs']:.3f} / {r['sparse_gmacs']:.3f} |")
    lines += ["", "## Per layer (first layer of each shape)", "",
              "| layer | shape | kept | static ms | dense ms | sparse ms | speed-up | conv MAC ratio dense/sparse |",
              "|---|---|---|---|---|---|---|---|"]
    for r in layers:
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['kept_fraction']:.3f} | {r['static_ms']:.3f} | {r['dense_ms']:.3f} | "
            f"{r['sparse_ms']:.3f} | {r['speedup_sparse_vs_dense']:.2f}x | {r['conv_mac_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python scripts/bench_dgc.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    network, layers = [], []
    for batch in args.batch:
        model, row = bench_network(args.arch, batch, args.size, args.repeats)
        network.append(row)
        print(row, flush=True)
        if batch == args.batch[0]:
            layers = bench_layers(model, batch, args.size, args.repeats)
    machine = machine_summary()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "dgc_sparse_cpu"
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": machine, "network": network, "layers": layers}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(command, machine, network, layers))
    print(markdown(command, machine, network, layers))


if __name__ == "__main__":
    main()

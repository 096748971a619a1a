"""Where a deployed KernelWarehouse ResNet18's batch-1 forward goes: per KW layer, the attention, the cell
mixing (``(mixtures x cells) @ (cells x cell size)``, one matmul) and the whole layer, each the fastest of 20
calls on the layer's own input, summed over layers; the mixing's MAC rate beside a 1024^3 matmul's (the rate
``dynconv.latency_bound`` prices mixing at).

    python scripts/profile_kw_mixing.py [--convs kw_1x kw_4x] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynconv  # noqa: E402
from dynconv.benchmark import interleaved_times  # noqa: E402
from dynconv.ops.kernelwarehouse import KWConv2d  # noqa: E402


def fastest(fn: Callable[[], object], repeats: int = 20) -> float:
    return min(interleaved_times({"call": fn}, repeats, 1, torch.device("cpu"))["call"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--convs", nargs="+", default=["kw_1x", "kw_4x"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, 224, 224)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    probe = 1024**3 / fastest(lambda: a @ b, 5)
    for conv in args.convs:
        torch.manual_seed(0)
        model = dynconv.deploy(dynconv.create_model("resnet18", conv).eval(), x)
        inputs = {}

        def keep_input(name: str):
            def hook(module, args, output) -> None:  # returns None: the output stays as it is
                inputs.setdefault(name, args[0])
            return hook

        hooks = [m.register_forward_hook(keep_input(n)) for n, m in model.named_modules() if isinstance(m, KWConv2d)]
        with torch.inference_mode():
            model(x)
        for hook in hooks:
            hook.remove()
        attention_s = mixing_s = layers_s = macs = 0.0
        with torch.inference_mode():
            for name, layer in model.named_modules():
                if name not in inputs:
                    continue
                xi = inputs[name]
                attention = layer.attention(xi)
                bank = layer.warehouse_manager_ref.take_cell(layer.warehouse_id)
                flat = bank.reshape(layer.attention.num_cells, -1)
                attention_s += fastest(lambda: layer.attention(xi))
                mixing_s += fastest(lambda: attention @ flat)
                layers_s += fastest(lambda: layer(xi))
                macs += attention.shape[0] * attention.shape[1] * flat.shape[1]
        print(f"{conv}: KW layers {layers_s * 1e3:.1f} ms, of which attention {attention_s * 1e3:.1f} ms and "
              f"cell mixing {mixing_s * 1e3:.1f} ms ({macs / 1e9:.2f} GMAC at {macs / mixing_s / 1e9:.0f} GMAC/s; "
              f"a 1024^3 matmul: {probe / 1e9:.0f} GMAC/s, at which the mixing would take "
              f"{macs / probe * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()

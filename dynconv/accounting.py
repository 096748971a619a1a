"""Parameter and MAC counts as the papers' tables print them.

MACs are multiply-accumulates for one image (not 2x FLOPs). Convolutions, linear layers and the
kernel-mixing matmuls are counted by ``torch.utils.flop_counter.FlopCounterMode`` from the ops
actually run. The elementwise products of the dynamic layers (ODConv's attentions applied to the
input, the output and the kernels) are invisible to such counters (they count matmuls and convolutions only),
so each such layer reports them through ``elementwise_macs(x, y)`` and they are added here; kernel
aggregation is counted as the paper's formula writes it (see ``ODConv2d.elementwise_macs``). A layer
may also return a negative part there, for work the paper does not count (DGC's zero-saliency
padding channels, ``DGCConv2d.elementwise_macs``).
BatchNorm, activations and pooling are not counted. :func:`macs_breakdown` says where the MACs go.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .ops._base import DynamicConv2dBase
from .ops.functional import forced_path

# Where a dynamic layer's work goes; ``static`` is everything outside the dynamic layers.
MAC_KINDS = ("static", "dynamic_conv", "attention", "aggregation", "scaling")


def count_params(model: nn.Module) -> int:
    """Number of parameters; a tensor shared by several layers (KernelWarehouse) counts once."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one eval-mode forward on an input of ``input_size``."""
    return macs_breakdown(model, input_size)["total"]


@torch.no_grad()
def macs_breakdown(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> Dict[str, int]:
    """MACs of one eval-mode forward, split by where they are spent.

    Keys: ``static`` (every layer that is not dynamic), ``dynamic_conv`` (the per-sample
    convolutions of the dynamic layers), ``attention`` (their attention / routing branches),
    ``aggregation`` (mixing their kernel banks into per-sample kernels), ``scaling`` (ODConv's
    input-channel and filter attentions applied to the feature maps) and ``total``.
    """
    param = next(model.parameters())
    x = torch.randn(*input_size, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    elementwise = dict.fromkeys(MAC_KINDS[1:], 0)

    def add_elementwise(module, inputs, output):
        for kind, macs in module.elementwise_macs(inputs[0], output).items():
            elementwise[kind] += macs

    hooks = [m.register_forward_hook(add_elementwise) for m in model.modules() if hasattr(m, "elementwise_macs")]
    was_training = model.training
    model.eval()
    try:
        # the grouped path shows every per-sample conv to the counter as a convolution (the matmul path
        # would show it as a matmul, which counts as kernel mixing); the MACs are the same on every path
        with FlopCounterMode(display=False) as counter, forced_path("grouped"):
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    counts = counter.get_flop_counts()
    root = type(model).__name__
    out = dict.fromkeys(MAC_KINDS, 0)
    for name, module in model.named_modules():
        if isinstance(module, DynamicConv2dBase):
            for kind, macs in _counted_in_layer(counts, f"{root}.{name}", module).items():
                out[kind] += macs
    out["static"] = counter.get_total_flops() // 2 - sum(out.values())
    for kind, macs in elementwise.items():
        out[kind] += macs
    out["total"] = sum(out.values())
    return out


def _counted_in_layer(counts: Dict[str, Dict[Any, int]], path: str, layer: DynamicConv2dBase) -> Dict[str, int]:
    """What the FLOP counter saw inside one dynamic layer: its convolutions, its attention branch,
    and its matmuls (the kernel mixing, or the convolution where the layer runs it as a matmul)."""
    out = {"dynamic_conv": 0, "attention": 0, "aggregation": 0}

    def kind(op: Any) -> str:
        return "dynamic_conv" if op is torch.ops.aten.convolution else layer.matmul_macs_kind

    for op, flops in counts.get(path, {}).items():
        out[kind(op)] += flops // 2
    for child in layer.attention_children:
        for op, flops in counts.get(f"{path}.{child}", {}).items():
            out[kind(op)] -= flops // 2
            out["attention"] += flops // 2
    return out

"""Parameter and MAC counts as the papers' tables print them.

MACs are multiply-accumulates for one image (not 2x FLOPs). Convolutions, linear layers and the
kernel-mixing matmuls are counted by ``torch.utils.flop_counter.FlopCounterMode`` from the ops
actually run. The elementwise products of the dynamic layers (ODConv's attentions applied to the
input, the output and the kernels) are invisible to such counters (``reference/ecosystem.md`` §5.3),
so each such layer reports them through ``elementwise_macs(x, y)`` and they are added here; kernel
aggregation is counted as the paper's formula writes it (see ``ODConv2d.elementwise_macs``).
BatchNorm, activations and pooling are not counted.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters; a tensor shared by several layers (KernelWarehouse) counts once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one eval-mode forward on an input of ``input_size``."""
    param = next(model.parameters())
    x = torch.randn(*input_size, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    extra = [0]

    def add_elementwise(module, inputs, output):
        extra[0] += module.elementwise_macs(inputs[0], output)

    hooks = [m.register_forward_hook(add_elementwise) for m in model.modules() if hasattr(m, "elementwise_macs")]
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return counter.get_total_flops() // 2 + extra[0]

"""The backbones dynconv builds (timm definitions) and the settings every one of them gets, static or dynamic."""
from __future__ import annotations

from typing import Any, List, Tuple

import timm
from torch import nn

ARCHS: Tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenetv2_050",
    "mobilenetv2_075",
    "mobilenetv2_100",
    "convnext_tiny",
)

DROP_PATH_MODES: Tuple[str, ...] = ("linear", "uniform")


def list_archs() -> List[str]:
    """Backbones :func:`dynconv.create_model` builds (timm definitions)."""
    return list(ARCHS)


def create_backbone(arch: str, num_classes: int = 1000, *, dynamic: bool = False, drop_path_mode: str = "linear",
                    **timm_kwargs: Any) -> nn.Module:
    """``arch`` from timm, without pretrained weights, set up as dynconv's layers and the official models need.

    ``dynamic``: a conv variant will be applied (ConvNeXt then gets 1x1-conv MLPs).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if drop_path_mode not in DROP_PATH_MODES:
        raise ValueError(f"drop_path_mode={drop_path_mode!r}; choose one of: {', '.join(DROP_PATH_MODES)}")
    if arch.startswith("resnet"):
        # The official ODConv and KernelWarehouse ResNets (and torchvision's) start every BatchNorm at
        # weight 1; timm zero-initialises each block's last one, which would start every residual
        # branch, dynamic layers included, at zero output and without attention gradients.
        timm_kwargs.setdefault("zero_init_last", False)
    if arch.startswith("convnext") and dynamic:
        # NCHW blocks with 1x1 convs instead of Linear in the MLP (same parameters), so the
        # pointwise layers can be dynamic and residual attention sees NCHW maps.
        timm_kwargs.setdefault("conv_mlp", True)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if drop_path_mode == "uniform":
        set_uniform_drop_path(model, timm_kwargs.get("drop_path_rate", 0.0))
    return model


def set_uniform_drop_path(model: nn.Module, rate: float) -> int:
    """Give every residual block of a timm backbone ``DropPath(rate)``; returns how many blocks.

    timm ramps stochastic depth linearly over the blocks (block i of N drops with ``rate * i / (N - 1)``),
    as the ConvNeXt code does (``models/kw_convnext.py``, ``torch.linspace(0, drop_path_rate, ...)``). The
    KernelWarehouse ResNets (OSVAI/KernelWarehouse ``models/kw_resnet.py`` and the baseline
    ``models/resnet.py``: every block gets ``DropPath(drop_path_rate)``; likewise the detection backbone
    ``detection/mmdet/models/backbones/kw_resnet.py``) drop every block's branch at the full rate.
    timm blocks hold their drop path as ``block.drop_path`` (``None`` or ``nn.Identity`` at rate 0).
    """
    from timm.layers import DropPath

    blocks = 0
    for module in model.modules():
        current = getattr(module, "drop_path", False)
        if current is None or isinstance(current, (DropPath, nn.Identity)):
            module.drop_path = DropPath(rate) if rate > 0 else current
            blocks += 1
    return blocks

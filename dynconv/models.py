"""``create_model``: a timm backbone with a conv variant applied the way its paper applied it."""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Tuple

import timm
from torch import nn

from .registry import ConvVariant, get_variant
from .surgery import convert

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

# Per-(family or variant, arch prefix) option defaults that the official configs set for that backbone.
_ARCH_DEFAULTS: Dict[Tuple[str, str], Dict[str, Any]] = {
    ("kw", "mobilenetv2"): {"mixing_epochs": 15},  # KW MobileNetV2 configs: temp_epoch 15
    ("kw_4x", "mobilenetv2"): {"sharing_range": ("layer",)},  # separate pw0/pw1/dw warehouses
    ("kw_1d2x", "mobilenetv2"): {"plan": "mobilenetv2_1d2x"},  # the hand-built kw1d2x_mobilenetv2 class
    ("kw_1d2x", "resnet50"): {"nonlocal_basis_ratio": 0.0625},
}


DROP_PATH_MODES: Tuple[str, ...] = ("linear", "uniform")


def list_archs() -> List[str]:
    """Backbones :func:`create_model` builds (timm definitions)."""
    return list(ARCHS)


def _arch_defaults(variant: ConvVariant, arch: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in (variant.family, variant.name):
        for (name, prefix), options in _ARCH_DEFAULTS.items():
            if name == key and arch.startswith(prefix):
                out.update(options)
    return out


def family_option_names(family: str) -> set:
    """Option names a family accepts (everything else in ``create_model`` goes to timm)."""
    from .surgery import _CONVERTERS  # noqa: F401  (families are defined there)

    if family == "kw":
        from .ops.kernelwarehouse import KW_OPTIONS

        return set(KW_OPTIONS)
    if family == "attention":
        return set()
    if family == "icconv":
        return {"patterns", "grid", "impl"}  # dynconv.ops.icconv.convert_icconv
    from .ops.condconv import CondConv2d
    from .ops.dcd import DCDConv2d
    from .ops.dgc import DGCConv2d
    from .ops.dyconv import DynamicConv2d
    from .ops.odconv import ODConv2d

    # (layer class, options the family's converter takes on top of the layer's own)
    families = {
        "condconv": (CondConv2d, {"temperature_epochs"}),
        "dyconv": (DynamicConv2d, {"temperature_epochs"}),
        "odconv": (ODConv2d, {"temperature_epochs"}),
        "dcd": (DCDConv2d, {"fc_squeeze", "dynamic_classifier"}),
        "dgc": (DGCConv2d, {"total_epochs"}),
    }
    if family not in families:
        return set()
    layer, extras = families[family]
    conv_args = set(inspect.signature(nn.Conv2d.__init__).parameters)
    return set(inspect.signature(layer.__init__).parameters) - conv_args | extras


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


def create_model(arch: str, conv: str = "static", num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build ``arch`` from timm and apply ``conv`` with the official per-backbone rules.

    Args:
        arch: one of :func:`list_archs`.
        conv: one of :func:`dynconv.list_convs`.
        num_classes: classifier width.
        **overrides: family options (``kernel_num``, ``reduction``, ``temperature_epochs``,
            ``cell_num_ratio``, ...) override the variant; ``drop_path_mode`` (``"linear"``, timm's ramp
            over the blocks, or ``"uniform"``, every block at ``drop_path_rate``: see
            :func:`set_uniform_drop_path`); anything else goes to ``timm.create_model`` (``drop_rate``,
            ``drop_path_rate``, ``in_chans``, ...).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    drop_path_mode = overrides.pop("drop_path_mode", "linear")
    if drop_path_mode not in DROP_PATH_MODES:
        raise ValueError(f"drop_path_mode={drop_path_mode!r}; choose one of: {', '.join(DROP_PATH_MODES)}")
    variant = get_variant(conv)
    conv_names = family_option_names(variant.family)
    conv_options = {k: v for k, v in overrides.items() if k in conv_names}
    timm_kwargs = {k: v for k, v in overrides.items() if k not in conv_names}
    if arch.startswith("resnet"):
        # The official ODConv and KernelWarehouse ResNets (and torchvision's) start every BatchNorm at
        # weight 1; timm zero-initialises each block's last one, which would start every residual
        # branch, dynamic layers included, at zero output and without attention gradients.
        timm_kwargs.setdefault("zero_init_last", False)
    if arch.startswith("convnext") and variant.family != "static":
        # NCHW blocks with 1x1 convs instead of Linear in the MLP (same parameters), so the
        # pointwise layers can be dynamic and residual attention sees NCHW maps.
        timm_kwargs.setdefault("conv_mlp", True)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if drop_path_mode == "uniform":
        set_uniform_drop_path(model, timm_kwargs.get("drop_path_rate", 0.0))
    if variant.family != "static":
        convert(model, conv, **{**_arch_defaults(variant, arch), **conv_options})
    return model

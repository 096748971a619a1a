"""``create_model``: a timm backbone with a conv variant applied the way its paper applied it."""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from torch import nn

from .registry import ConvVariant, get_variant
from .surgery.sites import set_submodule
from .schedules import drive_schedules
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


_logger = logging.getLogger(__name__)

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
    if family == "kw":
        from .surgery.kernelwarehouse import KW_OPTIONS

        return set(KW_OPTIONS)
    if family == "attention":
        return set()
    if family == "icconv":
        return {"patterns", "grid", "impl"}  # dynconv.ops.icconv.convert_icconv
    from .ops.condconv import CondConv2d
    from .ops.dcd import DCDConv2d
    from .ops.dgc import DGCConv2d
    from .ops.dyconv import DynamicConv2d
    from .ops.fdconv import FDConv2d
    from .ops.odconv import ODConv2d

    # (layer class, options the family's converter takes on top of the layer's own)
    families = {
        "condconv": (CondConv2d, {"temperature_epochs"}),
        "dyconv": (DynamicConv2d, {"temperature_epochs"}),
        "odconv": (ODConv2d, {"temperature_epochs"}),
        "dcd": (DCDConv2d, {"fc_squeeze", "dynamic_classifier"}),
        "dgc": (DGCConv2d, {"total_epochs"}),
        "fdconv": (FDConv2d, {"use_fdconv_if_c_gt", "use_fdconv_if_k_in"}),
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


# -- heads that stay dynamic ---------------------------------------------------------------------------------

HEAD_ATTR = "dynconv_head"  # "dcd" (DCD's dynamic classifier) or "kw" (KernelWarehouse classifier / warehouses)


def _classifier_path(model: nn.Module) -> str:
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return name
    raise RuntimeError(f"{type(model).__name__}.get_classifier() is not a submodule")


class DynamicHeadMixin:
    """``reset_classifier`` / ``prune_intermediate_layers`` for backbones whose head or shared weights are
    dynconv's own (timm's versions would put back a plain ``nn.Linear`` or leave unused weights behind).

    - DCD: the new classifier is DCD's dynamic one again (official ``DYCls``), not a plain Linear.
    - KernelWarehouse: a KW classifier (1/2x MobileNetV2) is rebuilt as a KW layer with the same cell
      ratios (in its own warehouse: the old warehouse held that classifier's cells only), and warehouses
      that no layer of the model uses any more (the old classifier's, the pruned stages') are dropped, so
      every parameter takes part in the forward (DDP without ``find_unused_parameters``).
    """

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, **kwargs: Any) -> None:
        path = _classifier_path(self)
        super().reset_classifier(num_classes, global_pool, **kwargs)
        new = self.get_submodule(path) if path else None
        kind = getattr(self, HEAD_ATTR, None)
        if isinstance(new, nn.Linear) and kind == "dcd" and getattr(self, "_dynconv_dynamic_classifier", False):
            from .ops.dcd import DCDLinear

            set_submodule(self, path, DCDLinear.from_linear(new).train(new.training).requires_grad_(
                new.weight.requires_grad))
        elif isinstance(new, nn.Linear) and kind == "kw":
            from .ops.kernelwarehouse import KWLinear

            options = getattr(self, "_dynconv_kw_classifier", None)
            if options is not None:
                layer = KWLinear.from_linear(new, **options)
                set_submodule(self, path, layer.train(new.training).requires_grad_(new.weight.requires_grad))
        self._drop_unused_warehouses()

    def prune_intermediate_layers(self, *args: Any, **kwargs: Any) -> List[int]:
        taken = super().prune_intermediate_layers(*args, **kwargs)
        self._drop_unused_warehouses()
        return taken

    def _drop_unused_warehouses(self) -> None:
        manager = getattr(self, "warehouse_manager", None)
        if manager is not None:
            manager.drop_unused(self)


def _dynamic_head_class(base: type) -> type:
    cls = type(base.__name__, (DynamicHeadMixin, base), {"__module__": __name__})
    cls.__qualname__ = f"_Dynconv{base.__name__}"
    globals()[cls.__qualname__] = cls  # so pickle finds the class by module and qualname
    return cls


_HEAD_CLASSES: Dict[type, type] = {base: _dynamic_head_class(base) for base in (ResNet, EfficientNet, ConvNeXt)}


def _use_dynamic_head(model: nn.Module, family: str, options: Dict[str, Any]) -> None:
    """Give a DCD or KernelWarehouse model the :class:`DynamicHeadMixin` methods (same class name, same
    state dict)."""
    from .ops.dcd import DCDLinear
    from .ops.kernelwarehouse import KWLinear

    if family not in ("dcd", "kw") or type(model) not in _HEAD_CLASSES:
        return
    model.__class__ = _HEAD_CLASSES[type(model)]
    setattr(model, HEAD_ATTR, family)
    classifier = model.get_classifier()
    if family == "dcd":
        model._dynconv_dynamic_classifier = isinstance(classifier, DCDLinear) or (
            not isinstance(classifier, nn.Linear) and options.get("dynamic_classifier", True))
    elif isinstance(classifier, KWLinear):
        # The classifier's warehouse options as the conversion set them (the 1/2x plan's last entries).
        from .ops.kernelwarehouse import _per_warehouse

        manager, idx = classifier.conv.warehouse_manager_ref, classifier.conv.warehouse_id
        count = len(manager.weights)
        keys = ("reduction", "cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio", "nonlocal_basis_ratio")
        options = {key: _per_warehouse(getattr(manager, key), count, key)[idx] for key in keys}
        model._dynconv_kw_classifier = dict(options, attention_norm=manager.attention_norm,
                                            mixing_epochs=manager.mixing_epochs)


# -- fresh BatchNorm statistics ------------------------------------------------------------------------------

_FRESH_NORM_FAMILIES = ("dcd", "dgc")
FRESH_ATTR = "_dynconv_fresh_statistics"


def _fresh_norm_hook(module: nn.Module, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
    """Eval-mode output of a BatchNorm that has no statistics yet: normalised with the batch's own."""
    if not getattr(module, FRESH_ATTR, False) or module.num_batches_tracked.is_meta:
        return None
    if module.training or int(module.num_batches_tracked) != 0:  # trained, or statistics copied in (EMA)
        setattr(module, FRESH_ATTR, False)
        return None
    x = args[0]
    if x.numel() == x.shape[1]:  # one value per channel: batch statistics are undefined
        return None
    return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)


def _loaded_norm_hook(module: nn.Module, *args: Any) -> None:
    setattr(module, FRESH_ATTR, False)  # a state dict brings statistics (even one without num_batches_tracked)


def use_batch_statistics_until_trained(model: nn.Module) -> int:
    """Until they have seen a training batch or a state dict, ``model``'s BatchNorms normalise with the
    batch's own statistics in eval mode too; returns how many BatchNorms were set up.

    DCD (``P Phi(x) Q^T x``) and DGC (``conv(x * g(x))``) multiply by their input, so with the initial
    running statistics (mean 0, variance 1) a fresh ResNet's eval-mode activations square at every
    block: about 1e3 after layer1, inf/NaN by layer2 (timm's smoke test runs a fresh model in eval). The
    official models (liyunsheng13/dcd ``models/imagenet/resnet_dcd.py``: convs normal(0, sqrt(2/n)),
    BatchNorm weight 1, bias 0; zhuogege1943/dgc ``models/dynamic_resnet.py``: kaiming fan_out, BatchNorm
    1/0) do the same. Filling the running statistics from one synthetic batch is not enough: any other
    input, or another resolution, differs a little from it, and the squaring turns that into inf again.
    Parameters, training mode and trained or loaded models are unaffected; the check costs one read
    of ``num_batches_tracked`` per BatchNorm and eval forward, only while a BatchNorm is still fresh.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            setattr(module, FRESH_ATTR, True)
            module.register_forward_hook(_fresh_norm_hook)
            module._register_load_state_dict_pre_hook(_loaded_norm_hook, with_module=True)
            count += 1
    return count


def create_model(arch: str, conv: str = "static", num_classes: int = 1000,
                 pretrained: Union[None, bool, str, "os.PathLike[str]", Mapping[str, Any]] = None,
                 **overrides: Any) -> nn.Module:
    """Build ``arch`` from timm and apply ``conv`` with the official per-backbone rules.

    Args:
        arch: one of :func:`list_archs`.
        conv: one of :func:`dynconv.list_convs`.
        num_classes: classifier width.
        pretrained: start from the static ``arch``'s weights: a checkpoint path (timm or torchvision state dict,
            or a dynconv ``conv=static`` checkpoint), a state dict, or ``True`` for timm's own weights (needs
            network access). The dynamic layers are initialised from the static kernels so the network starts
            at the static function where the method allows (see :func:`dynconv.pretrained.init_from_static`;
            its report is kept as ``model.pretrained_report``). ``None`` / ``False``: fresh weights.
        **overrides: family options (``kernel_num``, ``reduction``, ``temperature_epochs``,
            ``cell_num_ratio``, ...) override the variant; ``drop_path_mode`` (``"linear"``, timm's ramp
            over the blocks, or ``"uniform"``, every block at ``drop_path_rate``: see
            :func:`set_uniform_drop_path`); ``schedule_steps_per_epoch`` (training batches per epoch: the
            model advances its own schedules, for loops that never call :func:`dynconv.set_progress`; see
            :func:`dynconv.drive_schedules`); anything else goes to ``timm.create_model`` (``drop_rate``,
            ``drop_path_rate``, ``in_chans``, ...).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    drop_path_mode = overrides.pop("drop_path_mode", "linear")
    steps_per_epoch = overrides.pop("schedule_steps_per_epoch", None)
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
        options = {**_arch_defaults(variant, arch), **conv_options}
        convert(model, conv, **options)
        _use_dynamic_head(model, variant.family, options)
        if variant.family in _FRESH_NORM_FAMILIES:
            use_batch_statistics_until_trained(model)
    if pretrained is not None and pretrained is not False:
        from .pretrained import init_from_static

        model.pretrained_report = init_from_static(model, pretrained, arch=arch)
        _logger.info("%s", model.pretrained_report)
    if steps_per_epoch is not None:
        drive_schedules(model, steps_per_epoch)
    return model

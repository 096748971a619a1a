"""``convert``: in-place replacement of a model's convolutions by a conv variant.

Surgery, not forks: the model is walked, the sites chosen by the per-backbone rules
(:mod:`dynconv.surgery.rules`) are rebuilt with the family's ``from_conv`` and set back on their parents.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

from torch import nn

from ..ops.condconv import CondConv2d
from ..ops.dcd import DCDConv2d, DCDLinear, mobilenetv2_dims
from ..ops.dgc import DGCConv2d
from ..ops.dyconv import DynamicConv2d
from ..ops.fdconv import FDConv2d
from ..ops.odconv import ODConv2d
from ..registry import get_variant
from ..schedules import attention_temperature, dgc_pruning
from .attention import insert_residual_attention
from .rules import LAYER_RULES
from .sites import GENERIC, MOBILENETV2, RESNET, ConvSite, conv_sites, detect_backbone, get_submodule, set_submodule

VARIANT_ATTR = "dynconv_variant"


@dataclass
class ConvertReport:
    """What :func:`convert` did.

    Attributes:
        variant: the conv variant applied.
        backbone: the resolver used (``resnet``, ``mobilenetv2``, ``convnext`` or ``generic``).
        replaced: ``(module path, new type name)`` per replaced or inserted layer.
        kept: paths of the convolutions left static.
        params_before, params_after: parameter counts around the conversion.
    """

    variant: str
    backbone: str
    replaced: List[Tuple[str, str]] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        return (
            f"{self.variant} on {self.backbone}: replaced {len(self.replaced)} layers, kept {len(self.kept)} static; "
            f"params {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M"
        )


Converter = Callable[[nn.Module, List[ConvSite], str, Dict[str, Any]], List[Tuple[str, str]]]


def _check_options(layer_cls: type, options: Dict[str, Any]) -> None:
    accepted = set(inspect.signature(layer_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"{layer_cls.__name__} has no option(s) {unknown}; it accepts {sorted(accepted)}")


def per_layer_converter(layer_cls: type, family: str) -> Converter:
    """Converter for families whose layers are independent: ``layer_cls.from_conv`` per chosen site."""

    def convert_sites(model: nn.Module, sites: List[ConvSite], backbone: str, options: Dict[str, Any]):
        options = dict(options)
        if "temperature_epochs" in options:
            options["temperature"] = attention_temperature(options.pop("temperature_epochs"))
        _check_options(layer_cls, options)
        rule = LAYER_RULES[family][backbone]
        replaced = []
        for site in sites:
            module = get_submodule(model, site.name)
            if isinstance(module, nn.Conv2d) and rule(site):
                set_submodule(model, site.name, layer_cls.from_conv(module, **options))
                replaced.append((site.name, layer_cls.__name__))
        return replaced

    return convert_sites


def _dcd_layer_options(site: ConvSite, conv: nn.Conv2d, backbone: str, bottlenecks: set,
                       fc_squeeze: int) -> Dict[str, Any]:
    """Per-layer shapes of the official DCD models: 2x2 pooling in ResNet BasicBlocks, the DYModule
    rule on MobileNetV2, the Bottleneck (1x1 pool) rule elsewhere."""
    if backbone == RESNET:
        return {"pool": 1 if (site.stage, site.block) in bottlenecks else 2}
    if backbone == MOBILENETV2:
        pool, latent, squeeze = mobilenetv2_dims(conv.in_channels, conv.out_channels, fc_squeeze)
        return {"pool": pool, "latent_dim": latent, "squeeze": squeeze}
    return {}


def _dcd_converter(model, sites, backbone, options):
    options = dict(options)
    fc_squeeze = options.pop("fc_squeeze", 8)
    dynamic_classifier = options.pop("dynamic_classifier", True)
    _check_options(DCDConv2d, options)
    rule = LAYER_RULES["dcd"][backbone]
    bottlenecks = {(s.stage, s.block) for s in sites if s.role == "block" and s.position == 2}
    replaced = []
    for site in sites:
        module = get_submodule(model, site.name)
        if isinstance(module, nn.Conv2d) and rule(site):
            layer_options = {**_dcd_layer_options(site, module, backbone, bottlenecks, fc_squeeze), **options}
            set_submodule(model, site.name, DCDConv2d.from_conv(module, **layer_options))
            replaced.append((site.name, DCDConv2d.__name__))
        elif isinstance(module, nn.Linear) and site.role == "classifier" and dynamic_classifier:
            set_submodule(model, site.name, DCDLinear.from_linear(module))
            replaced.append((site.name, DCDLinear.__name__))
    return replaced


def _dgc_converter(model, sites, backbone, options):
    options = dict(options)
    if "total_epochs" in options:
        options["schedule"] = dgc_pruning(options.pop("total_epochs"))
    # The official layer's internal BN-ReLU belongs to post-activation ResNets (and generic CNNs);
    # MobileNetV2 and ConvNeXt convs already see normalised, activated inputs.
    options.setdefault("preactivation", backbone in (RESNET, GENERIC))
    _check_options(DGCConv2d, options)
    heads = options.get("heads", 4)
    rule = LAYER_RULES["dgc"][backbone]
    replaced = []
    for site in sites:
        module = get_submodule(model, site.name)
        if (isinstance(module, nn.Conv2d) and rule(site) and module.groups == 1
                and module.in_channels % heads == 0 and module.out_channels % heads == 0):
            set_submodule(model, site.name, DGCConv2d.from_conv(module, **options))
            replaced.append((site.name, DGCConv2d.__name__))
    return replaced


def _fdconv_converter(model, sites, backbone, options):
    """The official ``FDConv`` size test on top of the site rule: ``groups == 1``, ``min(C_in, C_out) >
    use_fdconv_if_c_gt`` (16) and a square kernel of a size in ``use_fdconv_if_k_in`` (1, 3); other convs stay
    static (official ``FDConv.__init__`` returns before building anything and ``forward`` falls back to
    ``nn.Conv2d``'s; ``groups == 1`` because FDW transforms the whole kernel matrix)."""
    options = dict(options)
    c_gt = options.pop("use_fdconv_if_c_gt", 16)
    k_in = tuple(options.pop("use_fdconv_if_k_in", (1, 3)))
    _check_options(FDConv2d, options)
    rule = LAYER_RULES["fdconv"][backbone]
    replaced = []
    for site in sites:
        module = get_submodule(model, site.name)
        if (isinstance(module, nn.Conv2d) and rule(site) and module.groups == 1
                and min(module.in_channels, module.out_channels) > c_gt
                and module.kernel_size[0] == module.kernel_size[1] and module.kernel_size[0] in k_in):
            set_submodule(model, site.name, FDConv2d.from_conv(module, **options))
            replaced.append((site.name, FDConv2d.__name__))
    return replaced


def _attention_converter(model, sites, backbone, options):
    return insert_residual_attention(model, backbone, **options)


def _kw_converter(model, sites, backbone, options):
    from .kernelwarehouse import convert_kernelwarehouse

    return convert_kernelwarehouse(model, sites, backbone, **options)


def _icconv_converter(model, sites, backbone, options):
    from .icconv import convert_icconv

    return convert_icconv(model, sites, backbone, options)


_CONVERTERS: Dict[str, Converter] = {
    "condconv": per_layer_converter(CondConv2d, "condconv"),
    "dyconv": per_layer_converter(DynamicConv2d, "dyconv"),
    "odconv": per_layer_converter(ODConv2d, "odconv"),
    "attention": _attention_converter,
    "dcd": _dcd_converter,
    "dgc": _dgc_converter,
    "fdconv": _fdconv_converter,
    "kw": _kw_converter,
    "icconv": _icconv_converter,
}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convert(model: nn.Module, conv: str, **overrides: Any) -> ConvertReport:
    """Apply the conv variant ``conv`` to ``model`` in place.

    Known backbones (timm/torchvision ResNet, timm MobileNetV2 and ConvNeXt) get the layers the
    variant's paper made dynamic; any other CNN gets every ``nn.Conv2d`` except the first.

    Args:
        model: any ``nn.Module``.
        conv: a name from :func:`dynconv.list_convs`.
        **overrides: family options replacing the variant's (e.g. ``kernel_num=2``, ``reduction=0.125``,
            ``temperature_epochs=5``).

    Returns:
        A :class:`ConvertReport`. Converting a model that already carries this variant is a no-op
        (empty report).

    Raises:
        ValueError: unknown variant, a model already converted to another variant, or no layer matched.
    """
    variant = get_variant(conv)
    backbone = detect_backbone(model)
    report = ConvertReport(variant.name, backbone, params_before=_num_params(model))
    current = getattr(model, VARIANT_ATTR, "static")
    if current == variant.name or variant.family == "static":
        if current != variant.name:
            raise ValueError(f"model was converted to {current!r}; 'static' cannot undo it, build a fresh model")
        report.params_after = report.params_before
        return report
    if current != "static":
        raise ValueError(f"model was already converted to {current!r}; build a fresh model to apply {conv!r}")

    sites = conv_sites(model, backbone)
    report.replaced = _CONVERTERS[variant.family](model, sites, backbone, {**variant.options, **overrides})
    if not report.replaced:
        raise ValueError(f"{conv!r} matched no layer of this {backbone} model ({type(model).__name__})")
    touched = {name for name, _ in report.replaced}
    report.kept = [s.name for s in sites if s.name not in touched and s.role != "classifier"]
    report.params_after = _num_params(model)
    setattr(model, VARIANT_ATTR, variant.name)
    return report

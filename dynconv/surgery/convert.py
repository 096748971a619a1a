"""``convert``: in-place replacement of a model's convolutions by a conv variant.

Surgery, not forks: the model's convolutions are found (:mod:`dynconv.surgery.sites`), and the variant's family
(:class:`dynconv.Family`) replaces the ones its per-backbone rules choose: by default each with its layer's
``from_conv``, or by the family's own placement.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

from torch import nn

from ..registry import Family, get_family, get_variant
from .sites import ConvSite, conv_sites, detect_backbone, get_submodule, set_submodule

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


def check_options(layer_cls: type, options: Mapping[str, Any]) -> None:
    """Raise naming the options ``layer_cls`` does not take (and the ones it does)."""
    accepted = set(inspect.signature(layer_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"{layer_cls.__name__} has no option(s) {unknown}; it accepts {sorted(accepted)}")


def replace_sites(model: nn.Module, sites: Sequence[ConvSite], chosen: Callable[[ConvSite, nn.Module], bool],
                  build: Callable[[ConvSite, nn.Module], nn.Module]) -> List[Tuple[str, str]]:
    """Put ``build(site, module)`` in place of every site's module for which ``chosen(site, module)`` holds;
    returns ``(path, new type name)`` per replaced layer."""
    replaced = []
    for site in sites:
        module = get_submodule(model, site.name)
        if chosen(site, module):
            new = build(site, module)
            set_submodule(model, site.name, new)
            replaced.append((site.name, type(new).__name__))
    return replaced


def per_site_placement(family: Family, model: nn.Module, sites: Sequence[ConvSite], backbone: str,
                       options: Dict[str, Any]) -> List[Tuple[str, str]]:
    """The default placement: ``family.layers[0].from_conv`` on every ``nn.Conv2d`` its rule for ``backbone``
    chooses (none where the family has no rule for it)."""
    layer_cls = family.layers[0]
    check_options(layer_cls, options)
    rule = family.rules.get(backbone)
    if rule is None:
        return []
    return replace_sites(model, sites, lambda site, module: isinstance(module, nn.Conv2d) and rule(site),
                         lambda site, module: layer_cls.from_conv(module, **options))


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
    family = get_family(variant.family)
    backbone = detect_backbone(model)
    report = ConvertReport(variant.name, backbone, params_before=_num_params(model))
    current = getattr(model, VARIANT_ATTR, "static")
    if current == variant.name or family.is_identity:
        if current != variant.name:
            raise ValueError(f"model was converted to {current!r}; 'static' cannot undo it, build a fresh model")
        report.params_after = report.params_before
        return report
    if current != "static":
        raise ValueError(f"model was already converted to {current!r}; build a fresh model to apply {conv!r}")

    sites = conv_sites(model, backbone)
    options = family.translate_options({**variant.options, **overrides})
    if family.placement is not None:
        report.replaced = family.placement(model, sites, backbone, options)
    else:
        report.replaced = per_site_placement(family, model, sites, backbone, options)
    if not report.replaced:
        raise ValueError(f"{conv!r} matched no layer of this {backbone} model ({type(model).__name__})")
    touched = {name for name, _ in report.replaced}
    report.kept = [s.name for s in sites if s.name not in touched and s.role != "classifier"]
    report.params_after = _num_params(model)
    setattr(model, VARIANT_ATTR, variant.name)
    return report

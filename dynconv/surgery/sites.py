"""Where the convolutions of each supported backbone sit, as ``ConvSite`` records.

This is the only per-backbone code in dynconv: a resolver per family of backbones maps module paths
to (role, stage, block, position). Which sites a conv variant makes dynamic is decided from these
records by :mod:`dynconv.surgery.rules`; models themselves are never forked.

Stage numbering follows the official code of the methods: ResNet ``layer1`` is stage 0, timm's
MobileNetV2 ``blocks.i`` is stage ``i``, ConvNeXt ``stages.i`` is stage ``i``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

from torch import nn

RESNET, MOBILENETV2, CONVNEXT, GENERIC = "resnet", "mobilenetv2", "convnext", "generic"


@dataclass(frozen=True)
class ConvSite:
    """One replaceable layer.

    Attributes:
        name: dotted module path (``layer2.0.conv1``).
        role: ``stem``, ``block`` (ResNet block conv), ``downsample``, ``pw_expand``, ``dw``,
            ``pw_project``, ``head`` (MobileNetV2 final 1x1), ``pw`` (ConvNeXt MLP), ``classifier``,
            or ``conv`` (generic).
        stage: stage index (see module docstring); generic: number of strided convs before it.
        block: block index inside the stage.
        position: index of the layer inside its block, in forward order.
        block_kind: ResNet ``basic`` or ``bottleneck`` (rules that differ between the two depths).
    """

    name: str
    role: str
    stage: int = 0
    block: int = 0
    position: int = 0
    block_kind: str = ""


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _first_conv(module: nn.Module) -> Optional[str]:
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    return None


def _is_resnet(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("conv1", "layer1", "layer2", "layer3", "layer4", "fc"))


def _is_mobilenetv2(model: nn.Module) -> bool:
    if not all(hasattr(model, a) for a in ("conv_stem", "blocks", "conv_head", "classifier")):
        return False
    kinds = {type(b).__name__ for stage in model.blocks for b in stage}
    return kinds <= {"DepthwiseSeparableConv", "InvertedResidual"}


def _is_convnext(model: nn.Module) -> bool:
    return type(model).__name__ == "ConvNeXt" and hasattr(model, "stem") and hasattr(model, "stages")


def detect_backbone(model: nn.Module) -> str:
    """``resnet`` (timm or torchvision), ``mobilenetv2`` (timm), ``convnext`` (timm) or ``generic``."""
    for kind, test in ((RESNET, _is_resnet), (MOBILENETV2, _is_mobilenetv2), (CONVNEXT, _is_convnext)):
        if test(model):
            return kind
    return GENERIC


def _resnet_sites(model: nn.Module) -> Iterator[ConvSite]:
    yield ConvSite("conv1", "stem")
    for s in range(4):
        for b, block in enumerate(getattr(model, f"layer{s + 1}")):
            prefix = f"layer{s + 1}.{b}"
            kind = "bottleneck" if isinstance(getattr(block, "conv3", None), nn.Conv2d) else "basic"
            for p, conv in enumerate(("conv1", "conv2", "conv3")):
                if isinstance(getattr(block, conv, None), nn.Conv2d):
                    yield ConvSite(f"{prefix}.{conv}", "block", s, b, p, kind)
            if getattr(block, "downsample", None) is not None:
                inner = _first_conv(block.downsample)
                if inner is not None:
                    yield ConvSite(f"{prefix}.downsample.{inner}", "downsample", s, b, 3)
    yield ConvSite("fc", "classifier", 4)


def _mobilenetv2_sites(model: nn.Module) -> Iterator[ConvSite]:
    yield ConvSite("conv_stem", "stem")
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            prefix = f"blocks.{s}.{b}"
            if type(block).__name__ == "DepthwiseSeparableConv":
                layers = (("conv_dw", "dw"), ("conv_pw", "pw_project"))
            else:
                layers = (("conv_pw", "pw_expand"), ("conv_dw", "dw"), ("conv_pwl", "pw_project"))
            for p, (attr, role) in enumerate(layers):
                yield ConvSite(f"{prefix}.{attr}", role, s, b, p)
    yield ConvSite("conv_head", "head", len(model.blocks))
    yield ConvSite("classifier", "classifier", len(model.blocks) + 1)


def _convnext_sites(model: nn.Module) -> Iterator[ConvSite]:
    yield ConvSite("stem.0", "stem")
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            inner = _first_conv(stage.downsample)
            yield ConvSite(f"stages.{s}.downsample.{inner}", "downsample", s)
        for b, _ in enumerate(stage.blocks):
            prefix = f"stages.{s}.blocks.{b}"
            yield ConvSite(f"{prefix}.conv_dw", "dw", s, b, 0)
            yield ConvSite(f"{prefix}.mlp.fc1", "pw", s, b, 1)
            yield ConvSite(f"{prefix}.mlp.fc2", "pw", s, b, 2)
    yield ConvSite("head.fc", "classifier", len(model.stages))


def _generic_sites(model: nn.Module) -> Iterator[ConvSite]:
    stage, first = 0, True
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            yield ConvSite(name, "stem" if first else "conv", stage)
            first = False
            if max(m.stride) > 1:
                stage += 1


_RESOLVERS: dict[str, Callable[[nn.Module], Iterator[ConvSite]]] = {
    RESNET: _resnet_sites,
    MOBILENETV2: _mobilenetv2_sites,
    CONVNEXT: _convnext_sites,
    GENERIC: _generic_sites,
}


def conv_sites(model: nn.Module, backbone: Optional[str] = None) -> List[ConvSite]:
    """All sites of ``model`` whose module is still a plain ``nn.Conv2d`` or ``nn.Linear``."""
    backbone = backbone or detect_backbone(model)
    sites = []
    for site in _RESOLVERS[backbone](model):
        module = get_submodule(model, site.name)
        if type(module) in (nn.Conv2d, nn.Linear):
            sites.append(site)
    return sites

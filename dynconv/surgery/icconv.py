"""Where Inception convolutions go in a backbone, and which pattern each one takes.

Liu et al., "Inception Convolution with Efficient Dilation Search", CVPR 2021, arXiv:2012.13587; placement as
the official ``ic_resnet`` (yifan123/IC-Conv), patterns as its ``pattern_zoo`` and README model zoo.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..ops.icconv import InceptionConv2d, Pattern
from ..patterns import default_patterns, load_patterns, official_pattern_path
from .sites import CONVNEXT, MOBILENETV2, RESNET, ConvSite, get_submodule, set_submodule


def icconv_sites(model: nn.Module, sites: Sequence[ConvSite], backbone: str) -> List[ConvSite]:
    """The sites IC-Conv replaces, in network order.

    ResNet: every block conv with a 3x3 kernel (both BasicBlock convs, a Bottleneck's ``conv2``; stem,
    1x1 and downsample convs stay), as the official ``ic_resnet``; MobileNetV2 and ConvNeXt: the
    depthwise convs; any other CNN: every conv but the stem with an odd kernel larger than 1.
    """
    chosen = []
    inside = [name for name, m in model.named_modules() if isinstance(m, InceptionConv2d)]
    for site in sites:
        module = get_submodule(model, site.name)
        if type(module) is not nn.Conv2d or any(site.name.startswith(f"{p}.") for p in inside):
            continue
        k = module.kernel_size
        if backbone == RESNET:
            keep = site.role == "block" and k == (3, 3)
        elif backbone in (MOBILENETV2, CONVNEXT):
            keep = site.role == "dw"
        else:
            keep = site.role == "conv"
        if keep and min(k) % 2 == 1 and max(k) > 1:
            chosen.append(site)
    return chosen


def _group_unit(conv: nn.Conv2d) -> int:
    return conv.out_channels // conv.groups if conv.groups > 1 else 1


OFFICIAL_TASKS = ("detection", "segmentation")


def official_task_patterns(arch: str, task: str) -> Optional[str]:
    """The shipped pattern file the official models of ``task`` use on ``arch``, or None if there is none.

    The yifan123/IC-Conv README model zoo pairs every Faster / Cascade R-CNN row with
    ``pattern_zoo/detection/ic_resnet{50,101}_k9.json`` and every Mask R-CNN (instance segmentation) row
    with ``pattern_zoo/segmentation/ic_resnet{50,101}_k9.json``; only ResNet50 and ResNet101 have files.
    """
    if task not in OFFICIAL_TASKS:
        raise ValueError(f"task {task!r}: the official IC-Conv patterns are for {', '.join(OFFICIAL_TASKS)}")
    if arch not in ("resnet50", "resnet101"):
        return None
    return f"{task}_ic_{arch}_k9"


def _official_default(widths: List[int]) -> Optional[List[Pattern]]:
    """The official detection patterns when the layers are those of ResNet50 (16) or ResNet101 (33):
    same count and widths (ResNet18 also has 16 such layers, with other widths)."""
    for name in ("detection_ic_resnet50_k9", "detection_ic_resnet101_k9"):
        patterns = load_patterns(official_pattern_path(name))
        if [sum(p.values()) for p in patterns] == widths:
            return patterns
    return None


def convert_icconv(model: nn.Module, sites: Sequence[ConvSite], backbone: str,
                   options: Optional[Mapping[str, Any]] = None) -> List[Tuple[str, str]]:
    """Replace the IC-Conv sites (:func:`icconv_sites`) by :class:`InceptionConv2d`, layer ``i`` taking
    pattern ``i``.

    Options:
        patterns: a pattern file, the name of a shipped one, or a list (:func:`load_patterns`). Default:
            the official detection k9 patterns when the layers are ResNet50's (16) or ResNet101's (33)
            3x3 convs, else :func:`default_patterns`.
        grid: grid of the default patterns (``"k9"``).
        impl: forward implementation of the new layers (``"auto"``).

    Returns ``(path, "InceptionConv2d")`` per replaced layer.
    """
    options = dict(options or {})
    source = options.pop("patterns", None)
    grid = options.pop("grid", "k9")
    impl = options.pop("impl", "auto")
    if options:
        raise TypeError(f"icconv has no option(s) {sorted(options)}; it accepts ['grid', 'impl', 'patterns']")
    chosen = icconv_sites(model, sites, backbone)
    if not chosen:
        return []
    convs = [get_submodule(model, s.name) for s in chosen]
    widths = [c.out_channels for c in convs]
    if source is not None:
        patterns = load_patterns(source)
    else:
        patterns = (_official_default(widths) if backbone == RESNET else None) or default_patterns(
            widths, [s.stage for s in chosen], grid, units=[_group_unit(c) for c in convs])
    if len(patterns) != len(chosen):
        raise ValueError(f"{len(patterns)} patterns for {len(chosen)} IC-Conv layers "
                         f"({chosen[0].name} ... {chosen[-1].name})")
    for i, (site, conv, pattern) in enumerate(zip(chosen, convs, patterns)):
        if sum(pattern.values()) != conv.out_channels:
            raise ValueError(f"pattern {i} ({site.name}) has {sum(pattern.values())} channels, "
                             f"the layer has {conv.out_channels}")
    replaced = []
    for i, (site, conv, pattern) in enumerate(zip(chosen, convs, patterns)):
        try:
            layer = InceptionConv2d.from_conv(conv, pattern=pattern, impl=impl)
        except ValueError as e:
            raise ValueError(f"pattern {i} ({site.name}): {e}") from None
        set_submodule(model, site.name, layer)
        replaced.append((site.name, InceptionConv2d.__name__))
    return replaced

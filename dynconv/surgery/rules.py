"""The vocabulary of replacement rules: a rule says, for one backbone kind, whether a conv site becomes dynamic.

Each family states its own rules next to its other facts (:mod:`dynconv.families`), as the official code of its
method places the layers; these are the pieces they are made of. Generic CNNs (any other model): every
``nn.Conv2d`` but the first one (the stem), role ``conv``.
"""
from __future__ import annotations

from typing import Callable, Dict

from .sites import CONVNEXT, GENERIC, MOBILENETV2, RESNET, ConvSite

SiteRule = Callable[[ConvSite], bool]


def roles(*names: str) -> SiteRule:
    """The sites whose role is one of ``names`` (see :class:`~dynconv.surgery.sites.ConvSite`)."""
    return lambda site: site.role in names


# Every conv but the stem, downsample included (DY-Conv's rule, "all convolutional layers except the first").
ALL_BUT_STEM: Dict[str, SiteRule] = {
    RESNET: roles("block", "downsample"),
    MOBILENETV2: roles("pw_expand", "dw", "pw_project", "head"),
    CONVNEXT: roles("dw", "pw", "downsample"),
    GENERIC: roles("conv"),
}

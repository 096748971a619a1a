"""The conv variants users name on the command line (``conv=odconv_4x``) and what each one means."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Mapping


@dataclass(frozen=True)
class ConvVariant:
    """A named configuration of one conv family.

    Attributes:
        name: the public name, e.g. ``odconv_4x``.
        family: ``static``, ``attention``, ``condconv``, ``dyconv``, ``dcd``, ``odconv``, ``kw``, ``dgc``,
            ``icconv`` or ``fdconv``.
        options: the family options that define the variant (overridable per call).
        summary: one line for listings.
        timm_name: prefix of its timm model names when not the name without underscores.
    """

    name: str
    family: str
    options: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    timm_name: str = ""

    @property
    def timm_prefix(self) -> str:
        """Prefix of the timm model names: ``odconv_4x`` -> ``odconv4x`` (``odconv4x_resnet18``);
        ``icconv`` -> ``ic`` (``ic_resnet50``, the official IC-Conv model names)."""
        return self.timm_name or self.name.replace("_", "")


def _kw(name: str, cells: float, in_out: float, summary: str) -> ConvVariant:
    ratios = dict(cell_num_ratio=cells, cell_inplane_ratio=in_out, cell_outplane_ratio=in_out)
    return ConvVariant(name, "kw", ratios, summary)


_VARIANTS: Dict[str, ConvVariant] = {
    v.name: v
    for v in (
        ConvVariant("static", "static", {}, "the unmodified backbone"),
        ConvVariant("se", "attention", {"kind": "se"}, "squeeze-and-excitation on each residual branch (r=16)"),
        ConvVariant("cbam", "attention", {"kind": "cbam"}, "CBAM channel + spatial gates on each residual branch"),
        ConvVariant("eca", "attention", {"kind": "eca"}, "ECA 1-D channel attention on each residual branch"),
        ConvVariant("condconv_8x", "condconv", {"num_experts": 8}, "CondConv, 8 experts, sigmoid routing"),
        ConvVariant("dyconv_4x", "dyconv", {"num_kernels": 4}, "DY-Conv, 4 kernels, softmax attention"),
        ConvVariant("dcd", "dcd", {}, "DCD, dynamic channel scaling plus a low-rank dynamic residual"),
        ConvVariant("odconv_1x", "odconv", {"kernel_num": 1}, "ODConv, 1 kernel, four attentions"),
        ConvVariant("odconv_2x", "odconv", {"kernel_num": 2}, "ODConv, 2 kernels"),
        ConvVariant("odconv_4x", "odconv", {"kernel_num": 4}, "ODConv, 4 kernels"),
        _kw("kw_1d4x", 0.25, 0.5, "KernelWarehouse, budget 1/4x"),
        _kw("kw_1d2x", 0.5, 0.5, "KernelWarehouse, budget 1/2x"),
        _kw("kw_1x", 1, 1, "KernelWarehouse, budget 1x"),
        _kw("kw_2x", 2, 1, "KernelWarehouse, budget 2x"),
        _kw("kw_4x", 4, 1, "KernelWarehouse, budget 4x"),
        ConvVariant("dgc", "dgc", {"heads": 4, "pruning_rate": 0.55},
                    "DGC, 4 heads each dropping 55% of the input channels per sample"),
        ConvVariant("icconv", "icconv", {}, "Inception convolution: per-channel dilation patterns from a pattern file",
                    timm_name="ic"),
        ConvVariant("fdconv", "fdconv", {"kernel_num": 64},
                    "FDConv, 64 frequency-disjoint kernels with KSM and FBM (the official detection setting)"),
    )
}
for _v in _VARIANTS.values():
    object.__setattr__(_v, "options", MappingProxyType(dict(_v.options)))


def list_convs() -> List[str]:
    """Names of every conv variant, in table order."""
    return list(_VARIANTS)


def get_variant(name: str) -> ConvVariant:
    """The variant called ``name``; an unknown name raises with the list of valid ones."""
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown conv variant {name!r}; choose one of: {', '.join(_VARIANTS)}") from None


def variant_from_timm_prefix(prefix: str) -> ConvVariant:
    for v in _VARIANTS.values():
        if v.timm_prefix == prefix:
            return v
    raise ValueError(f"no conv variant has the timm prefix {prefix!r}")

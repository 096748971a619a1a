"""KernelWarehouse: kernel cells shared across the layers of a stage through warehouses, mixed per sample.

Li, Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024, arXiv:2308.08361; official
code OSVAI/KernelWarehouse. Layers: :class:`~dynconv.ops.kernelwarehouse.KWConv2d` (and ``KWLinear`` for the 1/2x
MobileNetV2 classifier); which layers take cells from which warehouse: :mod:`dynconv.surgery.kernelwarehouse`.
"""
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..models import use_dynamic_head
from ..official import kw_layout
from ..ops.kernelwarehouse import KWAttention, KWConv2d, KWLinear, _per_warehouse, cell_assignment
from ..pretrained import PretrainedReport, copy_bias, set_param
from ..registry import ConvVariant, Family, register_family
from ..surgery.kernelwarehouse import KW_OPTIONS, convert_kernelwarehouse


def _variant(name: str, cells: float, in_out: float, summary: str) -> ConvVariant:
    ratios = dict(cell_num_ratio=cells, cell_inplane_ratio=in_out, cell_outplane_ratio=in_out)
    return ConvVariant(name, ratios, summary)


def place(model, sites, backbone, options):
    return convert_kernelwarehouse(model, sites, backbone, **options)


_CLASSIFIER_KEYS = ("reduction", "cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio", "nonlocal_basis_ratio")


def prepare(model: nn.Module, options: Dict[str, Any]) -> None:
    """A KW classifier is rebuilt as one after ``reset_classifier``, and warehouses no layer uses any more are
    dropped (see :class:`dynconv.models.DynamicHeadMixin`)."""
    if not use_dynamic_head(model, "kw"):
        return
    classifier = model.get_classifier()
    if isinstance(classifier, KWLinear):
        # The classifier's warehouse options as the conversion set them (the 1/2x plan's last entries).
        manager, idx = classifier.conv.warehouse_manager_ref, classifier.conv.warehouse_id
        count = len(manager.weights)
        kept = {key: _per_warehouse(getattr(manager, key), count, key)[idx] for key in _CLASSIFIER_KEYS}
        model._dynconv_kw_classifier = dict(kept, attention_norm=manager.attention_norm,
                                            mixing_epochs=manager.mixing_epochs)


def rebuild_classifier(model: nn.Module, new: nn.Linear) -> Optional[nn.Module]:
    """A KW classifier (1/2x MobileNetV2) comes back as a KW layer with the same cell ratios, in its own
    warehouse (the old warehouse held that classifier's cells only)."""
    options = getattr(model, "_dynconv_kw_classifier", None)
    return None if options is None else KWLinear.from_linear(new, **options)


# -- from a static kernel ----------------------------------------------------------------------------------

# Logit of each mixture's own cell when the attention starts from static weights: the attention normalises its
# logits as z / (sum |z| + 1e-3), so a logit c keeps c / (c + 1e-3) of its cell and the kernel is
# W ((1 - tau) c / (c + 1e-3) + tau): exact at tau = 1, off by 1e-4 (1 - tau) at c = 10. Larger c would be
# closer still but shrinks what the learnt logits change; 10 fine-tunes (results/finetune_static_demo.md).
KW_START_LOGIT = 10.0


def _blocks(layer: KWConv2d, weight: torch.Tensor) -> torch.Tensor:
    """``(m, c_out, c_in)``: the block of ``weight`` each mixture fills (inverse of ``KWConv2d.kernel``)."""
    c_out, c_in = layer.warehouse_manager_ref.cell_shapes[layer.warehouse_id]
    w = weight.reshape(layer.blocks_out, c_out, layer.blocks_in, c_in, layer.blocks_spatial)
    return w.permute(4, 0, 2, 1, 3).reshape(layer.num_mixtures, c_out, c_in)


def _cell_ratio(manager: Any, idx: int) -> float:
    return float(_per_warehouse(manager.cell_num_ratio, len(manager.weights), "cell_num_ratio")[idx])


def _is_root_manager(layer: KWConv2d) -> bool:
    return getattr(layer, "warehouse_manager", None) is not layer.warehouse_manager_ref


def _start_attention_at_its_cells(att: KWAttention, path: str, report: PretrainedReport) -> None:
    """The attention's logits start at ``KW_START_LOGIT * beta`` for every input: at every tau each mixture
    then takes (almost only) the cell that holds its block of the static kernel. With the official random
    init, logits of unrelated cells mix in as soon as tau < 1 and a converted model falls to chance."""
    nn.init.zeros_(att.fc2.weight)
    report.adjusted[f"{path}.attention.fc2.weight"] = "0"
    start = KW_START_LOGIT * att.temp_bias.flatten()
    if att.fc3 is None:
        set_param(att.fc2.bias, start)
        report.adjusted[f"{path}.attention.fc2.bias"] = f"{KW_START_LOGIT:g} * beta"
    else:  # fc2 has no bias; its zero output reaches fc3 as zeros, so the basis bias alone gives the logits
        set_param(att.basis_bias, start)
        report.adjusted[f"{path}.attention.basis_bias"] = f"{KW_START_LOGIT:g} * beta"


def from_static(layer: KWConv2d, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    """Each layer's cells hold the blocks of ``W`` that its mixtures take at ``tau = 1`` (exact at the start of
    the schedule for budgets >= 1x; below 1x the mixtures that the official assignment leaves on the zero cell
    lose their block: not preserved)."""
    manager = layer.warehouse_manager_ref
    bank = manager.take_cell(layer.warehouse_id)
    ratio = _cell_ratio(manager, layer.warehouse_id)
    blocks = _blocks(layer, weight.reshape(layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size))
    start = layer.cell_range[0]
    offsets = cell_assignment(layer.num_mixtures, ratio)
    owned = [(j, start + o) for j, o in enumerate(offsets) if o is not None]
    for j, cell in owned:
        set_param(bank[cell], blocks[j])
    key = f"warehouse_manager.weights.{layer.warehouse_id}"
    if not _is_root_manager(layer):
        key = f"{path}.{key}"
    layers = report._kw_layers.setdefault(key, [])
    layers.append(f"{path}.weight -> cells {start}:{layer.cell_range[1]} ({len(owned)}/{layer.num_mixtures} blocks)")
    report.mapped[key] = f"cells from the blocks of {len(layers)} static kernels at tau = 1"
    copy_bias(layer, path, bias, report)
    if len(owned) == layer.num_mixtures:
        _start_attention_at_its_cells(layer.attention, path, report)
    if len(owned) < layer.num_mixtures:
        report.worsen("not preserved")
        report.notes.append(
            f"{path}: budget {ratio:g}x < 1: at tau = 1 {layer.num_mixtures - len(owned)} of {layer.num_mixtures} "
            "mixtures take the zero cell (official assignment), so their blocks of the static kernel are lost")


def linear_from_static(layer: KWLinear, path: str, weight: torch.Tensor, bias, report: PretrainedReport) -> None:
    from_static(layer.conv, f"{path}.conv", weight, bias, report)


# -- timm config names -------------------------------------------------------------------------------------


def timm_names(variant: ConvVariant, arch: str, first_conv, classifier):
    """A KW stem (MobileNetV2, ConvNeXt) has no ``weight``: the input reaches its attention's ``fc1`` (its cells
    sit in ``warehouse_manager.weights``); the 1/2x MobileNetV2 classifier's per-class parameters are its
    attention's ``fc2`` (and the bank)."""
    if not arch.startswith("resnet"):
        first_conv = f"{first_conv}.attention.fc1"
    if variant.name == "kw_1d2x" and arch.startswith("mobilenetv2"):
        classifier = f"{classifier}.conv.attention.fc2"
    return first_conv, classifier


KERNELWAREHOUSE = register_family(Family(
    "kw",
    layers=(KWConv2d, KWLinear),
    variants=(
        _variant("kw_1d4x", 0.25, 0.5, "KernelWarehouse, budget 1/4x"),
        _variant("kw_1d2x", 0.5, 0.5, "KernelWarehouse, budget 1/2x"),
        _variant("kw_1x", 1, 1, "KernelWarehouse, budget 1x"),
        _variant("kw_2x", 2, 1, "KernelWarehouse, budget 2x"),
        _variant("kw_4x", 4, 1, "KernelWarehouse, budget 4x"),
    ),
    placement=place,
    options=KW_OPTIONS,
    layer_options=False,
    arch_defaults=(
        ("*", "mobilenetv2", {"mixing_epochs": 15}),  # KW MobileNetV2 configs: temp_epoch 15
        ("kw_4x", "mobilenetv2", {"sharing_range": ("layer",)}),  # separate pw0/pw1/dw warehouses
        ("kw_1d2x", "mobilenetv2", {"plan": "mobilenetv2_1d2x"}),  # the hand-built kw1d2x_mobilenetv2 class
        ("kw_1d2x", "resnet50", {"nonlocal_basis_ratio": 0.0625}),
    ),
    prepare=prepare,
    rebuild_classifier=rebuild_classifier,
    official_layout=kw_layout,
    official_repo="OSVAI/KernelWarehouse",
    from_static={KWConv2d: from_static, KWLinear: linear_from_static},
    timm_names=timm_names,
    width_layers={KWConv2d: lambda path: f"{path}.attention.fc1", KWLinear: lambda path: f"{path}.conv.attention.fc2"},
    # KWConv2d's cells are parameters of the model root, which a leaf would hide from the traced module: it is
    # traced through (its forward reads the bank as a root parameter) while its attention stays a leaf.
    fx_leaves=(KWAttention,),
    paper="Li, Yao, ICML 2024, arXiv:2308.08361",
))

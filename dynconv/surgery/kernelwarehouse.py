"""Where KernelWarehouse layers go and which warehouse each one draws its cells from, per backbone.

Li, Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024, arXiv:2308.08361. The plans
follow the official model files (OSVAI/KernelWarehouse ``models/kw_*.py``): a plan is a list of
``(site name, warehouse name, "conv" | "linear")`` in the official construction order, which fixes the
warehouse creation order (and so the index in ``warehouse_manager.weights``, which official checkpoints need).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from torch import nn

from ..ops.kernelwarehouse import KWConv2d, KWLinear, WarehouseManager
from .sites import CONVNEXT, GENERIC, MOBILENETV2, RESNET, ConvSite, get_submodule, set_submodule

Ratio = Union[float, Sequence[float]]

# Options of convert_kernelwarehouse (the family's option names).
KW_OPTIONS: Tuple[str, ...] = (
    "cell_num_ratio",
    "cell_inplane_ratio",
    "cell_outplane_ratio",
    "reduction",
    "sharing_range",
    "nonlocal_basis_ratio",
    "mixing_epochs",
    "attention_norm",
    "plan",
)

_PLANS = ("mobilenetv2_1d2x",)

# kw1d2x_mobilenetv2 hard-codes these (models/kw1d2x_mobilenetv2.py), one entry per warehouse in
# creation order: stem, dw stages 1-5, stage-6 pw expansion, stage-6 dw, stage-6 pw projection
# (+ final 1x1), classifier.
_MBV2_1D2X = dict(
    reduction=0.03125,
    cell_num_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5),
    cell_inplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
    cell_outplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1),
    sharing_range=("layer",),
)
_MBV2_STAGES = (1, 2, 3, 4, 5, 6, 6)  # KW stage of each of timm's seven MobileNetV2 block groups

PlanEntry = Tuple[str, str, str]


def _resnet_plan(model: nn.Module, sites: List[ConvSite]) -> List[PlanEntry]:
    bottleneck = {(s.stage, s.block) for s in sites if s.role == "block" and s.position == 2}
    blocks_per_stage = {}
    for s in sites:
        if s.role in ("block", "downsample"):
            blocks_per_stage[s.stage] = max(blocks_per_stage.get(s.stage, 0), s.block + 1)
    entries = []
    for s in sites:
        if s.role not in ("block", "downsample"):
            continue
        # The official _make_layer's running block index: blocks of the previous stage at a hand-over.
        carried = blocks_per_stage.get(s.stage - 1, 0)
        if s.role == "downsample":
            conv = get_submodule(model, s.name)
            if max(conv.stride) == 1:
                continue  # KW_ResNet reserves it with enabled=(stride != 1)
            name = f"stage{s.stage - 1}_layer{carried + 1}_conv0"
            order = (s.stage, s.block, 0, 0)  # reserved before the block it belongs to
        else:
            handover = s.block == 0
            if s.position == 0:
                stage = s.stage - 1 if handover else s.stage
                if (s.stage, s.block) not in bottleneck:
                    stage = max(stage, 0)  # BasicBlock: layer1.0.conv1 stays in stage 0
                elif stage < 0:
                    continue  # Bottleneck: layer1.0.conv1 is a plain conv
                name = f"stage{stage}_layer{carried if handover else s.block}_conv0"
            else:
                name = f"stage{s.stage}_layer{0 if handover else s.block}_conv{s.position}"
            order = (s.stage, s.block, 1, s.position)
        entries.append((order, (s.name, name, "conv")))
    return [entry for _, entry in sorted(entries, key=lambda e: e[0])]


def _mobilenetv2_plan(model: nn.Module, sites: List[ConvSite], half: bool) -> List[PlanEntry]:
    groups = len(model.blocks)
    kw_stage = list(_MBV2_STAGES) if groups == len(_MBV2_STAGES) else list(range(1, groups + 1))
    suffix = {"pw_expand": "pwconv0", "dw": "dwconv0", "pw_project": "pwconv1"}
    # Block names of the official constructor: stage index (hand-over blocks use the previous one)
    # and the running layer index, reset after each hand-over block.
    block_names, layer_idx = {}, 0
    for g, stage in enumerate(model.blocks):
        for b in range(len(stage)):
            handover = b == 0 and g > 0 and kw_stage[g] != kw_stage[g - 1]
            block_names[(g, b)] = (kw_stage[g] - 1 if handover else kw_stage[g], layer_idx)
            layer_idx = 0 if handover else layer_idx + 1
    entries = []
    for s in sites:
        if s.role == "stem":
            entries.append((s.name, "stage0_conv0", "conv"))
        elif s.role in suffix:
            stage, layer = block_names[(s.stage, s.block)]
            if half and s.role != "dw" and stage != kw_stage[-1]:
                continue  # kw1d2x: pointwise convs are KW only in the last stage
            entries.append((s.name, f"stage{stage}_layer{layer}_{suffix[s.role]}", "conv"))
        elif s.role == "head":
            entries.append((s.name, f"stage{kw_stage[-1]}_layer{layer_idx}_pwconv1", "conv"))
        elif s.role == "classifier" and half and isinstance(get_submodule(model, s.name), nn.Linear):
            entries.append((s.name, "classifier", "linear"))
    return entries


def _convnext_plan(model: nn.Module, sites: List[ConvSite]) -> List[PlanEntry]:
    # KW_ConvNeXt builds the stem and the three downsample convs before any block.
    pw_index = {1: 1, 2: 2}
    early, blocks = [], []
    for s in sites:
        module = get_submodule(model, s.name)
        kind = "linear" if isinstance(module, nn.Linear) else "conv"
        if s.role == "stem":
            early.append((s.name, "stagestem_conv0", kind))
        elif s.role == "downsample":
            early.append((s.name, f"stage{s.stage - 1}_layerds_conv0", kind))
        elif s.role == "dw":
            blocks.append((s.name, f"stage{s.stage}_layer{s.block}_dwconv0", kind))
        elif s.role == "pw":
            blocks.append((s.name, f"stage{s.stage}_layer{s.block}_pwconv{pw_index[s.position]}", kind))
    return early + blocks


def _generic_plan(model: nn.Module, sites: List[ConvSite]) -> List[PlanEntry]:
    """Every conv but the stem; one warehouse per (stage by cumulative stride, depthwise or not)."""
    entries, counters = [], {}
    for s in sites:
        if s.role != "conv":
            continue
        conv = get_submodule(model, s.name)
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
        key = (s.stage, depthwise)
        layer = counters[key] = counters.get(key, -1) + 1
        kind = "dwconv0" if depthwise else "conv0"
        entries.append((s.name, f"stage{s.stage}_layer{layer}_{kind}", "conv"))
    return entries


_DEFAULT_SHARING = {
    RESNET: ("layer", "conv"),
    MOBILENETV2: ("layer", "pwconv"),
    CONVNEXT: ("layer", "pwconv"),
    GENERIC: ("layer", "conv"),
}


def convert_kernelwarehouse(
    model: nn.Module,
    sites: List[ConvSite],
    backbone: str,
    cell_num_ratio: Ratio = 1,
    cell_inplane_ratio: Ratio = 1,
    cell_outplane_ratio: Ratio = 1,
    reduction: Ratio = 0.0625,
    sharing_range: Union[None, str, Sequence[str]] = None,
    nonlocal_basis_ratio: Ratio = 1.0,
    mixing_epochs: float = 20.0,
    attention_norm: Optional[str] = None,
    plan: Optional[str] = None,
) -> List[Tuple[str, str]]:
    """Replace ``model``'s convolutions by KW layers as the official ``kw_*`` models place them.

    - ResNet: every block conv; a stage's first block hands its first conv over to the previous
      stage's warehouse (Bottleneck ``layer1.0.conv1`` stays plain); the downsample 1x1 only when
      strided, in the previous stage's warehouse; stem and fc plain. One warehouse per stage.
    - MobileNetV2: every conv including the stem and the final 1x1; block groups map to KW stages
      1,2,3,4,5,6,6 with hand-over; ``sharing_range`` ``("layer", "pwconv")`` (1x) puts expansion and
      projection in one warehouse per stage, ``("layer",)`` (4x) keeps them apart.
      ``plan="mobilenetv2_1d2x"`` is the hand-built 1/2x model: pointwise convs KW only in stage 6,
      a KW classifier, and its own per-warehouse ratios (these replace the ratio options).
    - ConvNeXt: stem, the three downsample convs, per stage one depthwise and one pointwise warehouse
      (pointwise layers are 1x1 convs with ``conv_mlp=True``); LayerNorm in the attention.
    - Any other CNN: every conv but the first, one warehouse per (stage, depthwise or not).

    The manager is registered as ``model.warehouse_manager``. Returns ``(path, type name)`` per new layer.
    """
    if plan is not None and plan not in _PLANS:
        raise ValueError(f"unknown KernelWarehouse plan {plan!r}; choose one of {_PLANS}")
    if plan == "mobilenetv2_1d2x" and backbone != MOBILENETV2:
        raise ValueError(f"plan 'mobilenetv2_1d2x' needs a MobileNetV2 backbone, got {backbone!r}")
    if isinstance(getattr(model, "warehouse_manager", None), WarehouseManager):
        raise ValueError("model already has a KernelWarehouse manager; build a fresh model")

    options = dict(
        reduction=reduction,
        cell_num_ratio=cell_num_ratio,
        cell_inplane_ratio=cell_inplane_ratio,
        cell_outplane_ratio=cell_outplane_ratio,
        sharing_range=_DEFAULT_SHARING[backbone] if sharing_range is None else sharing_range,
        nonlocal_basis_ratio=nonlocal_basis_ratio,
    )
    if backbone == RESNET:
        entries = _resnet_plan(model, sites)
    elif backbone == MOBILENETV2:
        entries = _mobilenetv2_plan(model, sites, half=plan == "mobilenetv2_1d2x")
        if plan == "mobilenetv2_1d2x":
            options.update(_MBV2_1D2X)
            if not any(kind == "linear" for *_, kind in entries):  # num_classes=0: no classifier warehouse
                options.update({k: v[:-1] for k, v in _MBV2_1D2X.items() if isinstance(v, tuple) and len(v) > 1})
    elif backbone == CONVNEXT:
        entries = _convnext_plan(model, sites)
    else:
        entries = _generic_plan(model, sites)
    if attention_norm is None:
        attention_norm = "layer" if backbone == CONVNEXT else "batch"
    if not entries:
        return []

    manager = WarehouseManager(**options, attention_norm=attention_norm, mixing_epochs=mixing_epochs)
    replaced = []
    for name, warehouse, kind in entries:
        old = get_submodule(model, name)
        if kind == "linear":
            if not isinstance(old, nn.Linear):
                raise TypeError(f"{name}: expected nn.Linear, found {type(old).__name__}")
            new = KWLinear.from_linear(old, warehouse_manager=manager, warehouse_name=warehouse)
        else:
            if not isinstance(old, nn.Conv2d):
                raise TypeError(f"{name}: expected nn.Conv2d, found {type(old).__name__}")
            if old.padding_mode != "zeros":
                raise ValueError(f"{name}: KWConv2d supports padding_mode='zeros' only, got {old.padding_mode!r}")
            new = KWConv2d(
                old.in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                dilation=old.dilation, groups=old.groups, bias=old.bias is not None, warehouse_manager=manager,
                warehouse_name=warehouse, device=old.weight.device, dtype=old.weight.dtype,
            )
        set_submodule(model, name, new)
        replaced.append((name, type(new).__name__))
    model.warehouse_manager = manager
    manager.store()
    manager.allocate(model)
    return replaced

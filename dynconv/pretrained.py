"""Start a dynamic model from the weights of the static model of the same arch.

:func:`init_from_static` reads a static checkpoint (a timm or torchvision state dict file, a dynconv
``conv=static`` checkpoint, or timm's own weights with ``source=True``), copies every tensor of the layers
that surgery kept, and initialises each dynamic layer from the static kernel it replaced, family by
family, so that the converted network computes what the static one computes wherever the method allows:

========================  ====================================================================================
family                    mapping (exactness)
========================  ====================================================================================
DY-Conv                   every kernel = ``W``, every bias = ``b``; the softmax weights sum to 1 (exact)
CondConv                  routing weight 0, bias 0 (every ``sigmoid`` = 1/2), kernels ``2/K W + e_i`` with
                          ``sum_i e_i = 0`` (exact to rounding; ``e`` breaks the experts' symmetry)
ODConv                    every kernel = ``2^h W``, the ``h`` sigmoid heads (channel, filter, spatial) with
                          zero weights and biases: each attention is exactly 1/2 (exact)
KernelWarehouse           each layer's cells hold the blocks of ``W`` that its mixtures take at ``tau = 1``
                          (exact at the start of the schedule for budgets >= 1x; below 1x the mixtures that
                          the official assignment leaves on the zero cell lose their block: not preserved)
DCD                       ``W0 = W``, ``Lambda = 1`` (``fc_scale`` zero, ``hsigmoid(0) = 1``), ``P = 0`` (exact)
DGC                       head ``h`` takes rows ``h::heads`` of ``W``; saliency ``fc2`` weight 0 (bias 1, the
                          official init: every gate is 1); the internal BatchNorm an identity (exact in eval
                          mode with nothing pruned, i.e. progress before the pruning stage)
FDConv                    ``dft_weight = rfft2(M(W)) / (min(C_in, C_out) // 2)`` (the official conversion,
                          ``tools/convert_to_fdconv.py``); the channel, filter, spatial and kernel heads, the
                          local KSM conv and the FBM maps with zero weights: every ``2 sigmoid`` factor is 1,
                          the kernel attention ``1/n`` (exact to rounding: the FFT round trip, FBM's bands)
IC-Conv                   every member takes its output rows of ``W`` (exact for the members at the static
                          dilation; the other dilations read other pixels: not preserved)
SE / CBAM / ECA           backbone copied, inserted modules fresh (not preserved: gates of about 1/2)
========================  ====================================================================================

Where a head is set to a constant for exactness (CondConv routing, the ODConv sigmoid heads, DCD
``fc_scale`` and ``P``, DGC ``fc2``, FDConv's heads), the layer departs from its paper's random initialisation; a fresh
model (``pretrained=None``) keeps the official one. The heads still get gradients from the first step
(their inputs are not zero), so they move off the constant at once.

FDConv (Linwei-Chen/FDConv, ``FDConv_detection/mmdet_custom/FDConv.py``, ``convert2dftweight``) starts its
``param_ratio`` kernel copies (one in the official configs, and here) from the pretrained static kernel,
identical and unperturbed; DY-Conv,
ODConv and KernelWarehouse do the same here, as their attention differs per kernel and so gives the
copies different gradients. CondConv's constant routing does not, hence its zero-sum perturbation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .checkpoint import CheckpointError, checkpoint_num_classes, load_checkpoint, load_weights, unwrap_model
from .ops._scheduled import schedule_state_keys
from .ops.condconv import CondConv2d
from .ops.dcd import DCDConv2d, DCDLinear
from .ops.dgc import DGCConv2d
from .ops.dyconv import DynamicConv2d
from .ops.fdconv import FDConv2d
from .ops.icconv import InceptionConv2d
from .ops.kernelwarehouse import KWConv2d, KWLinear, cell_assignment
from .ops.odconv import ODConv2d
from .schedules import set_progress

Source = Union[bool, str, "PathLike[str]", Mapping[str, Any]]

SYMMETRY_NOISE = 1e-2  # CondConv: std of the zero-sum expert perturbation, relative to the expert's std


@dataclass
class PretrainedReport:
    """What :func:`init_from_static` did.

    Attributes:
        source: where the static weights came from.
        arch: the static model's arch.
        copied: keys copied unchanged from the static model (layers surgery kept).
        mapped: ``key -> how`` for the dynamic layers' tensors computed from a static kernel.
        adjusted: ``key -> value`` for tensors set to a constant so the layer starts at the static function.
        new: keys left at their fresh (official) initialisation.
        dropped: static keys not used (a classifier of another width).
        exactness: ``"exact"``, ``"exact to rounding"``, ``"eval mode only"`` or ``"not preserved"``, with
            the reason in ``notes``.
        notes: per-family remarks (budgets below 1x, dilations, classifier widths, schedule position).
    """

    source: str
    arch: str
    copied: List[str] = field(default_factory=list)
    mapped: Dict[str, str] = field(default_factory=dict)
    adjusted: Dict[str, str] = field(default_factory=dict)
    new: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    exactness: str = "exact"
    notes: List[str] = field(default_factory=list)
    _kw_layers: Dict[str, List[str]] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        lines = [
            f"{self.arch} from static weights {self.source}: copied {len(self.copied)}, mapped {len(self.mapped)}, "
            f"adjusted {len(self.adjusted)}, newly initialised {len(self.new)}, dropped {len(self.dropped)}; "
            f"function at the start: {self.exactness}"
        ]
        lines += [f"  - {note}" for note in self.notes]
        return "\n".join(lines)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _worsen(self, level: str) -> None:
        order = ("exact", "exact to rounding", "eval mode only", "not preserved")
        if order.index(level) > order.index(self.exactness):
            self.exactness = level


# -- reading the static weights ---------------------------------------------------------------------------


def _model_arch(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") if isinstance(cfg, Mapping) else None


def load_static(arch: str, source: Source) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """``(state dict, where, what was loaded)`` of the static ``arch`` model held by ``source``.

    The file is loaded (``weights_only=True``), strictly, into ``dynconv.create_model(arch, "static")`` with
    the checkpoint's classifier width, so a checkpoint of another arch or conv fails naming its keys.
    ``source=True`` asks timm for its pretrained weights (needs network access or timm's cache).
    """
    from .models import create_model

    if source is True:
        import timm

        try:
            static = timm.create_model(arch, pretrained=True)
        except Exception as err:  # noqa: BLE001  (hub, network and cache errors have no common type)
            raise RuntimeError(
                f"pretrained=True: could not get timm's pretrained weights for {arch!r} ({type(err).__name__}: "
                f"{err}); without network access pass a local static checkpoint instead (pretrained=PATH)"
            ) from err
        where = f"timm:{arch}.{static.pretrained_cfg.get('tag') or 'default'}"
        return static.state_dict(), where, f"timm's pretrained {arch}"

    if isinstance(source, Mapping):
        obj, where = source, "<in-memory state dict>"
    else:
        obj, where = load_checkpoint(source), str(source)
    try:
        classes = checkpoint_num_classes(obj)
    except (CheckpointError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"static checkpoint {where}: cannot find its classifier ({err})") from err
    static = create_model(arch, "static", num_classes=classes)
    try:
        loaded = load_weights(static, obj, expect={"arch": arch, "conv": "static"}, source_name=where)
    except CheckpointError as err:
        raise CheckpointError(f"static checkpoint {where} does not fit {arch} conv=static: {err}") from err
    return static.state_dict(), where, loaded


# -- per-family mappings ------------------------------------------------------------------------------------
# A mapper gets the dynamic layer, its path, the static weight (C_out, C_in / g, kh, kw) and bias, and the
# report; it fills the layer in place and records what it set. Keys it does not record count as new.

Mapper = Callable[[nn.Module, str, torch.Tensor, Optional[torch.Tensor], PretrainedReport], None]


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(dtype=param.dtype, device=param.device).reshape(param.shape))


def _copy_bias(layer: nn.Module, path: str, bias: Optional[torch.Tensor], report: PretrainedReport,
               attr: str = "bias") -> None:
    own = getattr(layer, attr, None)
    if own is not None and bias is not None:
        _set(own, bias)
        report.mapped[f"{path}.{attr}"] = f"{path}.bias"


def _map_dyconv(layer: DynamicConv2d, path, weight, bias, report) -> None:
    for i in range(layer.num_kernels):
        _set(layer.weight[i], weight)
    report.mapped[f"{path}.weight"] = f"{path}.weight in each of {layer.num_kernels} kernels"
    if layer.bias is not None and bias is not None:
        layer.bias.copy_(bias.expand_as(layer.bias))
        report.mapped[f"{path}.bias"] = f"{path}.bias in each of {layer.num_kernels} kernels"
    report._worsen("exact to rounding")


def _map_condconv(layer: CondConv2d, path, weight, bias, report) -> None:
    k = layer.num_experts
    nn.init.zeros_(layer.routing.weight)
    nn.init.zeros_(layer.routing.bias)  # every routing weight sigmoid(0) = 1/2, for every input
    report.adjusted[f"{path}.routing.weight"] = "0"
    report.adjusted[f"{path}.routing.bias"] = "0"
    share = weight.to(layer.weight.dtype) * (2.0 / k)
    noise = torch.randn_like(layer.weight) * (SYMMETRY_NOISE * share.std().clamp_min(1e-12))
    layer.weight.copy_(share + (noise - noise.mean(0, keepdim=True)))  # the 1/2-weighted sum is W
    report.mapped[f"{path}.weight"] = f"2/{k} * {path}.weight + zero-sum noise (std {SYMMETRY_NOISE} rel.)"
    if layer.bias is not None:
        layer.bias.copy_((bias if bias is not None else torch.zeros_like(layer.bias[0])).expand_as(layer.bias)
                         * (2.0 / k))
        report.mapped[f"{path}.bias"] = f"2/{k} * {path}.bias"
    report._worsen("exact to rounding")
    report.note("CondConv: routing starts at 0 (every expert weighted 1/2 for every input; official init: "
                "random), experts 2/K W plus zero-sum noise that breaks their symmetry")


def _map_odconv(layer: ODConv2d, path, weight, bias, report) -> None:
    att = layer.attention
    heads = 0
    for name in ("channel_fc", "filter_fc", "spatial_fc"):
        fc = getattr(att, name)
        if fc is not None:  # sigmoid(0 / T) = 1/2 at every temperature
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)
            report.adjusted[f"{path}.attention.{name}.weight"] = "0"
            report.adjusted[f"{path}.attention.{name}.bias"] = "0"
            heads += 1
    scale = float(2 ** heads)  # a power of two: the product with the halves is exact in floating point
    for i in range(layer.kernel_num):
        _set(layer.weight[i], weight * scale)
    report.mapped[f"{path}.weight"] = f"{scale:g} * {path}.weight in each of {layer.kernel_num} kernels"
    _copy_bias(layer, path, bias, report)
    if layer.kernel_num > 1:
        report._worsen("exact to rounding")  # the softmax weights sum to 1 up to rounding
    report.note("ODConv: channel / filter / spatial heads start at 0 (each attention exactly 1/2 at any "
                "temperature; official init: random), kernels 2^h W; the kernel attention keeps its official init")


def _map_fdconv(layer: FDConv2d, path, weight, bias, report) -> None:
    layer.set_kernel(weight)
    report.mapped[f"{path}.dft_weight"] = (f"rfft2 of {path}.weight as a (C_out k, C_in k) matrix "
                                           "/ (min(C_in, C_out) // 2)")
    # The official conversion stops at dft_weight. Its heads then start at their init: normal(0, 1e-6)
    # weights (each factor 1 to about 1e-5) except the filter head, whose kaiming weights the official
    # _initialize_weights never reaches: 2 sigmoid(z) of a random z, so the converted net does not start at
    # the static function. Zero weights make every factor exactly 1 (biases are 0 already).
    heads = [f"KSM_Global.{name}" for name in ("channel_fc", "filter_fc", "spatial_fc", "kernel_fc")
             if getattr(layer.KSM_Global, name) is not None]
    if layer.KSM_Local is not None:
        heads.append("KSM_Local.conv")
    if layer.FBM is not None:
        heads += [f"FBM.freq_weight_conv_list.{i}" for i in range(len(layer.FBM.freq_weight_conv_list))]
    for name in heads:
        conv = layer.get_submodule(name)
        nn.init.zeros_(conv.weight)
        report.adjusted[f"{path}.{name}.weight"] = "0"
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
            report.adjusted[f"{path}.{name}.bias"] = "0"
    _copy_bias(layer, path, bias, report)
    report._worsen("exact to rounding")
    report.note("FDConv: dft_weight from the static kernel (official conversion); the attention heads, the local "
                "KSM conv and the FBM maps start at 0 (every factor 1, kernel attention 1/n; official init: "
                "1e-6 noise, and a random filter head that the official conversion leaves in place)")


def _map_dcd(layer: DCDConv2d, path, weight, bias, report) -> None:
    _set(layer.conv.weight, weight)
    report.mapped[f"{path}.conv.weight"] = f"{path}.weight (W0)"
    nn.init.zeros_(layer.fc_scale.weight)  # Lambda = hsigmoid(0) = relu6(3) / 3 = 1
    nn.init.zeros_(layer.p.weight)  # the dynamic residual P(...) starts at zero
    report.adjusted[f"{path}.fc_scale.weight"] = "0 (Lambda = 1)"
    report.adjusted[f"{path}.p.weight"] = "0 (residual P Phi Q^T x = 0)"
    _copy_bias(layer, path, bias, report)
    report.note("DCD: W0 = W, fc_scale and P start at 0 (Lambda = 1, no residual; official init: random)")


def _map_dcd_linear(layer: DCDLinear, path, weight, bias, report) -> None:
    _set(layer.cls.weight, weight)
    report.mapped[f"{path}.cls.weight"] = f"{path}.weight"
    if bias is not None:
        _set(layer.cls.bias, bias)
        report.mapped[f"{path}.cls.bias"] = f"{path}.bias"
    nn.init.zeros_(layer.fc_scale.weight)
    nn.init.zeros_(layer.cls_p.weight)
    report.adjusted[f"{path}.fc_scale.weight"] = "0 (Lambda = 1)"
    report.adjusted[f"{path}.cls_p.weight"] = "0 (residual = 0)"


def _map_dgc(layer: DGCConv2d, path, weight, bias, report) -> None:
    for h, head in enumerate(layer.head_modules()):
        _set(head.conv.weight, weight[h::layer.heads])  # head h computes output channels h, h + heads, ...
        report.mapped[f"{path}.headconv_{h}.conv.weight"] = f"{path}.weight[{h}::{layer.heads}]"
        nn.init.zeros_(head.fc2.weight)
        nn.init.constant_(head.fc2.bias, 1.0)  # the official bias init: saliency ReLU(1) = 1 everywhere
        report.adjusted[f"{path}.headconv_{h}.fc2.weight"] = "0 (saliency 1)"
    norm = layer.norm
    if norm is not None:  # eval-mode identity; its input is already post-ReLU in the ResNet blocks
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            report.adjusted[f"{path}.norm.{key}"] = "identity in eval mode"
        _mark_loaded(norm)
        report._worsen("eval mode only")
        report.note("DGC: the layer's own pre-activation BatchNorm is an identity in eval mode (its input is "
                    "post-ReLU in the ResNets, so the ReLU is one too); in training mode it normalises with batch "
                    "statistics, which the static network does not")
    report.note("DGC: head h takes rows h::heads of W, saliency fc2 weight 0 and bias 1 (every gate 1; official "
                "weight init: random); nothing is pruned before the pruning stage (progress <= 1/12 of the run)")
    _copy_bias(layer, path, bias, report)


def _kw_blocks(layer: KWConv2d, weight: torch.Tensor) -> torch.Tensor:
    """``(m, c_out, c_in)``: the block of ``weight`` each mixture fills (inverse of ``KWConv2d.kernel``)."""
    c_out, c_in = layer.warehouse_manager_ref.cell_shapes[layer.warehouse_id]
    w = weight.reshape(layer.blocks_out, c_out, layer.blocks_in, c_in, layer.blocks_spatial)
    return w.permute(4, 0, 2, 1, 3).reshape(layer.num_mixtures, c_out, c_in)


def _map_kw(layer: KWConv2d, path, weight, bias, report) -> None:
    manager = layer.warehouse_manager_ref
    bank = manager.take_cell(layer.warehouse_id)
    ratio = _kw_ratio(manager, layer.warehouse_id)
    blocks = _kw_blocks(layer, weight.reshape(layer.out_channels, layer.in_channels // layer.groups,
                                              *layer.kernel_size))
    start = layer.cell_range[0]
    offsets = cell_assignment(layer.num_mixtures, ratio)
    owned = [(j, start + o) for j, o in enumerate(offsets) if o is not None]
    for j, cell in owned:
        _set(bank[cell], blocks[j])
    key = f"warehouse_manager.weights.{layer.warehouse_id}"
    if not _is_root_manager(layer):
        key = f"{path}.{key}"
    layers = report._kw_layers.setdefault(key, [])
    layers.append(f"{path}.weight -> cells {start}:{layer.cell_range[1]} ({len(owned)}/{layer.num_mixtures} blocks)")
    report.mapped[key] = f"cells from the blocks of {len(layers)} static kernels at tau = 1"
    _copy_bias(layer, path, bias, report)
    if len(owned) == layer.num_mixtures:
        _start_kw_attention_at_its_cells(layer.attention, path, report)
    if len(owned) < layer.num_mixtures:
        report._worsen("not preserved")
        report.notes.append(
            f"{path}: budget {ratio:g}x < 1: at tau = 1 {layer.num_mixtures - len(owned)} of {layer.num_mixtures} "
            "mixtures take the zero cell (official assignment), so their blocks of the static kernel are lost")


# Logit of each mixture's own cell when the attention starts from static weights: the attention normalises its
# logits as z / (sum |z| + 1e-3), so a logit c keeps c / (c + 1e-3) of its cell and the kernel is
# W ((1 - tau) c / (c + 1e-3) + tau): exact at tau = 1, off by 1e-4 (1 - tau) at c = 10. Larger c would be
# closer still but shrinks what the learnt logits change; 10 fine-tunes (results/finetune_static_demo.md).
KW_START_LOGIT = 10.0


def _start_kw_attention_at_its_cells(att: Any, path: str, report: PretrainedReport) -> None:
    """The attention's logits start at ``KW_START_LOGIT * beta`` for every input: at every tau each mixture
    then takes (almost only) the cell that holds its block of the static kernel. With the official random
    init, logits of unrelated cells mix in as soon as tau < 1 and a converted model falls to chance."""
    nn.init.zeros_(att.fc2.weight)
    report.adjusted[f"{path}.attention.fc2.weight"] = "0"
    start = KW_START_LOGIT * att.temp_bias.flatten()
    if att.fc3 is None:
        _set(att.fc2.bias, start)
        report.adjusted[f"{path}.attention.fc2.bias"] = f"{KW_START_LOGIT:g} * beta"
    else:  # fc2 has no bias; its zero output reaches fc3 as zeros, so the basis bias alone gives the logits
        _set(att.basis_bias, start)
        report.adjusted[f"{path}.attention.basis_bias"] = f"{KW_START_LOGIT:g} * beta"


def _map_kw_linear(layer: KWLinear, path, weight, bias, report) -> None:
    _map_kw(layer.conv, f"{path}.conv", weight, bias, report)


def _map_icconv(layer: InceptionConv2d, path, weight, bias, report) -> None:
    other = 0
    for j, (conv, member) in enumerate(zip(layer.conv_list, layer.members)):
        _set(conv.weight, weight[member.start:member.stop])
        report.mapped[f"{path}.conv_list.{j}.weight"] = f"{path}.weight[{member.start}:{member.stop}]"
        if member.dilation != layer.dilation and max(layer.kernel_size) > 1:
            other += member.stop - member.start
    _copy_bias(layer, path, bias, report)
    if other:
        report._worsen("not preserved")
        report.notes.append(f"{path}: {other} of {layer.out_channels} output channels use another dilation "
                            f"than the static {layer.dilation}: same taps, other pixels")


MAPPERS: Dict[type, Mapper] = {
    DynamicConv2d: _map_dyconv,
    CondConv2d: _map_condconv,
    ODConv2d: _map_odconv,
    DCDConv2d: _map_dcd,
    DCDLinear: _map_dcd_linear,
    DGCConv2d: _map_dgc,
    KWConv2d: _map_kw,
    KWLinear: _map_kw_linear,
    InceptionConv2d: _map_icconv,
    FDConv2d: _map_fdconv,
}


def _kw_ratio(manager: Any, idx: int) -> float:
    from .ops.kernelwarehouse import _per_warehouse

    return float(_per_warehouse(manager.cell_num_ratio, len(manager.weights), "cell_num_ratio")[idx])


def _is_root_manager(layer: KWConv2d) -> bool:
    return getattr(layer, "warehouse_manager", None) is not layer.warehouse_manager_ref


def _mark_loaded(module: nn.Module) -> None:
    """A BatchNorm whose statistics were set here is no longer fresh (see ``use_batch_statistics_until_trained``)."""
    from .models import FRESH_ATTR

    if hasattr(module, FRESH_ATTR):
        setattr(module, FRESH_ATTR, False)


def _mapper(module: nn.Module) -> Optional[Mapper]:
    for cls in type(module).__mro__:
        if cls in MAPPERS:
            return MAPPERS[cls]
    return None


# -- the conversion -----------------------------------------------------------------------------------------


@torch.no_grad()
def init_from_static(
    model: nn.Module,
    source: Source,
    *,
    arch: Optional[str] = None,
    progress: Optional[float] = 0.0,
) -> PretrainedReport:
    """Initialise a dynconv model from the weights of the static model of the same arch, in place.

    Args:
        model: a model from :func:`dynconv.create_model` (any conv variant, ``static`` included).
        source: a static checkpoint file (timm or torchvision state dict, ``.pt`` / ``.safetensors``, or a
            dynconv ``conv=static`` checkpoint), a state dict, or ``True`` for timm's pretrained weights.
        arch: the arch of ``source``; default ``model``'s own (timm's ``pretrained_cfg``).
        progress: the schedule position set afterwards (:func:`dynconv.set_progress`). 0, the start: where
            KernelWarehouse's ``tau = 1`` assembles the static kernels and DGC prunes nothing. ``None`` leaves
            the schedules as they are.

    Returns:
        a :class:`PretrainedReport` (``str()`` of it summarises copied / mapped / new tensors).

    The classifier is copied when its width matches the checkpoint's, else left fresh (as timm does).
    """
    model = unwrap_model(model)
    arch = arch or _model_arch(model)
    if arch is None:
        raise ValueError("init_from_static: pass arch=... (the model does not say which arch it is)")
    static, origin, loaded = load_static(arch, source)
    report = PretrainedReport(source=origin, arch=arch, notes=[loaded])
    target = model.state_dict(keep_vars=True)
    schedule = schedule_state_keys(model)
    used: set = set()

    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    dynamic: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if _mapper(module) is not None and not any(name.startswith(p + ".") for p, _ in dynamic):
            dynamic.append((name, module))
    owned_prefixes = [p + "." for p, _ in dynamic]
    for path, module in dynamic:
        weight, bias = static.get(f"{path}.weight"), static.get(f"{path}.bias")
        if weight is None:
            raise CheckpointError(f"static checkpoint {origin}: no {path}.weight for the dynamic layer {path}")
        expected = _static_shape(module)
        if tuple(weight.shape) != expected and _squeezed(weight.shape) == _squeezed(expected):
            weight = weight.reshape(expected)  # ConvNeXt MLP: timm's Linear -> the 1x1 conv of conv_mlp=True
        if tuple(weight.shape) != expected:
            if module is classifier or getattr(module, "conv", None) is classifier:
                report.dropped += [k for k in (f"{path}.weight", f"{path}.bias") if k in static]
                used.update(report.dropped)
                report.notes.append(f"{path}: the checkpoint's classifier has {weight.shape[0]} classes, the model "
                                    f"{expected[0]}: left fresh")
                continue
            raise CheckpointError(f"static checkpoint {origin}: {path}.weight is {list(weight.shape)}, the dynamic "
                                  f"layer replaces a {list(expected)} kernel")
        _mapper(module)(module, path, weight, bias, report)
        used.update(k for k in (f"{path}.weight", f"{path}.bias") if k in static)

    accounted = set(report.mapped) | set(report.adjusted)
    for key, tensor in target.items():
        if key in accounted or key in schedule:
            continue
        if any(key.startswith(p) for p in owned_prefixes) or key.startswith("warehouse_manager."):
            report.new.append(key)
            continue
        value = static.get(key)
        if value is None:
            report.new.append(key)  # inserted modules (SE / CBAM / ECA)
            continue
        used.add(key)
        if value.shape != tensor.shape:
            if value.numel() == tensor.numel() and _squeezed(value.shape) == _squeezed(tensor.shape):
                tensor.copy_(value.reshape(tensor.shape))  # ConvNeXt MLP: Linear (timm) -> 1x1 conv (conv_mlp)
                report.mapped[key] = f"{key} reshaped {list(value.shape)} -> {list(tensor.shape)}"
                continue
            if classifier is not None and key.rsplit(".", 1)[0] == _path_of(model, classifier):
                report.dropped.append(key)
                report.new.append(key)
                continue
            raise CheckpointError(f"static checkpoint {origin}: {key} is {list(value.shape)}, the model's is "
                                  f"{list(tensor.shape)}")
        tensor.copy_(value)
        report.copied.append(key)
    if report.dropped and not any("classes" in n for n in report.notes):
        report.notes.append("classifier: the checkpoint's width differs from the model's: left fresh")
    unused = sorted(set(static) - used)
    if unused:
        raise CheckpointError(f"static checkpoint {origin}: {len(unused)} tensors have no place in the "
                              f"{arch} model, e.g. {unused[:3]}")
    report.new = [k for k in report.new if k not in accounted]
    _mark_copied_norms(model, set(report.copied))
    _attention_baseline_note(model, report)
    if progress is not None:
        set_progress(model, progress)
        report.note(f"schedules set to progress {progress:g} (at 0: KernelWarehouse tau = 1, DGC prunes nothing)")
    return report


def _static_shape(module: nn.Module) -> Tuple[int, ...]:
    if isinstance(module, (DCDLinear, KWLinear)):
        return (module.out_features, module.in_features)
    return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)


def _squeezed(shape: torch.Size) -> Tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _path_of(model: nn.Module, target: nn.Module) -> Optional[str]:
    return next((name for name, m in model.named_modules() if m is target), None)


def _mark_copied_norms(model: nn.Module, copied: set) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and f"{name}.running_mean" in copied:
            _mark_loaded(module)


def _attention_baseline_note(model: nn.Module, report: PretrainedReport) -> None:
    from .surgery import VARIANT_ATTR

    variant = getattr(model, VARIANT_ATTR, None)
    if report.new and not report.mapped and not report.adjusted and variant not in (None, "static"):
        report._worsen("not preserved")
        report.notes.append(f"{variant}: the inserted attention modules are fresh (their gates start near 1/2)")

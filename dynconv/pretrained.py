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
from .archs import create_backbone
from .fresh_statistics import FRESH_ATTR
from .ops._scheduled import schedule_state_keys
from .registry import registered_families
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

    def worsen(self, level: str) -> None:
        """Lower ``exactness`` to ``level`` unless it is already lower."""
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
    static = create_backbone(arch, classes)
    try:
        loaded = load_weights(static, obj, expect={"arch": arch, "conv": "static"}, source_name=where)
    except CheckpointError as err:
        raise CheckpointError(f"static checkpoint {where} does not fit {arch} conv=static: {err}") from err
    return static.state_dict(), where, loaded


# -- per-family mappings ------------------------------------------------------------------------------------
# Each family says how its layers start from a static kernel (Family.from_static, in dynconv/families/). A mapper
# gets the dynamic layer, its path, the static weight (C_out, C_in / g, kh, kw) and bias, and the report; it
# fills the layer in place and records what it set. Keys it does not record count as new.

Mapper = Callable[[nn.Module, str, torch.Tensor, Optional[torch.Tensor], PretrainedReport], None]


def set_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``param`` (its dtype, device and shape)."""
    param.copy_(value.to(dtype=param.dtype, device=param.device).reshape(param.shape))


def copy_bias(layer: nn.Module, path: str, bias: Optional[torch.Tensor], report: PretrainedReport,
              attr: str = "bias") -> None:
    """The static bias into the layer's ``attr``, where both exist."""
    own = getattr(layer, attr, None)
    if own is not None and bias is not None:
        set_param(own, bias)
        report.mapped[f"{path}.{attr}"] = f"{path}.bias"


def mark_statistics_loaded(module: nn.Module) -> None:
    """A BatchNorm whose statistics were set here is no longer fresh (see ``use_batch_statistics_until_trained``)."""
    if hasattr(module, FRESH_ATTR):
        setattr(module, FRESH_ATTR, False)


def _mapper(module: nn.Module) -> Optional[Mapper]:
    """How the family of ``module`` starts it from a static kernel (:attr:`dynconv.Family.from_static`)."""
    for cls in type(module).__mro__:
        for family in registered_families():
            if cls in family.from_static:
                return family.from_static[cls]
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
    if hasattr(module, "in_features"):  # a dynamic classifier
        return (module.out_features, module.in_features)
    return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)


def _squeezed(shape: torch.Size) -> Tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _path_of(model: nn.Module, target: nn.Module) -> Optional[str]:
    return next((name for name, m in model.named_modules() if m is target), None)


def _mark_copied_norms(model: nn.Module, copied: set) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and f"{name}.running_mean" in copied:
            mark_statistics_loaded(module)


def _attention_baseline_note(model: nn.Module, report: PretrainedReport) -> None:
    from .surgery import VARIANT_ATTR

    variant = getattr(model, VARIANT_ATTR, None)
    if report.new and not report.mapped and not report.adjusted and variant not in (None, "static"):
        report.worsen("not preserved")
        report.notes.append(f"{variant}: the inserted attention modules are fresh (their gates start near 1/2)")

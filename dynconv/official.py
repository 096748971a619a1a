"""Checkpoints of the official ODConv, KernelWarehouse, DCD, DGC, IC-Conv and FDConv code, in and out of dynconv models.

dynconv models are timm backbones; the official code defines its own ResNet, MobileNetV2 and
ConvNeXt classes. The layers keep the official parameter names (``<conv>.weight`` and
``<conv>.attention.*`` for ODConv, ``warehouse_manager.weights.{i}`` and ``<conv>.attention.*`` for
KernelWarehouse), so translating a checkpoint is renaming module paths between timm's and the
official models (checked against OSVAI/ODConv ``models/*.py`` and OSVAI/KernelWarehouse
``models/*.py``, ``utils.save_model``):

- ResNet: identical names (torchvision layout) in both repositories.
- MobileNetV2: ``features.0.{0,1}`` stem conv/bn; ``features.{i}.conv`` per inverted-residual block,
  ``conv.0.{0,1}`` dw conv/bn then ``conv.1`` pw-linear, ``conv.2`` bn for the expansion-1 block,
  ``conv.0.{0,1}`` pw, ``conv.1.{0,1}`` dw, ``conv.2`` pw-linear, ``conv.3`` bn for the others;
  ``features.{last}.{0,1}`` final 1x1 conv/bn. The classifier is ``classifier.1`` (after a Dropout)
  everywhere except ``kw_mobilenetv2_*``, whose classifier is a bare ``classifier`` Linear.
- DCD (liyunsheng13/dcd ``models/imagenet/*_dcd.py``): ResNet names are torchvision's with the
  dynamic classifier at ``classifier.0``; MobileNetV2 as in :func:`_dcd_mobilenetv2_renames`. DCD
  layers keep the official ``conv_dy`` names (``conv``, ``q``, ``p``, ``bn1``, ``bn2``, ``fc.*``).
- DGC (zhuogege1943/dgc ``models/dynamic_resnet.py``, ``dyresnet18``): torchvision names; the DGC
  layers keep the official ``norm``, ``headconv_{h}.{conv,fc1,fc2}`` and ``_inactive_channels`` names;
  the BatchNorm after a DGC downsample sits one level deeper, at ``downsample.1.norm``.
- IC-Conv (yifan123/IC-Conv ``ic_resnet*``): torchvision names; an Inception conv keeps the
  official ``conv_list.{j}`` member convs, one per dilation pattern with a non-zero count.
- FDConv (Linwei-Chen/FDConv ``FDConv_detection/mmdet_custom/resnet.py``, ``ResNet_FDConv``, ResNet only):
  torchvision names (mmdet's ResNet uses them too); an FDConv layer keeps the official ``dft_weight``,
  ``KSM_Global.*``, ``KSM_Local.*`` and ``FBM.*`` names. The official files are mmdet detector
  checkpoints (``{'meta', 'state_dict': {'backbone.' + key, 'neck.*', '*_head.*'}}``; the backbone has no
  classifier) and the converted ImageNet weights of ``tools/convert_to_fdconv.py`` (a bare torchvision
  state dict whose converted convs hold ``dft_weight`` instead of ``weight``, without the KSM / FBM tensors:
  those are static weights, for ``pretrained=``).
- ConvNeXt (KernelWarehouse repo only): ``downsample_layers.0`` is the stem,
  ``downsample_layers.{i}`` the downsampling norm + conv, ``stages.{i}.{j}.dwconv/norm/pwconv1/
  pwconv2/gamma`` the blocks, ``norm`` and ``head`` the head. The static model keeps ``pwconv``
  as Linear and ``gamma`` as ``[C]``; ``kw_convnext_tiny`` uses 1x1 convs and ``gamma [1, C, 1, 1]``.

File formats: ODConv ``main.py`` saves ``{'state_dict': ..., 'epoch', 'acc', 'best_acc',
'optimizer'}`` from the DDP wrapper (every key starts with ``module.``); KernelWarehouse
``utils.save_model`` saves ``{'model': ..., 'optimizer', 'epoch', 'scaler', 'args',
'model_ema'?}`` without prefix; DCD ``{'state_dict': ...}`` without prefix; DGC ``{'state_dict': ...,
'epoch', 'best_prec1', 'optimizer'}`` from DataParallel (``module.`` prefix); IC-Conv a bare state dict.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .surgery.sites import CONVNEXT, MOBILENETV2, RESNET, detect_backbone
from .ops._routing import schedule_state_keys
from .registry import families_with, get_family, get_variant
from .schedules import set_progress

ODCONV, KW, DCD, DGC, ICCONV, FDCONV, STATE_DICT = "odconv", "kw", "dcd", "dgc", "icconv", "fdconv", "state_dict"
FORMATS: Tuple[str, ...] = (ODCONV, KW, DCD, DGC, ICCONV, FDCONV, STATE_DICT)
_MMDET_BACKBONE = "backbone."  # key prefix of the backbone in an mmdet detector checkpoint
_DDP_PREFIX = "module."

Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Any]]


@dataclass
class ImportReport:
    """What :func:`import_official` loaded.

    Attributes:
        source_format: ``odconv`` (``{'state_dict': {'module.' + key: ...}}``), ``dcd`` / ``dgc``
            (a ``'state_dict'`` file read for a DCD / DGC model), ``kw`` (``{'model': ...}``),
            ``kw_ema`` (``{'model_ema': ...}``) or ``state_dict`` (a bare one).
        layout: the official model definition the names were read as (``odconv``, ``kw``, ``dcd``,
            ``dgc`` or ``icconv``).
        variant: the dynconv conv variant of the model.
        backbone: ``resnet``, ``mobilenetv2`` or ``convnext``.
        loaded: number of tensors copied.
        source: the file path, when a path was given.
    """

    source_format: str
    layout: str
    variant: str
    backbone: str
    loaded: int
    source: Optional[str] = None

    def __str__(self) -> str:
        where = f" from {self.source}" if self.source else ""
        return (
            f"loaded {self.loaded} tensors{where} ({self.source_format} file, official {self.layout} "
            f"{self.backbone} layout) into a {self.variant} model"
        )


# --------------------------------------------------------------------------------------------------
# Name mapping: dynconv (timm) module paths -> official module paths


@dataclass(frozen=True)
class Layout:
    """How one dynconv model's state dict is named in the official code (a family's ``official_layout`` gives it)."""

    name: str
    renames: Dict[str, str]  # dynconv module path -> official module path (longest prefix wins)
    official_shape: Callable[[str, torch.Size], torch.Size]  # official key, dynconv shape -> official shape

    def official_key(self, key: str) -> str:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in self.renames:
                return ".".join([self.renames[prefix], *parts[cut:]])
        return key


def same_shape(key: str, shape: torch.Size) -> torch.Size:
    return shape


def _mobilenetv2_blocks(model: nn.Module):
    """``(timm block path, official block path, is the expansion-1 block)`` in network order."""
    index = 1
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            yield f"blocks.{s}.{b}", f"features.{index}.conv", type(block).__name__ == "DepthwiseSeparableConv"
            index += 1


# timm layer name -> index inside the official block Sequential (expansion-1 block, the others).
_ODCONV_MBV2_BLOCK = (
    {"conv_dw": "0.0", "bn1": "0.1", "conv_pw": "1", "bn2": "2"},
    {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "conv_pwl": "2", "bn3": "3"},
)
_DCD_MBV2_BLOCK = (
    {"conv_dw": "0", "bn1": "1", "conv_pw": "3", "bn2": "4"},
    {"conv_pw": "0", "bn1": "1", "conv_dw": "3", "bn2": "4", "conv_pwl": "6", "bn3": "7"},
)


def _mobilenetv2_renames(model: nn.Module, kw_bare_classifier: bool) -> Dict[str, str]:
    renames = {"conv_stem": "features.0.0", "bn1": "features.0.1"}
    for src, dst, first in _mobilenetv2_blocks(model):
        pairs = _ODCONV_MBV2_BLOCK[0 if first else 1]
        renames.update({f"{src}.{a}": f"{dst}.{o}" for a, o in pairs.items()})
    last = sum(1 for _ in _mobilenetv2_blocks(model)) + 1
    renames.update({"conv_head": f"features.{last}.0", "bn2": f"features.{last}.1"})
    renames["classifier"] = "classifier" if kw_bare_classifier else "classifier.1"
    return renames


def _dcd_mobilenetv2_renames(model: nn.Module) -> Dict[str, str]:
    """liyunsheng13/dcd ``mobilenetv2_dcd``: flat ``features.{i}.conv.{j}`` Sequentials (dw, bn, relu6,
    pw, bn for the first block; pw, bn, relu6, dw, bn, relu6, pwl, bn for the others), ``DYModule``
    latent convs ``conv_q`` / ``conv_p``, the final 1x1 at ``conv.{0,1}``, ``classifier.0`` (DYCls)."""
    renames = {"conv_stem": "features.0.0", "bn1": "features.0.1"}
    for src, dst, first in _mobilenetv2_blocks(model):
        for ours, theirs in _DCD_MBV2_BLOCK[0 if first else 1].items():
            renames[f"{src}.{ours}"] = f"{dst}.{theirs}"
            renames[f"{src}.{ours}.q"] = f"{dst}.{theirs}.conv_q"
            renames[f"{src}.{ours}.p"] = f"{dst}.{theirs}.conv_p"
    renames.update({"conv_head": "conv.0", "bn2": "conv.1", "classifier": "classifier.0"})
    return renames


def _convnext_renames(model: nn.Module) -> Dict[str, str]:
    renames = {"stem": "downsample_layers.0", "head.norm": "norm", "head.fc": "head"}
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            renames[f"stages.{s}.downsample"] = f"downsample_layers.{s}"
        for b, _ in enumerate(stage.blocks):
            src, dst = f"stages.{s}.blocks.{b}", f"stages.{s}.{b}"
            renames[src] = dst
            renames.update({f"{src}.conv_dw": f"{dst}.dwconv", f"{src}.mlp.fc1": f"{dst}.pwconv1"})
            renames[f"{src}.mlp.fc2"] = f"{dst}.pwconv2"
    return renames


def _convnext_shapes(dynamic: bool) -> Callable[[str, torch.Size], torch.Size]:
    """Official ConvNeXt shapes: ``kw_convnext`` has 1x1-conv MLPs and ``gamma [1, C, 1, 1]``,
    the static ``convnext`` Linear MLPs and ``gamma [C]``; timm's depends on ``conv_mlp``."""

    def shape(key: str, dyn: torch.Size) -> torch.Size:
        squeezed = [d for d in dyn if d != 1] if len(dyn) > 1 else list(dyn)
        if key.endswith(".gamma"):
            return torch.Size([1, dyn.numel(), 1, 1] if dynamic else [dyn.numel()])
        if key.endswith((".pwconv1.weight", ".pwconv2.weight")) and len(squeezed) == 2:
            return torch.Size(squeezed + [1, 1] if dynamic else squeezed)
        return dyn

    return shape


def only_on(family: str, backbone: str, *supported: str) -> None:
    """Raise unless the official code of ``family`` has a ``backbone`` model."""
    if backbone not in supported:
        raise ValueError(f"the official {family} code has no {backbone} model, so there is no official layout")


def _odconv_or_kw(name: str, model: nn.Module, backbone: str, kw_model: bool) -> Layout:
    if backbone == RESNET:
        return Layout(name, {}, same_shape)
    if backbone == MOBILENETV2:
        # kw_mobilenetv2 has a bare Linear classifier; kw1d2x_mobilenetv2 a Sequential(Dropout, KWLinear).
        bare = kw_model and isinstance(model.classifier, nn.Linear)
        return Layout(name, _mobilenetv2_renames(model, bare), same_shape)
    return Layout(name, _convnext_renames(model), _convnext_shapes(kw_model))


def static_layout(model: nn.Module, backbone: str) -> Layout:
    """A static model as the official code names it: OSVAI/ODConv's ResNet and MobileNetV2, OSVAI/KernelWarehouse's
    ConvNeXt (the only one with a ConvNeXt)."""
    return _odconv_or_kw(KW if backbone == CONVNEXT else ODCONV, model, backbone, kw_model=False)


def odconv_layout(model: nn.Module, backbone: str) -> Layout:
    """OSVAI/ODConv ``models/od_resnet.py``, ``od_mobilenetv2.py``."""
    only_on("odconv", backbone, RESNET, MOBILENETV2)
    return _odconv_or_kw(ODCONV, model, backbone, kw_model=False)


def kw_layout(model: nn.Module, backbone: str) -> Layout:
    """OSVAI/KernelWarehouse ``models/kw_*.py``."""
    return _odconv_or_kw(KW, model, backbone, kw_model=True)


def dcd_layout(model: nn.Module, backbone: str) -> Layout:
    """liyunsheng13/dcd ``models/imagenet/*_dcd.py``."""
    only_on("dcd", backbone, RESNET, MOBILENETV2)
    if backbone == RESNET:  # ResNet_dcd: classifier = Sequential(DYCls) (dropout=None, the default)
        return Layout(DCD, {"fc": "classifier.0"}, same_shape)
    return Layout(DCD, _dcd_mobilenetv2_renames(model), same_shape)


def _family(model: nn.Module) -> Tuple[str, str]:
    variant = getattr(model, "dynconv_variant", "static")
    return variant, get_variant(variant).family


def _supported() -> str:
    parts = []
    for family in families_with("official_layout"):
        names = [v.name for v in family.variants]
        name = f"{names[0].rsplit('_', 1)[0]}_*" if len(names) > 1 else names[0]
        parts.append(f"{name!r}" + (f" ({family.official_repo})" if family.name != "static" else ""))
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)


def _layout(model: nn.Module) -> Layout:
    variant, family_name = _family(model)
    family = get_family(family_name)
    backbone = detect_backbone(model)
    if family.official_layout is None:
        raise ValueError(
            f"no official checkpoint layout for conv variant {variant!r}: import_official/export_official "
            f"support {_supported()} models"
        )
    if backbone not in (RESNET, MOBILENETV2, CONVNEXT):
        raise ValueError(
            f"no official checkpoint layout for a {backbone} backbone ({type(model).__name__}); "
            "supported: ResNet, MobileNetV2, ConvNeXt models from dynconv.create_model"
        )
    return family.official_layout(model, backbone)


def _describe(model: nn.Module) -> str:
    variant, _ = _family(model)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    return f"{variant} {arch or detect_backbone(model)}"


def official_names(model: nn.Module) -> Dict[str, str]:
    """``{dynconv state-dict key: official key}`` for ``model`` (no ``module.`` prefix)."""
    layout = _layout(model)
    out: Dict[str, str] = {}
    seen: Dict[str, str] = {}
    skip = schedule_state_keys(model)
    for key in model.state_dict():
        if key in skip:  # dynconv's schedule state: not in any official file
            continue
        official = layout.official_key(key)
        if official in seen:  # a bug in the rename table, never a user error
            raise RuntimeError(f"{key!r} and {seen[official]!r} both map to official {official!r}")
        seen[official] = key
        out[key] = official
    return out


# --------------------------------------------------------------------------------------------------
# Reading checkpoint files


def _load_file(path: Union[str, "os.PathLike[str]"]) -> Any:
    # The KernelWarehouse files also hold the argparse Namespace of the run ('args'); it is plain data.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(checkpoint: Any, ema: bool, where: str) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """``(state dict without DDP prefix, source format, the prefix that was removed)``."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{where}: expected a checkpoint dict or state dict, got {type(checkpoint).__name__}")
    keys = list(checkpoint)
    if ema:
        if "model_ema" not in checkpoint:
            raise ValueError(f"{where}: ema=True but the checkpoint has no 'model_ema' entry (top-level keys: {keys[:8]})")
        state, fmt = checkpoint["model_ema"], "kw_ema"
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        state, fmt = checkpoint["state_dict"], ODCONV
    elif "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state, fmt = checkpoint["model"], KW
    elif _is_state_dict(checkpoint):
        state, fmt = checkpoint, STATE_DICT
    else:
        raise ValueError(
            f"{where}: not an official checkpoint: no 'state_dict' (ODConv) or 'model' (KernelWarehouse) "
            f"entry and not a state dict (top-level keys: {keys[:8]})"
        )
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{where}: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    state = dict(state)
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        return {k[len(_DDP_PREFIX):]: v for k, v in state.items()}, fmt, _DDP_PREFIX
    return state, fmt, ""


# --------------------------------------------------------------------------------------------------
# Public functions


def import_official(
    model: nn.Module, checkpoint: Checkpoint, *, ema: bool = False, final_schedule: bool = True
) -> ImportReport:
    """Load a checkpoint written by the official ODConv, KernelWarehouse, DCD, DGC, IC-Conv or FDConv code into
    ``model``.

    Loading is strict: every tensor of the checkpoint must land in ``model`` and every tensor of
    ``model`` must come from the checkpoint, with equal shapes. Everything is checked before
    anything is copied, so a checkpoint that does not fit leaves ``model`` untouched.

    Args:
        model: a model from :func:`dynconv.create_model` (``static``, ``odconv_*``, ``kw_*`` or ``dcd`` on
            ResNet / MobileNetV2; ``dgc`` and ``icconv`` on ResNet; ``static`` or ``kw_*`` on ConvNeXt-T)
            matching the checkpoint's architecture and options (for ``icconv``: its pattern file).
        checkpoint: a file path (read with ``torch.load(weights_only=True)``) or the loaded object:
            an ODConv, DCD or DGC file (``{'state_dict': ...}``, ``module.`` prefixes dropped), a
            KernelWarehouse file (``{'model': ..., 'model_ema': ...}``), a bare state dict (IC-Conv), or for
            ``fdconv`` an mmdet detector checkpoint (its ``backbone.*`` tensors, strictly; the neck and heads
            are ignored and the model's classifier, which the detection backbone lacks, is left as it is).
        ema: read ``'model_ema'`` of a KernelWarehouse file (its EMA weights) instead of ``'model'``.
        final_schedule: set every scheduled layer to its end-of-training value (ODConv temperature 1,
            KernelWarehouse tau 0, DGC fully pruned), which is how the official code evaluates and
            fine-tunes.

    Returns:
        An :class:`ImportReport`.

    Raises:
        ValueError: unreadable format, a model without an official layout, or a checkpoint that
            does not fit (the message names the first missing, unexpected and mis-shaped key).
    """
    source = None
    where = "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        where = source
        checkpoint = _load_file(checkpoint)
    state, fmt, prefix = _unwrap(checkpoint, ema, where)
    layout = _layout(model)
    if fmt == ODCONV and layout.name in (DCD, DGC):  # the same {'state_dict': ...} file structure
        fmt = layout.name
    names = official_names(model)
    target = model.state_dict()
    by_official = {official: key for key, official in names.items()}
    headless: List[str] = []  # the model's classifier keys a detector backbone does not have
    if layout.name == FDCONV and any(k.startswith(_MMDET_BACKBONE) for k in state):
        # an mmdet detector checkpoint: its backbone is the model without the classifier; neck and heads
        # are not the backbone's
        state = {k[len(_MMDET_BACKBONE):]: v for k, v in state.items() if k.startswith(_MMDET_BACKBONE)}
        fmt, prefix = FDCONV, _MMDET_BACKBONE
        head = _classifier_prefix(model)
        headless = [o for o in by_official if o.startswith(head) and o not in state]

    missing = [o for o in by_official if o not in state and o not in headless]
    unexpected = [k for k in state if k not in by_official]
    mismatched: List[str] = []
    new_state: Dict[str, torch.Tensor] = {}
    for official, key in by_official.items():
        if official not in state:
            continue
        src, dst = state[official], target[key]
        if src.shape != dst.shape:
            # Same numbers, other view (ConvNeXt Linear vs 1x1 conv, gamma [C] vs [1, C, 1, 1]).
            if layout.official_shape(official, dst.shape) != dst.shape and src.numel() == dst.numel() \
                    and [d for d in src.shape if d != 1] == [d for d in dst.shape if d != 1]:
                src = src.reshape(dst.shape)
            else:
                mismatched.append(
                    f"{prefix + official!r}: checkpoint {list(src.shape)} vs model {list(dst.shape)} ({key})"
                )
                continue
        if src.is_floating_point() != dst.is_floating_point():
            mismatched.append(f"{prefix + official!r}: checkpoint dtype {src.dtype} vs model {dst.dtype} ({key})")
            continue
        new_state[key] = src
    if missing or unexpected or mismatched:
        lines = [
            f"{where} does not fit this {_describe(model)} model (official {layout.name} layout, "
            f"{fmt} file): {len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped keys"
        ]
        if mismatched:
            lines.append(f"first mis-shaped key {mismatched[0]}")
        if missing:
            lines.append(f"first missing key {prefix + missing[0]!r} (model {by_official[missing[0]]!r})")
        if unexpected:
            lines.append(f"first unexpected key {prefix + unexpected[0]!r} {list(state[unexpected[0]].shape)}")
        raise ValueError("; ".join(lines))

    loaded = model.load_state_dict(new_state, strict=not headless)
    if sorted(loaded.missing_keys) != sorted(by_official[o] for o in headless):  # never a user error
        raise RuntimeError(f"import_official: unexpected missing keys {loaded.missing_keys[:3]}")
    if final_schedule:
        set_progress(model, float("inf"))
    variant, _ = _family(model)
    return ImportReport(fmt, layout.name, variant, detect_backbone(model), len(new_state), source)


def _classifier_prefix(model: nn.Module) -> str:
    classifier = model.get_classifier()
    return next(name for name, m in model.named_modules() if m is classifier) + "."


def export_official(model: nn.Module, format: Optional[str] = None) -> Dict[str, Any]:
    """``model``'s weights named and shaped as the official code names them, in its file structure.

    Args:
        model: as for :func:`import_official`.
        format: ``odconv`` -> ``{'state_dict': {'module.' + key: tensor}}`` (ODConv ``main.py``),
            ``kw`` -> ``{'model': {key: tensor}}`` (KernelWarehouse ``utils.save_model``),
            ``dcd`` -> ``{'state_dict': {key: tensor}}`` (DCD ``main.py``),
            ``dgc`` -> ``{'state_dict': {'module.' + key: tensor}}`` (DGC ``main.py``, DataParallel),
            ``icconv`` and ``state_dict`` -> the bare official state dict (IC-Conv's released files; for
            FDConv the layout of ``tools/convert_to_fdconv.py``'s files, with the trained KSM / FBM tensors),
            ``fdconv`` -> ``{'state_dict': {'backbone.' + key: tensor}}`` without the classifier (the backbone
            part of an mmdet detector checkpoint of ``ResNet_FDConv``).
            Default: the format of the repository that defines the model's variant (``odconv`` for
            ODConv and static ResNet/MobileNetV2, ``kw`` for KernelWarehouse and ConvNeXt, ``dcd``,
            ``dgc``, ``icconv`` and ``fdconv`` for theirs).

    Returns:
        A dict ``torch.save`` can write; tensors are detached CPU copies.
    """
    layout = _layout(model)
    format = format or layout.name
    if format not in FORMATS:
        raise ValueError(f"unknown official format {format!r}; choose one of: {', '.join(FORMATS)}")
    state: Dict[str, torch.Tensor] = {}
    skip = schedule_state_keys(model)
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        official = layout.official_key(key)
        state[official] = value.detach().cpu().clone().reshape(layout.official_shape(official, value.shape))
    if format in (ODCONV, DGC):
        return {"state_dict": {_DDP_PREFIX + k: v for k, v in state.items()}}
    if format == KW:
        return {"model": state}
    if format == DCD:
        return {"state_dict": state}
    if format == FDCONV:
        head = _classifier_prefix(model)
        return {"state_dict": {_MMDET_BACKBONE + k: v for k, v in state.items() if not k.startswith(head)}}
    return state


__all__ = ["FORMATS", "ImportReport", "export_official", "import_official", "official_names"]

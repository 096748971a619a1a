"""A dynconv classification network as a detection backbone: four feature levels, frozen early
stages, BatchNorm statistics kept fixed, ImageNet weights (dynconv or official) loaded with a report.

The levels are the ones the papers' detection code feeds its FPN (OSVAI/ODConv
``object_detection/mmdet/models/backbones/od_resnet.py``, ``od_mobilenetv2.py``; OSVAI/KernelWarehouse
``detection/mmdet/models/backbones/kw_resnet.py``, ``kw_mobilenetv2.py``, ``kw_convnext.py``):

- ResNet: ``layer1``..``layer4`` (strides 4-32; 256-2048 channels for ResNet50), as mmdet's ResNet.
- MobileNetV2: the official ODConv/KernelWarehouse out_indices (1, 2, 3, 4), i.e. the ends of the
  24-, 32- and 96-channel stages and the 1280-channel head convolution (FPN in_channels
  [24, 32, 96, 1280]).
- ConvNeXt: the four stages, each followed by a new LayerNorm as in the ConvNeXt detection backbone.

``frozen_stages=k`` (mmdet's meaning) stops gradients to the stem and the first ``k`` levels and keeps
them in eval mode (``frozen_trainable`` names parameters of those levels that keep training, as FDConv's
official backbone does with its modulation branches); ``norm_eval=True`` keeps every BatchNorm (the
attention branches' included) in eval mode, so its statistics stay those of ImageNet, while its affine
parameters still train, as in the official configs (``norm_cfg=BN(requires_grad=True), norm_eval=True``).
Dynamic layers hold their schedules' end values (T = 1, tau = 0) as built; the trainer changes that only
when asked.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import CheckpointError, checkpoint_num_classes, load_checkpoint, load_weights
from ..models import create_model

PathLike = Union[str, Path]


@dataclass(frozen=True)
class _Levels:
    """Where an arch family's stem and feature levels are (module names of the timm model)."""

    stem: Tuple[str, ...]
    levels: Tuple[Tuple[str, ...], ...]  # modules that make up each level, in forward order


def _levels(arch: str) -> _Levels:
    if arch.startswith("resnet"):
        return _Levels(("conv1", "bn1"), (("layer1",), ("layer2",), ("layer3",), ("layer4",)))
    if arch.startswith("mobilenetv2"):
        # The official backbones (od_mobilenetv2.py, kw_mobilenetv2.py) number stages by the ends
        # stage_idx = [1, 3, 6, 13, 18] of torchvision-style ``features``; frozen_stages=k freezes
        # features[0 .. stage_idx[k]]: k=1 is the stem, the 16-channel block and the two 24-channel
        # blocks, i.e. timm's conv_stem/bn1, blocks.0 and blocks.1.
        return _Levels(("conv_stem", "bn1", "blocks.0"),
                       (("blocks.1",), ("blocks.2",), ("blocks.3", "blocks.4"),
                        ("blocks.5", "blocks.6", "conv_head", "bn2")))
    if arch.startswith("convnext"):
        return _Levels(("stem",), (("stages.0",), ("stages.1",), ("stages.2",), ("stages.3",)))
    raise ValueError(f"no detection feature levels are defined for arch {arch!r}; "
                     f"supported: resnet*, mobilenetv2_*, convnext_*")


class DynamicBackbone(nn.Module):
    """Feature levels of ``dynconv.create_model(arch, conv)`` for a detector's FPN.

    Args:
        arch, conv: as for :func:`dynconv.create_model`.
        frozen_stages: stem plus this many levels get no gradient and stay in eval mode (-1: none).
        frozen_trainable: substrings of parameter names (within the body) that keep their gradient inside
            the frozen stages; those modules still run in eval mode. FDConv's official detection backbone
            keeps its ``KSM`` / ``FBM`` branches trainable there (Linwei-Chen/FDConv
            ``FDConv_detection/mmdet_custom/resnet.py``, ``need_grad_list``, applied in ``_freeze_stages``).
        norm_eval: keep every BatchNorm in eval mode while training.
        checkpoint: ImageNet weights for the backbone (a dynconv checkpoint or an official ODConv /
            KernelWarehouse / DCD / DGC / IC-Conv file); the classifier is dropped.
        checkpoint_is_static: ``checkpoint`` holds the static ``arch`` (a timm or torchvision file): the
            dynamic layers start from it through :func:`dynconv.pretrained.init_from_static`.
        use_ema: read the checkpoint's EMA weights.
        **options: layer and timm options, as for :func:`dynconv.create_model` (``pretrained=`` included:
            a static checkpoint converted when the body is built).

    ``forward(images)`` returns an ordered dict ``{"0": stride-4, ..., "3": stride-32}``;
    ``out_channels`` lists the channels of the levels; ``load_report`` says what the checkpoint gave.
    """

    def __init__(self, arch: str, conv: str = "static", *, frozen_stages: int = 1, norm_eval: bool = True,
                 checkpoint: Optional[Union[PathLike, Mapping[str, Any]]] = None, use_ema: bool = False,
                 checkpoint_is_static: bool = False, frozen_trainable: Sequence[str] = (),
                 **options: Any) -> None:
        super().__init__()
        self.arch, self.conv, self.options = arch, conv, dict(options)
        self.spec = _levels(arch)
        if not -1 <= frozen_stages <= len(self.spec.levels):
            raise ValueError(f"frozen_stages must be in -1..{len(self.spec.levels)}, got {frozen_stages}")
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.frozen_trainable = tuple(frozen_trainable)
        self.body = create_model(arch, conv, num_classes=1000, **options)
        self._drop_classifier()
        self.out_channels: List[int] = self._level_channels()
        self.out_norms = nn.ModuleList(LayerNorm2d(c) for c in self.out_channels) \
            if arch.startswith("convnext") else None
        self.load_report = "no checkpoint: randomly initialised backbone"
        if getattr(self.body, "pretrained_report", None) is not None:
            self.load_report = f"backbone: {self.body.pretrained_report}"
        if checkpoint is not None:
            self.load_report = self.load_pretrained(checkpoint, use_ema=use_ema, static=checkpoint_is_static)
        self._freeze()

    # -------------------------------------------------------------------------------------- building
    def _drop_classifier(self) -> None:
        if hasattr(self.body, "prune_intermediate_layers") and not self.arch.startswith("mobilenetv2"):
            self.body.prune_intermediate_layers(len(self.spec.levels) + (1 if self.arch.startswith("resnet") else 0),
                                                prune_head=True)
        else:  # MobileNetV2's 1280-channel head convolution is a feature level: keep it
            self.body.reset_classifier(0)

    def _level_channels(self) -> List[int]:
        was_training = self.body.training
        self.body.eval()
        with torch.no_grad():
            shapes = [f.shape[1] for f in self._features(torch.zeros(1, 3, 64, 64))]
        self.body.train(was_training)
        return shapes

    def _features(self, x: torch.Tensor) -> List[torch.Tensor]:
        body = self.body
        if self.arch.startswith("resnet"):
            return body.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        if self.arch.startswith("mobilenetv2"):
            # the head conv output (after bn2 and its activation) is the last level
            last, levels = body.forward_intermediates(x, indices=[1, 2, 3])
            return [*levels, last]
        return body.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)

    # -------------------------------------------------------------------------------------- weights
    def load_pretrained(self, source: Union[PathLike, Mapping[str, Any]], *, use_ema: bool = False,
                        static: bool = False) -> str:
        """Load ImageNet weights into the backbone; returns what was loaded and what was left out.

        The checkpoint is first loaded, strictly, into the full classifier it was trained as (dynconv
        layout or an official one, through :func:`dynconv.import_official`), so a checkpoint of
        another arch or conv fails with the keys that do not fit; then everything but the
        classifier is copied over. ``static=True``: the checkpoint is the static ``arch``'s, and the
        full classifier is built from it with ``create_model(..., pretrained=checkpoint)``.
        """
        obj = load_checkpoint(source) if not isinstance(source, Mapping) else source
        where = str(source) if not isinstance(source, Mapping) else "<in-memory checkpoint>"
        classes = checkpoint_num_classes(obj)
        options = {k: v for k, v in self.options.items() if k != "pretrained"}
        try:
            if static:
                full = create_model(self.arch, self.conv, num_classes=classes, pretrained=obj, **options)
                report = str(full.pretrained_report).replace("<in-memory state dict>", where)  # read once, above
            else:
                full = create_model(self.arch, self.conv, num_classes=classes, **options)
                report = load_weights(full, obj, expect={"arch": self.arch, "conv": self.conv}, use_ema=use_ema)
        except CheckpointError as err:
            raise CheckpointError(f"backbone checkpoint {where} does not fit {self.arch} conv={self.conv}: "
                                  f"{err}") from err
        mine = self.body.state_dict()
        state = full.state_dict()
        dropped = sorted({k.split(".")[0] for k in state if k not in mine})
        missing = [k for k in mine if k not in state]
        if missing:
            raise CheckpointError(f"backbone checkpoint {where}: {len(missing)} backbone tensors have no "
                                  f"counterpart, e.g. {missing[:3]}")
        self.body.load_state_dict({k: state[k] for k in mine}, strict=True)
        report = report.replace("<in-memory checkpoint>", where)
        return (f"backbone: {report}; kept {len(mine)} tensors, dropped the classifier ({', '.join(dropped) or '-'})"
                + ("; level norms newly initialised" if self.out_norms is not None else ""))

    # -------------------------------------------------------------------------------------- freezing
    def _frozen_modules(self) -> List[nn.Module]:
        names = list(self.spec.stem) if self.frozen_stages >= 0 else []
        for level in self.spec.levels[:max(self.frozen_stages, 0)]:
            names.extend(level)
        return [self.body.get_submodule(n) for n in names]

    def _freeze(self) -> None:
        stem = [self.body.get_submodule(n) for n in self.spec.stem] if self.frozen_stages >= 0 else []
        for module in self._frozen_modules():
            keep = () if any(module is m for m in stem) else self.frozen_trainable  # the stem: all frozen
            for name, p in module.named_parameters():
                p.requires_grad_(any(key in name for key in keep))

    def train(self, mode: bool = True) -> "DynamicBackbone":
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, _BatchNorm):
                        module.eval()
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self._features(x)
        if self.out_norms is not None:
            features = [norm(f) for norm, f in zip(self.out_norms, features)]
        return OrderedDict((str(i), f) for i, f in enumerate(features))

    def extra_repr(self) -> str:
        trainable = f", frozen_trainable={list(self.frozen_trainable)}" if self.frozen_trainable else ""
        return (f"arch={self.arch}, conv={self.conv}, frozen_stages={self.frozen_stages}{trainable}, "
                f"norm_eval={self.norm_eval}")


def level_channels(arch: str, conv: str = "static", **options: Any) -> List[int]:
    """The channels of ``arch``'s four feature levels (what the FPN's ``in_channels`` must be)."""
    return DynamicBackbone(arch, conv, frozen_stages=-1, **options).out_channels


__all__ = ["DynamicBackbone", "level_channels"]

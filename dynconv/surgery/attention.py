"""Where the attention baselines (SE, CBAM, ECA) go: the end of every residual branch of a known backbone.

After the branch's last BatchNorm, before the addition, as the papers' code (Jongchan/attention-module) puts
them; on MobileNetV2 in timm's ``se`` slot after the depthwise conv; on ConvNeXt after the block MLP.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from ..ops.attention_baselines import make_residual_attention
from .sites import CONVNEXT, MOBILENETV2, RESNET


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` on the device and dtype of ``reference``'s parameters (a model built on ``meta`` stays there)."""
    param = next(reference.parameters(), None)
    return module if param is None else module.to(device=param.device, dtype=param.dtype)


def _resnet(model: nn.Module, kind: str) -> List[Tuple[str, str]]:
    inserted = []
    for s in range(1, 5):
        for b, block in enumerate(getattr(model, f"layer{s}")):
            last_norm = "bn3" if hasattr(block, "bn3") else "bn2"
            attn = _like(make_residual_attention(kind, getattr(block, last_norm).num_features), block)
            if hasattr(block, "se"):  # timm blocks call ``self.se`` after the last norm
                if block.se is not None:
                    raise ValueError(f"layer{s}.{b} already has an attention module ({type(block.se).__name__})")
                block.se = attn
                inserted.append((f"layer{s}.{b}.se", type(attn).__name__))
            else:  # torchvision blocks: the attention follows the last norm inside one module
                setattr(block, last_norm, nn.Sequential(getattr(block, last_norm), attn))
                inserted.append((f"layer{s}.{b}.{last_norm}.1", type(attn).__name__))
    return inserted


def _mobilenetv2(model: nn.Module, kind: str) -> List[Tuple[str, str]]:
    # timm's inverted-residual blocks have an ``se`` slot after the depthwise conv, where
    # MobileNetV3 and EfficientNet put their squeeze-excitation.
    inserted = []
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            if not isinstance(block.se, nn.Identity):
                raise ValueError(f"blocks.{s}.{b} already has an attention module ({type(block.se).__name__})")
            block.se = _like(make_residual_attention(kind, block.conv_dw.out_channels), block)
            inserted.append((f"blocks.{s}.{b}.se", type(block.se).__name__))
    return inserted


def _convnext(model: nn.Module, kind: str) -> List[Tuple[str, str]]:
    # After the MLP, before the layer scale: the end of the residual branch. Needs the NCHW
    # block layout (timm ``conv_mlp=True``), which ``create_model`` selects for this variant.
    inserted = []
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage.blocks):
            if not isinstance(block.mlp.fc1, nn.Conv2d):
                raise ValueError("attention on ConvNeXt blocks needs the NCHW block layout (timm conv_mlp=True)")
            block.mlp = nn.Sequential(block.mlp, _like(make_residual_attention(kind, block.mlp.fc2.out_channels), block))
            inserted.append((f"stages.{s}.blocks.{b}.mlp.1", type(block.mlp[1]).__name__))
    return inserted


_PLACEMENTS = {RESNET: _resnet, MOBILENETV2: _mobilenetv2, CONVNEXT: _convnext}


def insert_residual_attention(model: nn.Module, backbone: str, kind: str) -> List[Tuple[str, str]]:
    """Put a ``kind`` module at the end of every residual branch of a known backbone."""
    if backbone not in _PLACEMENTS:
        raise ValueError(
            f"{kind!r} needs to know where residual branches end; supported backbones are "
            f"{sorted(_PLACEMENTS)}, this model resolves as {backbone!r}"
        )
    return _PLACEMENTS[backbone](model, kind)

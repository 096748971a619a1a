"""Where and in what precision a forward runs: autocast for ``trainer.amp``, batches and weights moved to the
device and memory format of the run. Shared by the training loop and every task's evaluation."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``amp`` in ``bf16``/``fp16``, nothing for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("trainer.amp=fp16 needs a CUDA device; use trainer.amp=bf16 or none on CPU")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch of images on ``device``, channels-last when the run trains that way."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def to_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last for every 4-D parameter and buffer; ``model.to(memory_format=...)`` refuses the
    5-D expert banks of CondConv / DY-Conv / ODConv."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.ndim == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


__all__ = ["AMP_DTYPES", "autocast", "to_channels_last", "to_device"]

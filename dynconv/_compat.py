"""The few torch calls dynconv makes that older torch releases spell differently.

dynconv is developed on current torch, but its detection backbones also run inside mmdetection 3.x,
whose compiled mmcv ops exist only for torch 2.0 / 2.1 (``requirements/mmdet.txt``). Every torch call
that torch 2.1 lacks on a backbone's code path goes through this module, so the rest of dynconv is
written against today's API, and each fallback is chosen once, at import time.

- :func:`is_compiling`: ``torch.compiler.is_compiling`` (torch 2.3+); before it, ``torch._dynamo.is_compiling``.
- :func:`is_exporting`: ``torch.compiler.is_exporting`` (torch 2.5+); before it, ``False``: dynconv's
  batch-independent export paths are for the ``torch.export`` / dynamo ONNX exporters of that torch.
- :func:`autocast_enabled` / :func:`autocast_dtype`: ``torch.is_autocast_enabled(device_type)`` and
  ``torch.get_autocast_dtype(device_type)`` (torch 2.4+); before them, the per-device functions
  (``torch.is_autocast_enabled()`` for CUDA, ``torch.is_autocast_cpu_enabled()``, ...). On both, a device
  type autocast keeps no state for (``meta``) reads as autocast off, in ``float32``.
- :func:`safe_globals`: ``torch.serialization.safe_globals`` (torch 2.5+); before it, nothing is
  added to ``torch.load(weights_only=True)``'s allow-list.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable

import torch

__all__ = ["is_compiling", "is_exporting", "autocast_enabled", "autocast_dtype", "safe_globals"]


def _never() -> bool:
    return False


_compiler = getattr(torch, "compiler", None)
if hasattr(_compiler, "is_compiling"):
    is_compiling: Callable[[], bool] = _compiler.is_compiling
else:  # torch < 2.3: dynamo's own flag, which dynamo folds to True while it traces (about 0.2 s to import)
    from torch._dynamo import is_compiling
is_exporting: Callable[[], bool] = getattr(_compiler, "is_exporting", None) or _never


def _takes_device_type() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: "is_autocast_enabled() takes 0 positional arguments but 1 was given"
        return False
    return True


if _takes_device_type():

    def autocast_enabled(device_type: str) -> bool:
        """Whether autocast is on for ``device_type`` (``torch.is_autocast_enabled(device_type)``)."""
        try:
            return torch.is_autocast_enabled(device_type)
        except RuntimeError:  # a device type autocast has no state for ("meta"): it never applies there
            return False

else:
    _ENABLED = {
        "cuda": torch.is_autocast_enabled,
        "cpu": torch.is_autocast_cpu_enabled,
        "xpu": getattr(torch, "is_autocast_xpu_enabled", _never),
        "hpu": getattr(torch, "is_autocast_hpu_enabled", _never),
    }

    def autocast_enabled(device_type: str) -> bool:
        """Whether autocast is on for ``device_type`` (``torch.is_autocast_enabled(device_type)``)."""
        return bool(_ENABLED.get(device_type, _never)())


if hasattr(torch, "get_autocast_dtype"):

    def autocast_dtype(device_type: str) -> torch.dtype:
        """The dtype autocast casts to on ``device_type`` (``torch.get_autocast_dtype(device_type)``)."""
        try:
            return torch.get_autocast_dtype(device_type)
        except RuntimeError:  # no autocast state for this device type ("meta"): no cast
            return torch.float32

else:
    _DTYPE = {
        "cuda": torch.get_autocast_gpu_dtype,
        "cpu": torch.get_autocast_cpu_dtype,
        "xpu": getattr(torch, "get_autocast_xpu_dtype", torch.get_autocast_gpu_dtype),
        "hpu": getattr(torch, "get_autocast_hpu_dtype", torch.get_autocast_gpu_dtype),
    }

    def autocast_dtype(device_type: str) -> torch.dtype:
        """The dtype autocast casts to on ``device_type`` (``torch.get_autocast_dtype(device_type)``)."""
        dtype = _DTYPE.get(device_type)
        return dtype() if dtype is not None else torch.float32


def safe_globals(globals_: Iterable[Any]) -> ContextManager:
    """``torch.serialization.safe_globals(globals_)``: let ``torch.load(weights_only=True)`` build these
    classes in the block. On torch < 2.5 a no-op: files that need them stay refused there."""
    manager = getattr(torch.serialization, "safe_globals", None)
    return manager(list(globals_)) if manager is not None else contextlib.nullcontext()

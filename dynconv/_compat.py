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

One torch bug is worked around here as well, decided by a probe rather than a version number (2.1.2 has
it and 2.14 does not; the releases between were not available to test):

- :func:`contiguous_grad`: torch 2.1's CPU GELU backward (its oneDNN path) returns a tensor it never
  wrote when the incoming gradient is laid out unlike the GELU input (pytorch/pytorch#112006). dynconv's
  matmul path hands back such gradients (a transposed view, see ``dynconv/ops/functional.py``), so a
  ConvNeXt block's ``GELU -> pointwise dynamic conv`` got uninitialised memory as its gradient (non-finite
  KernelWarehouse ConvNeXt-T gradients in mmdetection on torch 2.1.2). Where
  :func:`gelu_backward_needs_contiguous_grad` finds the bug, the per-sample convolutions pass their input
  through :func:`contiguous_grad`, whose backward makes the gradient contiguous; elsewhere it returns its
  input itself (no autograd node, no copy).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, Iterable

import torch

__all__ = [
    "is_compiling",
    "is_exporting",
    "autocast_enabled",
    "autocast_dtype",
    "safe_globals",
    "gelu_backward_needs_contiguous_grad",
    "contiguous_grad",
]


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


@functools.lru_cache(maxsize=None)
def gelu_backward_needs_contiguous_grad() -> bool:
    """Whether this torch's CPU GELU backward mishandles a gradient whose layout differs from its input's
    (pytorch/pytorch#112006, seen on torch 2.1: the result takes the gradient's strides and is never
    written). Probed once, on first use: a transposed gradient against the same gradient made
    contiguous. The strided call runs first, so its unwritten result cannot hold the right values from a
    previous computation of them."""
    x = torch.linspace(-2.0, 2.0, 64).reshape(8, 8)
    grad = torch.arange(1.0, 65.0).reshape(8, 8).t()  # strides (1, 8), x's are (8, 1)
    with torch.no_grad():
        got = torch.ops.aten.gelu_backward(grad, x)
        want = torch.ops.aten.gelu_backward(grad.contiguous(), x)
    return not torch.allclose(got, want)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward returns the gradient contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, whose gradient reaches the ops before it contiguous where this torch needs that (CPU tensors
    on a torch where :func:`gelu_backward_needs_contiguous_grad`); else ``x`` itself. Eager autograd only:
    compilers and exporters plan their own layouts."""
    if (not x.requires_grad or not torch.is_grad_enabled() or x.device.type != "cpu" or is_compiling()
            or is_exporting() or not gelu_backward_needs_contiguous_grad()):
        return x
    return _ContiguousGrad.apply(x)

"""dynconv._compat: on this torch its functions must agree with torch's own, and its fallbacks (what torch
2.1, the mmdet environment's torch, runs) must agree with them too.

The fallbacks are exercised here by importing a copy of the module on a stand-in ``torch`` that hides the
newer entry points (``torch.compiler.is_compiling`` / ``is_exporting``, ``torch.get_autocast_dtype``, the
``device_type`` argument of ``torch.is_autocast_enabled``), the way torch 2.1 presents itself; the mmdet CI
stage (``scripts/mmdet_stage.py``) runs the real thing on torch 2.1.2.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import types
import warnings

import pytest
import torch

from dynconv import _compat

MODERN = hasattr(torch, "get_autocast_dtype") and hasattr(torch.compiler, "is_exporting")


def _states():
    """Autocast states to compare in: off, CPU bfloat16, CPU float16 (where CPU autocast takes it)."""
    yield "off", torch.autocast("cpu", enabled=False)
    yield "cpu-bf16", torch.autocast("cpu", dtype=torch.bfloat16)
    yield "cpu-bf16-nested-off", _nested_off()


class _nested_off:
    def __enter__(self):
        self._outer = torch.autocast("cpu", dtype=torch.bfloat16)
        self._inner = torch.autocast("cpu", enabled=False)
        self._outer.__enter__()
        self._inner.__enter__()

    def __exit__(self, *exc):
        self._inner.__exit__(*exc)
        self._outer.__exit__(*exc)


def _torch_enabled(device_type: str) -> bool:
    """torch's own answer: the device_type API (2.4+), else the per-device functions of torch 2.1."""
    if MODERN:
        return torch.is_autocast_enabled(device_type)
    return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _torch_dtype(device_type: str) -> torch.dtype:
    if MODERN:
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_autocast_queries_agree_with_torch(device_type):
    for name, state in _states():
        with state:
            assert _compat.autocast_enabled(device_type) == _torch_enabled(device_type), name
            assert _compat.autocast_dtype(device_type) == _torch_dtype(device_type), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _compat.autocast_enabled("cpu") and _compat.autocast_dtype("cpu") == torch.bfloat16
        assert not _compat.autocast_enabled("cuda")
    assert not _compat.autocast_enabled("cpu")


def test_a_device_without_autocast_state_reads_as_off():
    """``meta`` tensors (timm's shape-only model checks, tests/test_timm_suite.py) reach the kernel recipes'
    autocast query (dynconv/ops/_recompute.py), where torch raises for a device type without autocast state."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _compat.autocast_enabled("meta") and _compat.autocast_dtype("meta") == torch.float32


@pytest.mark.skipif(not MODERN, reason="torch.compiler.is_compiling / is_exporting are torch 2.5+ here")
def test_compile_and_export_queries_are_torchs_own():
    assert _compat.is_compiling is torch.compiler.is_compiling
    assert _compat.is_exporting is torch.compiler.is_exporting
    assert not _compat.is_compiling() and not _compat.is_exporting()


class _Torch21(types.ModuleType):
    """``torch`` as torch 2.1 presents it to ``dynconv._compat``: no ``torch.compiler.is_compiling`` /
    ``is_exporting``, no ``torch.get_autocast_dtype``, and ``torch.is_autocast_enabled()`` without the
    ``device_type`` argument (CUDA only); everything else is this torch's."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.compiler = types.SimpleNamespace(**{k: v for k, v in vars(torch.compiler).items()
                                                 if k not in ("is_compiling", "is_exporting")})

    def __getattr__(self, name: str):
        if name == "get_autocast_dtype":
            raise AttributeError(name)
        if name == "is_autocast_enabled":
            return lambda: torch.is_autocast_enabled("cuda")
        return getattr(torch, name)


@pytest.fixture
def old_torch(monkeypatch):
    """A copy of ``dynconv._compat`` imported on :class:`_Torch21` (the real module is left alone)."""
    if not MODERN:
        return _compat
    import torch._dynamo  # noqa: F401  (the fallback imports it; the stand-in has no submodules of its own)

    monkeypatch.setitem(sys.modules, "torch", _Torch21())
    spec = importlib.util.spec_from_file_location("dynconv._compat_torch21", _compat.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "torch", torch)
    return module


@pytest.mark.skipif(not MODERN, reason="compared with the device_type API of torch 2.5+")
def test_fallbacks_agree_with_torch(old_torch):
    assert old_torch.is_compiling is not getattr(torch.compiler, "is_compiling", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, state in _states():
            with state:
                for device_type in ("cpu", "cuda"):
                    assert old_torch.autocast_enabled(device_type) == torch.is_autocast_enabled(device_type), name
                    assert old_torch.autocast_dtype(device_type) == torch.get_autocast_dtype(device_type), name
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert old_torch.autocast_enabled("cpu") and not old_torch.autocast_enabled("cuda")
        for unknown in ("meta", "not-a-device"):  # no autocast state: off, no cast
            assert not old_torch.autocast_enabled(unknown) and old_torch.autocast_dtype(unknown) == torch.float32
    assert old_torch.is_compiling() is False and old_torch.is_exporting() is False


def test_dynamo_fallback_sees_a_compiled_call(old_torch):
    """torch < 2.3's is_compiling is torch._dynamo's flag: True inside a compiled function."""

    def f(x):
        return x + 1 if old_torch.is_compiling() else x - 1

    x = torch.zeros(2)
    assert torch.equal(f(x), x - 1)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=False)
    assert torch.equal(compiled(x), x + 1)
    torch._dynamo.reset()


def test_safe_globals_allows_the_class_and_falls_back_to_nothing(tmp_path, monkeypatch):
    path = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    if hasattr(torch.serialization, "safe_globals"):
        with _compat.safe_globals([argparse.Namespace]):
            assert torch.load(path, weights_only=True)["args"].lr == 0.1
    monkeypatch.delattr(torch.serialization, "safe_globals", raising=False)
    with _compat.safe_globals([argparse.Namespace]):  # torch < 2.5: a no-op, the file stays refused
        with pytest.raises(Exception, match="Namespace|[Ww]eights only"):
            torch.load(path, weights_only=True)


# -- torch 2.1's CPU GELU backward and strided gradients (pytorch/pytorch#112006) ------------------------------


def _gelu_backward_is_wrong_for_a_strided_grad() -> bool:
    """Observed directly, independently of the probe: autograd's GELU backward on a channels-last-strided
    gradient (the layout a 1x1 conv on dynconv's matmul path hands back) against float64 autograd."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 5, 7, requires_grad=True)
    grad = torch.randn(2, 5, 7, 64).permute(0, 3, 1, 2)  # strides of channels-last, x is contiguous
    (got,) = torch.autograd.grad(torch.nn.functional.gelu(x), x, grad)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(torch.nn.functional.gelu(x64), x64, grad.double())
    return not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


def test_the_gelu_probe_agrees_with_torchs_gelu_backward():
    """The probe (a transposed 8x8 gradient) must see what a real activation gradient sees. The bug is
    reported against torch 2.1.0 (pytorch/pytorch#112006) and reproduced on 2.1.2, the mmdet environment's
    torch, where `make mmdet-test` runs this file; torch 2.14 computes it right."""
    assert _compat.gelu_backward_needs_contiguous_grad() == _gelu_backward_is_wrong_for_a_strided_grad()
    if torch.__version__.startswith("2.1."):
        assert _compat.gelu_backward_needs_contiguous_grad()


@pytest.fixture(params=["this torch", "guard forced"])
def grad_guard(request, monkeypatch):
    """This torch's own answer, and the guard forced on (what torch 2.1 runs), on any torch."""
    if request.param == "guard forced":
        monkeypatch.setattr(_compat, "gelu_backward_needs_contiguous_grad", lambda: True)
    return request.param


def test_contiguous_grad_is_the_input_itself_where_nothing_is_needed(monkeypatch):
    x = torch.randn(3, 4, requires_grad=True)
    monkeypatch.setattr(_compat, "gelu_backward_needs_contiguous_grad", lambda: False)
    assert _compat.contiguous_grad(x) is x  # no autograd node on a torch without the bug
    monkeypatch.setattr(_compat, "gelu_backward_needs_contiguous_grad", lambda: True)
    assert _compat.contiguous_grad(x.detach()) is not x and _compat.contiguous_grad(x.detach()).grad_fn is None
    with torch.no_grad():
        assert _compat.contiguous_grad(x) is x
    assert _compat.contiguous_grad(torch.randn(3, 4, device="meta", requires_grad=True)).grad_fn is None


def test_contiguous_grad_hands_back_the_same_gradient_contiguous(grad_guard):
    x0 = torch.randn(4, 6, requires_grad=True)
    x = x0 * 1.0  # a non-leaf, so the hook sees the gradient as it arrives (no AccumulateGrad layout rules)
    seen = []
    x.register_hook(seen.append)
    g = torch.randn(6, 4)
    _compat.contiguous_grad(x).t().backward(g)  # t()'s backward: a transposed (strided) view of g
    assert torch.equal(seen[0], g.t())
    assert seen[0].is_contiguous() == (grad_guard == "guard forced" or _compat.gelu_backward_needs_contiguous_grad())


def _per_sample_case(case: str):
    """(weight shape, conv kwargs) of per_sample_conv2d on each of its paths."""
    b, c_in, c_out = 3, 16, 24
    if case == "matmul-1x1":  # the KW / CondConv / ODConv pointwise layer of a ConvNeXt block (fc2 after GELU)
        return (b, c_out, c_in, 1, 1), {}
    if case == "matmul-3x3":
        return (b, c_out, c_in, 3, 3), dict(padding=(1, 1), path="matmul")
    if case == "grouped-3x3":
        return (b, c_out, c_in, 3, 3), dict(padding=(1, 1), path="grouped")
    if case == "plain-3x3":
        return (b, c_out, c_in, 3, 3), dict(padding=(1, 1), path="plain")
    if case == "shared-1x1-scaled":  # ODConv 1x: one kernel, per-sample tap and channel scales
        return (c_out, c_in, 1, 1), dict(tap=True, channel=True)
    raise ValueError(case)


@pytest.mark.parametrize("case", ["matmul-1x1", "matmul-3x3", "grouped-3x3", "plain-3x3", "shared-1x1-scaled"])
def test_gelu_before_a_per_sample_conv_gets_the_right_gradient(case, grad_guard):
    """The KernelWarehouse ConvNeXt-T regression (non-finite backbone gradients in mmdetection on torch
    2.1.2): ``GELU -> per-sample 1x1 conv`` on the matmul path, whose input gradient is a transposed view.
    The GELU input's gradient must match float64 autograd on every path; where the guard is on, the
    gradient reaching the GELU output must be contiguous."""
    from dynconv.ops.functional import per_sample_conv2d
    from dynconv.ops.kernels import Kernels

    torch.manual_seed(0)
    shape, kwargs = _per_sample_case(case)
    tap, channel = kwargs.pop("tap", False), kwargs.pop("channel", False)
    batch = 3
    c_in, (kh, kw) = shape[-3], shape[-2:]
    x0 = torch.randn(batch, c_in, 5, 6, requires_grad=True)
    weight = (torch.randn(*shape) * 0.2).requires_grad_()
    tap_scale = torch.rand(batch, kh * kw).requires_grad_() if tap else None
    in_scale = torch.rand(batch, c_in).requires_grad_() if channel else None
    leaves = [t for t in (x0, weight, tap_scale, in_scale) if t is not None]

    def run(dtype):
        x = torch.nn.functional.gelu(x0.to(dtype))
        seen = []
        x.register_hook(seen.append)
        out = per_sample_conv2d(x, Kernels(weight.to(dtype), spatial=None if tap_scale is None else tap_scale.to(dtype),
                                           in_channel=None if in_scale is None else in_scale.to(dtype)), **kwargs)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        return torch.autograd.grad(out, leaves, grad), seen[0]

    got, arriving = run(torch.float32)
    want, _ = run(torch.float64)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5)  # (float64 autograd, cast back to the leaves' dtype)
    if grad_guard == "guard forced" or _compat.gelu_backward_needs_contiguous_grad():
        assert arriving.is_contiguous()

"""The matmul path's sample-chunked backward (dynconv.ops._unfolded) and the output scale folded into the
per-sample kernels (per_sample_conv2d(out_scale=...)): float64 values and gradients against a per-sample
loop of F.conv2d, and the memory each saves, counted by the live-tensor tracker."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynconv.memory_floor import LiveTensorTracker
from dynconv.ops import _cpu_tuning, functional
from dynconv.ops.kernels import Kernels, MixedKernels
from dynconv.ops.odconv import ODConv2d

F64 = 8


def _loop_reference(x, kernels, taps, channels, rows, stride, padding, dilation, groups):
    """Sample by sample: ``conv(x_b * channels_b, kernels_b * taps_b * rows_b)``, the definition."""
    outs = []
    for b in range(x.shape[0]):
        kernel = kernels[b] if kernels.dim() == 5 else kernels
        if taps is not None:
            kernel = kernel * taps[b].reshape(1, 1, *kernel.shape[-2:])
        if rows is not None:
            kernel = kernel * rows[b].reshape(-1, 1, 1, 1)
        xb = x[b:b + 1] * channels[b].reshape(1, -1, 1, 1) if channels is not None else x[b:b + 1]
        outs.append(F.conv2d(xb, kernel, None, stride, padding, dilation, groups))
    return torch.cat(outs)


@pytest.mark.parametrize("chunk_bytes", [1, 2**40])
@pytest.mark.parametrize("kind", ["shared", "per_sample", "mixed"])
@pytest.mark.parametrize("groups,kernel,stride,dilation", [(1, 3, 1, 1), (2, 3, 2, 1), (1, 3, 1, 2), (1, 1, 2, 1)])
@pytest.mark.parametrize("path", ["matmul", "grouped"])
def test_per_sample_conv_equals_the_loop_of_convs(monkeypatch, chunk_bytes, kind, groups, kernel, stride, dilation,
                                                  path):
    """Every kernel kind, with tap, input-channel and output-channel scales, in training (the matmul path's
    backward one sample per chunk, or the whole batch; the grouped path's scales folded into its kernels)."""
    monkeypatch.setattr(_cpu_tuning, "UNFOLD_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    batch, n, c_in, c_out = 3, 4, 8, 6
    opts = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, c_in, 7, 7, **opts)
    taps, channels, rows = (torch.rand(batch, kernel * kernel, **opts), torch.rand(batch, c_in, **opts),
                            torch.rand(batch, c_out, **opts))
    bank = torch.randn(n, c_out, c_in // groups, kernel, kernel, **opts)
    coeffs = torch.rand(batch, n, **opts)
    padding = (dilation * (kernel - 1) // 2,) * 2
    conv = dict(stride=(stride, stride), padding=padding, dilation=(dilation, dilation), groups=groups)
    args, factors = dict(conv, path=path), dict(spatial=taps, in_channel=channels, out_channel=rows)
    if kind == "shared":
        got = functional.per_sample_conv2d(x, Kernels(bank[0], **factors), None, **args)
    elif kind == "per_sample":
        got = functional.per_sample_conv2d(x, Kernels(functional.mix_kernels(coeffs, bank), **factors,
                                           rebuild=lambda: functional.mix_kernels(coeffs.detach(), bank.detach())),
                                           None, **args)
    else:
        got = functional.per_sample_conv2d(x, MixedKernels(coeffs, bank, **factors), None, **args)
    reference_kernels = bank[0] if kind == "shared" else functional.mix_kernels(coeffs, bank)  # its own graph
    expected = _loop_reference(x, reference_kernels, taps, channels, rows, **conv)
    torch.testing.assert_close(got, expected)
    leaves = [x, taps, channels, rows, bank] + ([coeffs] if kind != "shared" else [])
    upstream = torch.randn_like(expected)
    for g, e in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(g, e)


def test_the_chunked_backward_never_holds_the_batch_unfolded(monkeypatch):
    """ODConv 1x's case (a shared kernel, per-sample tap and channel scales) on the matmul path: with one
    sample per chunk the backward holds a fraction of the batch's unfolded input (9 x the input); with the
    whole batch as one chunk it holds it at least twice (the unfolded input and its gradient)."""
    batch, channels = 16, 32
    x = torch.randn(batch, channels, 10, 10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(channels, channels, 3, 3, dtype=torch.float64, requires_grad=True)
    taps = torch.rand(batch, 9, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(batch, channels, dtype=torch.float64, requires_grad=True)
    unfolded_bytes = x.numel() * 9 * F64

    def backward_peak(chunk_bytes: int) -> int:
        monkeypatch.setattr(_cpu_tuning, "UNFOLD_CHUNK_BYTES", chunk_bytes)
        out = functional.per_sample_conv2d(x, Kernels(weight, spatial=taps, in_channel=scale), None, padding=(1, 1),
                                           path="matmul")
        upstream = torch.ones_like(out)
        with LiveTensorTracker() as tracker:
            tracker.add([x, weight, taps, scale, out, upstream], "held")
            before = tracker.current
            torch.autograd.grad(out, [x, weight, taps, scale], upstream)
        return tracker.peak - before

    whole, chunked = backward_peak(2**40), backward_peak(1)
    assert whole >= 2 * unfolded_bytes
    # one sample's unfolded input, its scaled copy and their gradient (3 x 1/B of the batch's), and maps of
    # the input's size: the rebuilt channel-scaled input, the input gradient, and the channel scale's
    # backward (its product and the unscaled gradient): 1/9 of the unfolded batch each
    assert chunked <= 3 * unfolded_bytes / batch + 5 * x.numel() * F64
    assert chunked < whole / 3


def test_odconv_keeps_no_unscaled_output_on_the_grouped_path():
    """ODConv's filter attention scales the per-sample kernels' rows (out_scale) instead of the output: the
    forward keeps no output map besides the one it returns (the map's gradient reads the kernels)."""
    torch.manual_seed(0)
    layer = ODConv2d(16, 16, 3, padding=1, kernel_num=1).double().train()
    x = torch.randn(4, 16, 32, 32, dtype=torch.float64, requires_grad=True)  # 1024 output pixels: grouped
    assert functional.choose_path(x, layer.weight[0], (1, 1), (1, 1), 1) == "grouped"
    with LiveTensorTracker() as tracker:
        tracker.add([x, *layer.parameters()], "held")
        before = tracker.current
        out = layer(x)
        kept = tracker.current - before
    assert out.numel() * F64 <= kept < 1.25 * out.numel() * F64


@pytest.mark.parametrize("kernel,size", [(1, 32), (3, 32), (3, 6)])
def test_dcd_scale_on_the_kernels_equals_scaling_the_output(monkeypatch, kernel, size):
    """DCD's Lambda on per-sample copies of W0 (large maps: 1x1, or the grouped path) gives the outputs and
    float64 gradients of Lambda * conv_W0(x); on small maps with 3x3 kernels the output is scaled as before."""
    from dynconv.ops.dcd import DCDConv2d

    torch.manual_seed(0)
    layer = DCDConv2d(16, 24, kernel, padding=kernel // 2).double().train()
    x = torch.randn(3, 16, size, size, dtype=torch.float64, requires_grad=True)
    assert layer._scale_kernels(x) == (size == 32)
    leaves = [x, *layer.parameters()]
    got = layer(x)
    upstream = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, leaves, upstream)
    monkeypatch.setattr(DCDConv2d, "_scale_kernels", lambda self, x: False)
    expected = layer(x)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(g, e)


def test_dcd_keeps_no_static_conv_output_on_large_maps():
    """A 1x1 DCD layer on a 32x32 map (MobileNetV2's pointwise case) keeps, besides the output it returns, only
    its latent maps (L = 4 channels here, against 32 output channels), not conv_W0(x)."""
    from dynconv.ops.dcd import DCDConv2d

    torch.manual_seed(0)
    layer = DCDConv2d(16, 32, 1).double().train()
    x = torch.randn(4, 16, 32, 32, dtype=torch.float64, requires_grad=True)
    with LiveTensorTracker() as tracker:
        tracker.add([x, *layer.parameters()], "held")
        before = tracker.current
        out = layer(x)
        kept = tracker.current - before
    out_bytes = out.numel() * F64
    assert kept < 1.8 * out_bytes  # conv_W0(x) kept as well would be 2 x the output and more

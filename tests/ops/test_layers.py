"""Each dynamic layer against the slow per-sample reference, in float64, on odd shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynconv.ops import CondConv2d, DynamicConv2d, ODConv2d

from .reference import condconv_coefficients, dyconv_coefficients, mixture_reference, odconv_reference

# (in, out, kernel, stride, padding, dilation, groups, H, W)
SHAPES = {
    "stride2": (4, 6, 3, 2, 1, 1, 1, 9, 7),
    "dilation2": (4, 6, 3, 1, 2, 2, 1, 8, 8),
    "groups2": (4, 6, 3, 1, 1, 1, 2, 7, 9),
    "depthwise": (6, 6, 3, 1, 1, 1, 6, 8, 8),
    "pointwise": (5, 7, 1, 1, 0, 1, 1, 6, 6),
    "k5": (3, 4, 5, 1, 2, 1, 1, 9, 8),
    "k1x3": (4, 6, (1, 3), 1, (0, 1), 1, 1, 6, 5),
}


def _layer(cls, shape, **kw):
    cin, cout, k, s, p, d, g, _, _ = shape
    layer = cls(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, **kw).double()
    return layer


def _randomise_norms(layer):
    for m in layer.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.data.uniform_(-0.5, 0.5)


def _compare(layer, reference, shape, batch):
    """Outputs and gradients (input and every parameter) of layer vs reference."""
    x = torch.randn(batch, shape[0], shape[7], shape[8], dtype=torch.float64, requires_grad=True)
    layer.eval()
    y = layer(x)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], grad_out, allow_unused=True)
    y_ref = reference(layer, x)
    grads_ref = torch.autograd.grad(y_ref, [x, *layer.parameters()], grad_out, allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    names = ["input"] + [n for n, _ in layer.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("kernel_num", [1, 4])
def test_odconv_matches_reference(shape, batch, kernel_num):
    layer = _layer(ODConv2d, shape, kernel_num=kernel_num, bias=shape[1] == 7)
    _randomise_norms(layer)
    layer.attention.set_schedule_value(3.0)  # a non-trivial temperature
    _compare(layer, odconv_reference, shape, batch)


@pytest.mark.parametrize("temperature", [30.0, 3.9, 1.0])
@pytest.mark.parametrize("shape", [SHAPES["depthwise"], SHAPES["pointwise"], SHAPES["stride2"]],
                         ids=["depthwise", "pointwise", "stride2"])
def test_odconv_training_mode_matches_reference_along_the_temperature_ramp(shape, temperature):
    """Training mode (the attention BatchNorm on batch statistics) at the start, the end and the last
    stretch of the 30 -> 1 ramp, where the demo run's accuracy drops: the same output as the reference
    evaluated with the batch's mean and biased variance as running statistics (what training-mode
    BatchNorm normalises with; official OSVAI/ODConv modules/odconv.py uses a plain nn.BatchNorm2d)."""
    layer = _layer(ODConv2d, shape, kernel_num=4, bias=False)
    _randomise_norms(layer)
    layer.attention.set_schedule_value(temperature)
    x = torch.randn(5, shape[0], shape[7], shape[8], dtype=torch.float64)
    hidden = layer.attention.fc(x.mean((2, 3), keepdim=True)).flatten(1)
    y = layer.train()(x)
    bn = layer.attention.bn
    bn.running_mean.copy_(hidden.mean(0))
    bn.running_var.copy_(hidden.var(0, unbiased=False))
    torch.testing.assert_close(y, odconv_reference(layer.eval(), x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_dyconv_matches_reference(shape, batch):
    layer = _layer(DynamicConv2d, shape, num_kernels=4)
    _randomise_norms(layer)
    layer.attention.set_schedule_value(5.0)
    _compare(layer, lambda m, x: mixture_reference(m, x, dyconv_coefficients(m, x)), shape, batch)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_condconv_matches_reference(shape, batch):
    layer = _layer(CondConv2d, shape, num_experts=3)
    _randomise_norms(layer)
    _compare(layer, lambda m, x: mixture_reference(m, x, condconv_coefficients(m, x)), shape, batch)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_odconv_unit_attentions_equal_static_conv_with_summed_kernel(shape, monkeypatch):
    layer = _layer(ODConv2d, shape, kernel_num=3, bias=False)
    x = torch.randn(2, shape[0], shape[7], shape[8], dtype=torch.float64)

    def unit_attentions(inp):
        b = inp.shape[0]
        ones = lambda *s: torch.ones(b, *s, dtype=inp.dtype)  # noqa: E731
        return ones(layer.in_channels, 1, 1), ones(layer.out_channels, 1, 1), ones(1, 1, *layer.kernel_size), ones(3)

    monkeypatch.setattr(layer.attention, "forward", unit_attentions)
    expected = F.conv2d(x, layer.weight.sum(0), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_dyconv_single_kernel_is_static_conv(shape):
    layer = _layer(DynamicConv2d, shape, num_kernels=1)
    layer.attention.set_schedule_value(30.0)
    x = torch.randn(3, shape[0], shape[7], shape[8], dtype=torch.float64)
    expected = F.conv2d(x, layer.weight[0], layer.bias[0], layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_condconv_single_expert_is_scaled_static_conv(shape):
    layer = _layer(CondConv2d, shape, num_experts=1)
    x = torch.randn(3, shape[0], shape[7], shape[8], dtype=torch.float64)
    scale = torch.sigmoid(layer.routing(x.mean((2, 3))))[:, :, None, None]
    static = F.conv2d(x, layer.weight[0], layer.bias[0], layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x), scale * static)


@pytest.mark.parametrize("cls", [ODConv2d, DynamicConv2d, CondConv2d])
def test_batch_size_one_training_step(cls):
    """ODConv's attention BatchNorm falls back to running statistics for a one-sample batch."""
    layer = cls(4, 6, 3, padding=1)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    loss = layer(torch.randn(1, 4, 8, 8)).square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in layer.named_parameters())


def test_one_sample_batchnorm_uses_running_stats_and_leaves_them():
    layer = ODConv2d(4, 6, 3, padding=1).train()
    bn = layer.attention.bn
    bn.running_mean.fill_(0.3)
    layer(torch.randn(1, 4, 8, 8))
    assert torch.all(bn.running_mean == 0.3)
    layer(torch.randn(2, 4, 8, 8))  # two samples: ordinary batch statistics, running stats move
    assert not torch.all(bn.running_mean == 0.3)


@pytest.mark.parametrize("cls", [ODConv2d, DynamicConv2d, CondConv2d])
@pytest.mark.parametrize("conv_kwargs", [dict(stride=2, padding=1), dict(padding=2, dilation=2, groups=2, bias=False)])
def test_from_conv_keeps_conv_contract(cls, conv_kwargs):
    conv = nn.Conv2d(4, 8, 3, **conv_kwargs).double()
    layer = cls.from_conv(conv)
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    y = layer(x)
    assert y.shape == conv(x).shape and y.dtype == torch.float64
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert (layer.bias is None) == (conv.bias is None)


def test_from_conv_rejects_other_padding_modes():
    with pytest.raises(ValueError, match="padding_mode"):
        ODConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))

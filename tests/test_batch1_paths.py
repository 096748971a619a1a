"""Batch-1 inference paths (no autograd, one sample: the per-sample kernel is one kernel) give what the
batched path gives for that sample (float64), so the latency work on them (scripts/bench.py --tables latency)
cannot change a model's function."""
import pytest
import torch

from dynconv.ops.functional import per_sample_conv2d
from dynconv.ops.odconv import ODConv2d


def _batched_reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer on ``x`` padded to a batch of 2 with another sample, with autograd on (the general path)."""
    other = torch.randn_like(x)
    with torch.enable_grad():
        return layer(torch.cat([x, other])).detach()[:1]


@pytest.mark.parametrize("kernel_num", [1, 4])
@pytest.mark.parametrize("shape", [
    # (C_in, C_out, k, stride, groups, H): large maps (attentions on the kernel), small maps (on the maps),
    # depthwise, 1x1 ("pw1x" with one kernel)
    (8, 16, 3, 1, 1, 16), (32, 48, 3, 2, 1, 4), (16, 16, 3, 1, 16, 12), (16, 16, 3, 1, 16, 2),
    (16, 24, 1, 1, 1, 8), (16, 24, 1, 1, 1, 2), (16, 32, 3, 1, 4, 6),
])
@pytest.mark.parametrize("bias", [False, True])
def test_odconv_one_sample_path_equals_batched(kernel_num, shape, bias):
    c_in, c_out, k, stride, groups, size = shape
    torch.manual_seed(0)
    layer = ODConv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias,
                     kernel_num=kernel_num).double().eval()
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(1, c_in, size, size, dtype=torch.float64)
    calls, one_sample = [], layer._forward_one
    layer._forward_one = lambda x: calls.append(1) or one_sample(x)
    with torch.no_grad():
        got = layer(x)
    assert calls  # the one-sample path ran
    torch.testing.assert_close(got, _batched_reference(layer, x), rtol=1e-12, atol=1e-12)
    weight = layer.weight.detach().clone()
    with torch.no_grad():
        layer(x)
    assert torch.equal(layer.weight, weight)  # the in-place scalings touch only fresh kernels


def test_plain_path_one_sample_equals_grouped():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 9, 9, dtype=torch.float64)
    w = torch.randn(1, 10, 6, 3, 3, dtype=torch.float64)
    got = per_sample_conv2d(x, w, None, (1, 1), (1, 1), path="plain")
    want = per_sample_conv2d(x, w, None, (1, 1), (1, 1), path="grouped")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p_bias", [False, True])
def test_dcd_fused_output_equals_its_equation(p_bias):
    """DCD's output ``Lambda * conv_W0(x) + P(BN(Phi z) + z) + bias`` (liyunsheng13/dcd
    ``models/imagenet/resnet_dcd.py``, ``conv_dy.forward``; the static bias is dynconv's), written out term by
    term, against the layer's fused multiply-add, with P carrying a bias as ``dynconv.deploy`` gives it."""
    from dynconv.ops.dcd import DCDConv2d

    torch.manual_seed(0)
    layer = DCDConv2d(16, 24, 3, padding=1, bias=True).double().eval()
    torch.nn.init.normal_(layer.bias)
    for bn in (layer.bn1, layer.bn2):
        torch.nn.init.normal_(bn.running_mean)
        torch.nn.init.uniform_(bn.running_var, 0.5, 2.0)
        bn.num_batches_tracked.fill_(1)
    if p_bias:
        layer.p.bias = torch.nn.Parameter(torch.randn(24, dtype=torch.float64))
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        phi, scale = layer.attention(x)
        z = layer.bn1(layer.q(x)).flatten(2)
        z = layer.bn2(phi @ z) + z
        want = layer.conv(x) * scale[:, :, None, None] + layer.p(z.view(2, -1, 7, 7)) + layer.bias.view(1, -1, 1, 1)
        for batch in (2, 1):
            torch.testing.assert_close(layer(x[:batch]), want[:batch], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv", ["kw_1x", "kw_1d4x"])
@pytest.mark.parametrize("deployed", [False, True])
def test_kernelwarehouse_one_sample_path_equals_batched(conv, deployed):
    """Every KW layer of a small ResNet18 (and its deployed form, whose folded BatchNorm scale the one-sample
    path writes into the kernel with the cells' permute) against the batched path, float64, tau 0."""
    import dynconv
    from dynconv.ops.kernelwarehouse import KWConv2d

    torch.manual_seed(0)
    model = dynconv.create_model("resnet18", conv, num_classes=10).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        model.train()
        model(x)  # BatchNorm statistics, so that deploy folds them
    model.eval()
    if deployed:
        model = dynconv.deploy(model, x[:1])
    calls, layers = [], [m for m in model.modules() if isinstance(m, KWConv2d)]
    for m in layers:
        m._forward_one = (lambda f: lambda t: calls.append(1) or f(t))(m._forward_one)
    with torch.no_grad():
        got = model(x[:1])
    # every KW layer (16 block convs, 3 strided downsamples); deployed, those whose fold scales the kernels
    assert len(layers) == 19 and (len(calls) == 19 if not deployed else 0 < len(calls) < 19)
    torch.testing.assert_close(got, _batched_reference(model, x[:1]), rtol=1e-10, atol=1e-10)

"""DCD against the explicit per-sample W(x) = Lambda(x) W0 + P M(x) Q, and its placement rules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconv
from dynconv.ops.dcd import DCDConv2d, DCDLinear, hard_sigmoid2, mobilenetv2_dims

from .test_layers import SHAPES


def bn_affine(bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def hsig(v):
    return torch.clamp(v + 3, 0, 6) / 3


def attention(layer, x_b):
    pooled = F.adaptive_avg_pool2d(x_b.unsqueeze(0), layer.pool).reshape(-1)
    y = layer.fc[0].weight @ pooled
    y = y * hsig(layer.fc[1].fc[0].weight @ y)
    phi = (layer.fc_phi.weight @ y).reshape(layer.latent_dim, layer.latent_dim)
    return phi, hsig(layer.fc_scale.weight @ y)


def dcd_reference(layer, x):
    """Eval mode. z = a1 Q x + c1, out_lr = P((diag(a2) Phi + I) z + c2): a 1x1 kernel P M diag(a1) Q at
    the centre tap of a k x k kernel, plus a per-sample bias P (M c1 + c2)."""
    a1, c1 = bn_affine(layer.bn1)
    a2, c2 = bn_affine(layer.bn2)
    kh, kw = layer.kernel_size
    outs = []
    for b in range(x.shape[0]):
        phi, lam = attention(layer, x[b])
        m = a2[:, None] * phi + torch.eye(layer.latent_dim, dtype=x.dtype)
        p, q = layer.p.weight[:, :, 0, 0], layer.q.weight[:, :, 0, 0]
        low_rank = torch.zeros(layer.out_channels, layer.in_channels, kh, kw, dtype=x.dtype)
        low_rank[:, :, (kh - 1) // 2, (kw - 1) // 2] = p @ m @ (a1[:, None] * q)
        bias = p @ (m @ c1 + c2) + (layer.bias if layer.bias is not None else 0)
        xb = x[b:b + 1]
        static = F.conv2d(xb, lam[:, None, None, None] * layer.conv.weight, None, layer.stride, layer.padding,
                          layer.dilation, layer.groups)
        dense = F.conv2d(xb, low_rank, bias, layer.stride, layer.padding, layer.dilation)
        outs.append(static + dense)
    return torch.cat(outs)


def randomise(layer):
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        if layer.bias is not None:
            layer.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_dcd_matches_explicit_kernels(shape, pool, batch):
    cin, cout, k, s, p, d, g, h, w = shape
    layer = DCDConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, pool=pool, bias=cout == 7).double()
    randomise(layer)
    layer.eval()
    x = torch.randn(batch, cin, h, w, dtype=torch.float64, requires_grad=True)
    y, y_ref = layer(x), dcd_reference(layer, x)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    params = list(layer.parameters())
    for a, b in zip(torch.autograd.grad(y, [x, *params], grad), torch.autograd.grad(y_ref, [x, *params], grad)):
        torch.testing.assert_close(a, b)


def test_latent_path_follows_the_centre_tap_for_any_padding():
    for k, p, d in ((3, 0, 1), (3, 2, 1), (2, 0, 1), (4, 1, 2), (5, 1, 1)):
        layer = DCDConv2d(4, 6, k, stride=2, padding=p, dilation=d).double().eval()
        x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
        torch.testing.assert_close(layer(x), dcd_reference(layer, x))


def test_dcd_linear_matches_reference():
    layer = DCDLinear(20, 7, latent_dim=5, squeeze=6).double()
    for bn in (layer.bn1, layer.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    layer.eval()
    x = torch.randn(3, 20, dtype=torch.float64)
    a1, c1 = bn_affine(layer.bn1)
    a2, c2 = bn_affine(layer.bn2)
    rows = []
    for v in x:
        y = layer.fc[0].weight @ v
        y = y * hsig(layer.fc[1].fc[0].weight @ y)
        phi = (layer.fc_phi.weight @ y).reshape(5, 5)
        z = a1 * (layer.cls_q.weight @ v) + c1
        rows.append(hsig(layer.fc_scale.weight @ y) * (layer.cls.weight @ v + layer.cls.bias)
                    + layer.cls_p.weight @ (a2 * (phi @ z) + c2 + z))
    torch.testing.assert_close(layer(x), torch.stack(rows))


def test_hard_sigmoid_range_is_zero_to_two():
    assert hard_sigmoid2(torch.tensor([-10.0, -3.0, 0.0, 3.0, 10.0])).tolist() == [0.0, 0.0, 1.0, 2.0, 2.0]


def test_official_shapes_resnet18_and_50():
    r18 = dynconv.create_model("resnet18", "dcd")
    conv = r18.layer1[0].conv1  # conv_basic_dy(64, 64): L = int(sqrt(256)) = 16, S = 256 // 16
    assert (conv.pool, conv.latent_dim, conv.fc[0].weight.shape) == (2, 16, (16, 256))
    assert conv.fc_phi.weight.shape == (256, 16) and type(r18.layer2[0].downsample[0]) is nn.Conv2d
    assert isinstance(r18.fc, DCDLinear) and type(r18.conv1) is nn.Conv2d
    r50 = dynconv.create_model("resnet50", "dcd")
    conv = r50.layer3[0].conv2  # conv_dy(256, 256, 3, stride 2): L = 16, S = 256 // 16
    assert (conv.pool, conv.latent_dim, conv.fc[0].weight.shape, conv.q.stride) == (1, 16, (16, 256), (2, 2))


def test_official_shapes_mobilenetv2():
    model = dynconv.create_model("mobilenetv2_100", "dcd")
    dynamic = [n for n, m in model.named_modules() if isinstance(m, DCDConv2d)]
    assert len(dynamic) == 32 and "blocks.0.0.conv_pw" not in dynamic
    assert all(n.endswith(("conv_pw", "conv_pwl")) for n in dynamic)
    assert isinstance(model.classifier, DCDLinear) and type(model.conv_head) is nn.Conv2d
    # DYModule(16, 96): expansion, pool 2, L = min(64 // 8, 96 // 8) = 8 (8^2 <= 128), S = 64 // 8.
    assert mobilenetv2_dims(16, 96) == (2, 8, 8)
    layer = model.blocks[1][0].conv_pw
    assert (layer.pool, layer.latent_dim, layer.fc[0].weight.shape) == (2, 8, (8, 64))
    # DYModule(960, 320): projection, pool 1, reduction 2 -> 160, doubled until L^2 <= 1920: L = 40,
    # S = max(960, 1600) // 8.
    assert mobilenetv2_dims(960, 320) == (1, 40, 200)

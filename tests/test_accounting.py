"""MAC counting: each layer type against its analytic formula, and the ODConv README's MAdds."""
from __future__ import annotations

import pytest
import timm
from torch import nn

import dynconv
from dynconv.ops import CondConv2d, DynamicConv2d, ODConv2d
from dynconv.ops.dcd import DCDConv2d
from dynconv.ops.dgc import DGCConv2d
from dynconv.ops.icconv import InceptionConv2d
from dynconv.ops.kernelwarehouse import KWConv2d

C_IN, C_OUT, K, HW = 16, 32, 3, 14
KERNEL = C_OUT * C_IN * K * K
CONV = KERNEL * HW * HW  # stride 1, padding 1: the output is HW x HW too


def breakdown(layer: nn.Module, batch: int = 1) -> dict:
    return dynconv.macs_breakdown(nn.Sequential(layer), (batch, C_IN, HW, HW))


def expect(**parts) -> dict:
    out = {**dict(static=0, dynamic_conv=CONV, attention=0, aggregation=0, scaling=0), **parts}
    out["total"] = sum(out.values())
    return out


def test_static_conv():
    got = breakdown(nn.Conv2d(C_IN, C_OUT, K, padding=1))
    assert got == expect(static=CONV, dynamic_conv=0)


def test_condconv():
    # routing Linear C_in -> E; mixing E kernels and E biases.
    got = breakdown(CondConv2d(C_IN, C_OUT, K, padding=1, num_experts=4))
    assert got == expect(attention=C_IN * 4, aggregation=4 * KERNEL + 4 * C_OUT)


def test_dyconv():
    hidden = int(C_IN * 0.25) + 1
    got = breakdown(DynamicConv2d(C_IN, C_OUT, K, padding=1, num_kernels=4))
    assert got == expect(attention=C_IN * hidden + hidden * 4, aggregation=4 * KERNEL + 4 * C_OUT)


def test_odconv_general_path():
    a = 16  # max(int(16 / 16), 16)
    heads = C_IN + C_OUT + K * K + 4
    got = breakdown(ODConv2d(C_IN, C_OUT, K, padding=1, kernel_num=4, bias=False))
    # spatial and kernel attention each multiply all 4 kernels; a_c scales the input, a_f the output.
    assert got == expect(attention=C_IN * a + a * heads, aggregation=2 * 4 * KERNEL, scaling=(C_IN + C_OUT) * HW * HW)


def test_odconv_pointwise_single_kernel_has_no_aggregation():
    a = 16
    got = breakdown(ODConv2d(C_IN, C_OUT, 1, kernel_num=1, bias=False))
    pointwise = C_OUT * C_IN * HW * HW
    assert got == expect(dynamic_conv=pointwise, attention=C_IN * a + a * (C_IN + C_OUT), scaling=(C_IN + C_OUT) * HW * HW)


def test_kernelwarehouse():
    layer = KWConv2d(C_IN, C_OUT, K, padding=1, bias=False)  # one 32x16 cell per tap: m = n = 9
    m = n = K * K
    got = breakdown(layer)
    assert got == expect(attention=C_IN * 16 + 16 * (n + 1) * m, aggregation=m * n * C_OUT * C_IN)


def test_dcd():
    latent, squeeze = 4, 4  # L = int(sqrt(16)), S = max(16, 16) // 16 -> at least 4
    layer = DCDConv2d(C_IN, C_OUT, K, padding=1, bias=False)
    assert (layer.latent_dim, layer.fc_phi.in_features) == (latent, squeeze)
    pixels = HW * HW
    got = breakdown(layer)
    assert got == expect(
        dynamic_conv=CONV + latent * C_IN * pixels + C_OUT * latent * pixels,  # W0, Q, P
        attention=C_IN * squeeze + squeeze * squeeze + squeeze * latent**2 + squeeze * C_OUT,
        aggregation=latent * latent * pixels,  # Phi(x) @ z
        scaling=C_OUT * pixels,  # Lambda(x) * conv_W0(x)
    )


def test_dgc_counts_the_kept_fraction_and_the_saliency_generators():
    """The DGC paper's count: each head's conv at the kept share of its input channels, plus the
    four saliency generators (fc1 C_in -> C_in / 8 and fc2 back, 8 = 16 halved below 80 channels)."""
    layer = DGCConv2d(C_IN, C_OUT, K, padding=1)
    kept = C_IN - round(C_IN * 0.55)
    saliency = 4 * 2 * C_IN * (C_IN // 8)
    assert breakdown(layer) == expect(dynamic_conv=CONV * kept // C_IN, attention=saliency)
    dynconv.set_progress(layer, 0.0)  # warm-up: nothing pruned yet
    assert breakdown(layer) == expect(attention=saliency)


def test_dgc_resnet18_is_static_resnet18_at_the_kept_fraction_plus_saliency():
    model = dynconv.create_model("resnet18", "dgc")
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, m=m: shapes.__setitem__(m, out.shape[2:]))
             for m in model.modules() if isinstance(m, DGCConv2d)]
    got = dynconv.count_macs(model)
    for h in hooks:
        h.remove()
    expected = dynconv.count_macs(dynconv.create_model("resnet18"))
    for layer, (h, w) in shapes.items():
        dense = layer.out_channels * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] * h * w
        kept = layer.in_channels - layer.inactive_channels
        hidden = layer.headconv_0.fc1.out_features
        expected += dense * kept // layer.in_channels - dense + 4 * 2 * layer.in_channels * hidden
    assert len(shapes) == 19 and got == expected
    assert 0.48 < got / dynconv.count_macs(dynconv.create_model("resnet18")) < 0.52  # about 45% of the convs


@pytest.mark.parametrize("impl", ["loop", "union", "auto"])
def test_icconv_counts_the_dense_conv_whatever_the_zero_taps_of_its_packed_kernels(impl):
    pattern = {(1, 1): 8, (2, 1): 8, (1, 3): 8, (3, 2): 8}
    layer = InceptionConv2d(C_IN, C_OUT, K, padding=1, pattern=pattern, impl=impl)
    assert breakdown(layer) == expect()


def test_ic_resnet50_costs_what_resnet50_costs():
    """IC-Conv changes where the taps land, not how many there are (the paper's 4.1 GMACs)."""
    assert dynconv.count_macs(dynconv.create_model("resnet50", "icconv")) == \
        dynconv.count_macs(dynconv.create_model("resnet50"))


def test_counts_scale_with_the_batch():
    layer = ODConv2d(C_IN, C_OUT, K, padding=1, kernel_num=4)
    one, two = breakdown(layer, 1), breakdown(layer, 2)
    assert {k: 2 * v for k, v in one.items()} == two
    assert dynconv.count_macs(nn.Sequential(layer), (2, C_IN, HW, HW)) == two["total"]


# OSVAI/ODConv README.md MAdds column, 224x224.
README_MACS = [
    ("resnet18", "static", 1.814e9),
    ("resnet18", "odconv_1x", 1.838e9),
    ("resnet18", "odconv_4x", 1.916e9),
    ("mobilenetv2_100", "static", 300.8e6),
    ("mobilenetv2_100", "odconv_1x", 311.8e6),
    ("mobilenetv2_100", "odconv_4x", 327.1e6),
]


@pytest.mark.parametrize("arch,conv,madds", README_MACS)
def test_within_two_percent_of_odconv_readme(arch, conv, madds):
    got = dynconv.count_macs(dynconv.create_model(arch, conv))
    assert abs(got - madds) / madds < 0.02, f"{got / 1e9:.4f}G vs README {madds / 1e9:.4f}G"


def resnet_v1(arch: str) -> nn.Module:
    """timm's ResNet with the stride of each stage on the first 1x1 conv (ResNet v1), not the 3x3."""
    model = timm.create_model(arch)
    for stage in (model.layer2, model.layer3, model.layer4):
        block = stage[0]
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return model


def test_readme_resnet50_madds_are_those_of_resnet_v1():
    """The README's ResNet-50 3.858G (and ResNet-101 7.570G) are ResNet v1 counts: the official model
    (and ours) put the stride on the 3x3 conv (v1.5, 4.089G). On the v1 layout our count is the
    README's to 0.01%, and ODConv (4x) lands within 2% of its README figure."""
    v15 = dynconv.count_macs(dynconv.create_model("resnet50"))
    assert abs(v15 - 4.089e9) / 4.089e9 < 1e-3
    v1 = resnet_v1("resnet50")
    assert abs(dynconv.count_macs(v1) - 3.858e9) / 3.858e9 < 1e-4
    dynconv.convert(v1, "odconv_4x")
    assert abs(dynconv.count_macs(v1) - 4.080e9) / 4.080e9 < 0.02


def test_breakdown_adds_up_and_count_macs_leaves_the_model_as_it_was():
    model = dynconv.create_model("resnet18", "kw_1x").train()
    parts = dynconv.macs_breakdown(model)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert parts["static"] > 0 and parts["aggregation"] > 0 and model.training
    assert dynconv.count_macs(model) == parts["total"]

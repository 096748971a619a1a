"""``dynconv.convert``: the per-backbone replacement rules, foreign models, idempotence, errors."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import dynconv
from dynconv.ops import CondConv2d, DynamicConv2d, ODConv2d
from dynconv.ops.kernelwarehouse import KWConv2d


def hand_made_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def conv_names(model: nn.Module, kind: type) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


def test_odconv_resnet_rule_keeps_stem_downsample_and_fc_static():
    model = dynconv.create_model("resnet18", "odconv_4x")
    dynamic = conv_names(model, ODConv2d)
    assert len(dynamic) == 16 and all(n.startswith("layer") and n.endswith(("conv1", "conv2")) for n in dynamic)
    assert type(model.conv1) is nn.Conv2d and type(model.layer2[0].downsample[0]) is nn.Conv2d
    assert type(model.fc) is nn.Linear


def test_odconv_mobilenetv2_rule_every_block_conv_and_head():
    model = dynconv.create_model("mobilenetv2_100", "odconv_1x")
    assert type(model.conv_stem) is nn.Conv2d and type(model.classifier) is nn.Linear
    assert isinstance(model.conv_head, ODConv2d)
    # 17 blocks: the first has dw + pw, the other 16 pw + dw + pwl.
    assert len(conv_names(model, ODConv2d)) == 2 + 16 * 3 + 1


def test_dyconv_rule_every_conv_but_the_stem_downsample_included():
    model = dynconv.create_model("resnet18", "dyconv_4x")
    assert type(model.conv1) is nn.Conv2d
    assert isinstance(model.layer2[0].downsample[0], DynamicConv2d)
    assert len(conv_names(model, DynamicConv2d)) == 16 + 3


def test_condconv_resnet_rule_as_documented():
    model = dynconv.create_model("resnet18", "condconv_8x")
    dynamic = set(conv_names(model, CondConv2d))
    assert "layer4.0.conv1" not in dynamic and len(dynamic) == 15
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_condconv_bottleneck_resnets_add_the_odconv_coco_tables_90m(arch):
    """ODConv paper, COCO Faster R-CNN table (reprinted in Linwei-Chen/FDConv README): CondConv (8x) on ResNet50
    adds +90.0M over the static detector, i.e. over the static backbone: the block convs of layer4 only."""
    with torch.device("meta"):
        model = dynconv.create_model(arch, "condconv_8x")
        static = dynconv.create_model(arch)
    extra = (dynconv.count_params(model) - dynconv.count_params(static)) / 1e6
    assert round(extra, 1) == 90.0
    dynamic = set(conv_names(model, CondConv2d))
    assert dynamic == {f"layer4.{b}.conv{i}" for b in range(3) for i in (1, 2, 3)}


def test_convert_torchvision_resnet_matches_timm_resnet():
    tv = torchvision.models.resnet18(num_classes=1000)
    report = dynconv.convert(tv, "odconv_4x")
    assert report.backbone == "resnet" and len(report) == 16
    assert "conv1" in report.kept and "layer2.0.downsample.0" in report.kept
    assert report.params_after == dynconv.count_params(tv)
    assert report.params_after == dynconv.count_params(dynconv.create_model("resnet18", "odconv_4x"))
    tv.eval()
    assert tv(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("conv", ["se", "cbam", "eca"])
def test_residual_attention_on_torchvision_resnet(conv):
    tv = torchvision.models.resnet18(num_classes=10)
    before = dynconv.count_params(tv)
    report = dynconv.convert(tv, conv)
    assert len(report) == 8 and report.replaced[0][0] == "layer1.0.bn2.1"
    assert dynconv.count_params(tv) > before or conv == "eca"
    assert tv.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_torchvision_mobilenet_gets_the_generic_rule():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    report = dynconv.convert(model, "odconv_1x")
    assert report.backbone == "generic"
    assert [n for n, _ in report.replaced] == convs[1:] and report.kept == convs[:1]
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("conv,layer", [("odconv_4x", ODConv2d), ("dyconv_4x", DynamicConv2d),
                                        ("condconv_8x", CondConv2d), ("kw_1x", KWConv2d)])
def test_hand_made_sequential_every_conv_but_the_first(conv, layer):
    model = hand_made_cnn()
    report = dynconv.convert(model, conv)
    assert [n for n, _ in report.replaced] == ["3", "6", "8"] and report.kept == ["0"]
    assert type(model[0]) is nn.Conv2d and all(isinstance(model[i], layer) for i in (3, 6, 8))
    assert model.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert "replaced 3 layers" in str(report)


@pytest.mark.parametrize("conv", ["odconv_4x", "kw_1x", "se"])
def test_second_convert_is_a_no_op(conv):
    model = dynconv.create_model("resnet18", conv)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = dynconv.convert(model, conv)
    assert len(report) == 0 and report.params_after == report.params_before
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_convert_to_another_variant_or_back_to_static_raises():
    model = dynconv.create_model("resnet18", "odconv_4x")
    with pytest.raises(ValueError, match="already converted to 'odconv_4x'"):
        dynconv.convert(model, "dyconv_4x")
    with pytest.raises(ValueError, match="cannot undo"):
        dynconv.convert(model, "static")


def test_nothing_matched_raises():
    stem_only = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match="matched no layer"):
        dynconv.convert(stem_only, "odconv_4x")
    with pytest.raises(ValueError, match="needs to know where residual branches end"):
        dynconv.convert(hand_made_cnn(), "se")


def test_overrides_reach_the_layers_and_unknown_ones_name_the_option():
    model = hand_made_cnn()
    dynconv.convert(model, "odconv_4x", kernel_num=2, reduction=0.25)
    assert model[3].weight.shape[0] == 2
    with pytest.raises(TypeError, match="kernel_nums"):
        dynconv.convert(hand_made_cnn(), "odconv_4x", kernel_nums=2)
    with pytest.raises(ValueError, match="unknown conv variant"):
        dynconv.convert(hand_made_cnn(), "odconv")


def test_convert_keeps_device_and_dtype():
    model = hand_made_cnn().double()
    dynconv.convert(model, "dyconv_4x")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.eval()(torch.randn(1, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64

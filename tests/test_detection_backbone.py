"""The detection backbone: feature levels, frozen stages, fixed BatchNorm statistics, ImageNet weights."""
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import dynconv
from dynconv.checkpoint import CheckpointError
from dynconv.detection import DynamicBackbone, create_detector, level_channels

# Official FPN in_channels (OSVAI/ODConv and OSVAI/KernelWarehouse detection configs: neck in_channels).
LEVELS = {
    "resnet50": [256, 512, 1024, 2048],
    "resnet18": [64, 128, 256, 512],
    "mobilenetv2_100": [24, 32, 96, 1280],
    "convnext_tiny": [96, 192, 384, 768],
}


@pytest.mark.parametrize("arch", list(LEVELS))
def test_levels_have_the_official_channels_and_strides(arch):
    backbone = DynamicBackbone(arch, "static", frozen_stages=-1).eval()
    features = backbone(torch.randn(1, 3, 128, 96))
    assert backbone.out_channels == LEVELS[arch]
    assert list(features) == ["0", "1", "2", "3"]
    assert [tuple(f.shape[1:]) for f in features.values()] == [
        (c, 128 // s, 96 // s) for c, s in zip(LEVELS[arch], (4, 8, 16, 32))]


@pytest.mark.parametrize("arch,conv", [("resnet18", "odconv_4x"), ("mobilenetv2_100", "odconv_1x"),
                                       ("resnet18", "kw_1x"), ("convnext_tiny", "kw_1x")])
def test_last_level_is_the_classifiers_own_feature_map(arch, conv):
    """Identity: the deepest level is what the classifier pools (forward_features), with the same weights."""
    torch.manual_seed(0)
    full = dynconv.create_model(arch, conv, num_classes=10).eval()
    backbone = DynamicBackbone(arch, conv, frozen_stages=-1, checkpoint={"model": full.state_dict(),
                                                                         "meta": {"arch": arch, "conv": conv,
                                                                                  "num_classes": 10}}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = backbone(x)["3"]
        expected = full.forward_features(x)
        if backbone.out_norms is not None:  # ConvNeXt: the detection backbone's new LayerNorm per level
            expected = backbone.out_norms[3](expected)
    torch.testing.assert_close(last, expected, rtol=1e-5, atol=1e-5)


def test_level_channels_matches_the_backbone():
    assert level_channels("mobilenetv2_100", "kw_1x") == LEVELS["mobilenetv2_100"]


def _bn_stats(module):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in module.modules() if isinstance(m, _BatchNorm)]


def test_frozen_stages_and_norm_eval_survive_training_steps():
    torch.manual_seed(0)
    backbone = DynamicBackbone("resnet18", "odconv_4x", frozen_stages=1, norm_eval=True)
    frozen = [backbone.body.conv1, backbone.body.bn1, backbone.body.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in backbone.body.layer2.parameters())
    backbone.train()
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(not m.training for m in backbone.modules() if isinstance(m, _BatchNorm))  # attention BNs too
    assert backbone.body.layer2[0].conv1.training  # the rest trains
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    stats = _bn_stats(backbone)
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = sum(f.square().mean() for f in backbone(torch.randn(2, 3, 64, 64)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = backbone.state_dict()
    for name in before:
        if name.startswith(("body.conv1.", "body.bn1.", "body.layer1.")):
            assert torch.equal(before[name], after[name]), name
    for stage in ("body.layer2.", "body.layer3."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(stage)), stage
    for (m0, v0), (m1, v1) in zip(stats, _bn_stats(backbone)):  # statistics stay the checkpoint's
        assert torch.equal(m0, m1) and torch.equal(v0, v1)


def test_frozen_trainable_keeps_named_parameters_training_inside_frozen_levels():
    """FDConv's official backbone (Linwei-Chen/FDConv resnet.py ``_freeze_stages`` with ``need_grad_list``):
    inside the frozen levels the whitelisted parameters keep their gradient, the rest and the stem do not,
    and the frozen levels still run in eval mode."""
    backbone = DynamicBackbone("resnet18", "odconv_4x", frozen_stages=1, frozen_trainable=["attention"]).train()
    layer1 = dict(backbone.body.layer1.named_parameters())
    trainable = {n for n, p in layer1.items() if p.requires_grad}
    assert trainable and trainable == {n for n in layer1 if "attention" in n}
    assert not any(p.requires_grad for p in backbone.body.conv1.parameters())
    assert not any(p.requires_grad for p in backbone.body.bn1.parameters())
    assert all(p.requires_grad for p in backbone.body.layer2.parameters())
    assert not any(m.training for m in backbone.body.layer1.modules())
    sum(f.sum() for f in backbone(torch.randn(1, 3, 64, 64)).values()).backward()
    assert all(layer1[n].grad is not None for n in trainable)


def test_a_static_checkpoint_starts_the_dynamic_backbone_through_init_from_static(tmp_path):
    """``checkpoint_is_static`` and ``pretrained=`` give the same backbone: the dynamic layers converted from
    the static file (DY-Conv: every kernel the static one, exact), the classifier dropped."""
    torch.manual_seed(2)
    static = dynconv.create_model("resnet18", "static", num_classes=1000).eval()
    path = tmp_path / "resnet18_static.pth"
    torch.save(static.state_dict(), path)  # a plain timm / torchvision state dict
    by_checkpoint = DynamicBackbone("resnet18", "dyconv_4x", frozen_stages=-1, checkpoint=path,
                                    checkpoint_is_static=True).eval()
    by_option = DynamicBackbone("resnet18", "dyconv_4x", frozen_stages=-1, pretrained=str(path)).eval()
    reference = DynamicBackbone("resnet18", "static", frozen_stages=-1, checkpoint=path,
                                checkpoint_is_static=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        for backbone in (by_checkpoint, by_option):
            for level, feature in backbone(x).items():
                torch.testing.assert_close(feature, expected[level], rtol=1e-4, atol=1e-5)
    assert "mapped" in by_checkpoint.load_report and str(path) in by_checkpoint.load_report
    assert "mapped" in by_option.load_report
    with pytest.raises(CheckpointError, match="does not fit"):
        DynamicBackbone("resnet34", "dyconv_4x", checkpoint=path, checkpoint_is_static=True)


def test_without_norm_eval_batchnorm_trains():
    backbone = DynamicBackbone("resnet18", "static", frozen_stages=0, norm_eval=False).train()
    assert backbone.body.layer1[0].bn1.training and not backbone.body.bn1.training


def test_loads_a_dynconv_classification_checkpoint_and_drops_its_classifier(tmp_path):
    torch.manual_seed(1)
    full = dynconv.create_model("resnet18", "odconv_1x", num_classes=10)
    path = tmp_path / "best.pt"
    torch.save({"meta": {"arch": "resnet18", "conv": "odconv_1x", "num_classes": 10},
                "model": full.state_dict()}, path)
    backbone = DynamicBackbone("resnet18", "odconv_1x", checkpoint=path)
    for name, tensor in backbone.body.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name
    assert str(path) in backbone.load_report and "fc" in backbone.load_report


@pytest.mark.parametrize("arch,conv", [("resnet18", "odconv_4x"), ("mobilenetv2_100", "kw_1x"), ("resnet18", "static")])
def test_loads_an_official_checkpoint(tmp_path, arch, conv):
    """Official layouts (ODConv's {'state_dict': {'module.'...}}, KW's {'model': ...}) through import_official."""
    torch.manual_seed(2)
    full = dynconv.create_model(arch, conv)
    path = tmp_path / "official.pth"
    torch.save(dynconv.export_official(full), path)
    backbone = DynamicBackbone(arch, conv, checkpoint=path)
    mine = full.state_dict()
    for name, tensor in backbone.body.state_dict().items():
        assert torch.equal(tensor, mine[name]), name
    assert "official" in backbone.load_report.lower() or "import" in backbone.load_report.lower()


def test_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    path = tmp_path / "static.pt"
    torch.save({"meta": {"arch": "resnet18", "conv": "static", "num_classes": 10},
                "model": dynconv.create_model("resnet18", "static", num_classes=10).state_dict()}, path)
    with pytest.raises(CheckpointError, match="conv=odconv_1x|odconv_1x"):
        DynamicBackbone("resnet18", "odconv_1x", checkpoint=path)


def test_detector_fpn_takes_the_backbone_levels():
    model = create_detector("faster_rcnn", "mobilenetv2_100", "odconv_1x", num_classes=5, min_size=96, max_size=128)
    assert model.backbone.body.load_report.startswith("no checkpoint")
    assert model.backbone.out_channels == 256
    assert [block[0].in_channels for block in model.backbone.fpn.inner_blocks] == LEVELS["mobilenetv2_100"]

"""Per-row model and optimizer settings equal the official code's, block by block and parameter by parameter.

The expected values are transcribed from the official files named beside them; the rules they encode are
written here independently of dynconv's implementation (or taken from mmengine's own constructor).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dynconv
from dynconv.engine.builders import build_model
from dynconv.engine.optim import build_optimizer, weight_decay_groups
from test_configs import _row

# OSVAI/KernelWarehouse configs/<arch>/<model>.json "drop_path"; the models give EVERY residual block
# DropPath(drop_path_rate): models/kw_resnet.py (BasicBlock/Bottleneck ``drop_path=drop_path_rate`` in every
# _make_layer call) and the baseline models/resnet.py alike.
KW_RESNET_DROP_PATH = {
    ("kw_resnet18", "static"): 0.0,  # configs/resnet18/resnet18.json
    ("kw_resnet18", "kw_1d4x"): 0.0,  # configs/resnet18/kw1d4x_resnet18.json
    ("kw_resnet18", "kw_1d2x"): 0.0,  # configs/resnet18/kw1d2x_resnet18.json
    ("kw_resnet18", "kw_1x"): 0.1,  # configs/resnet18/kw1x_resnet18.json
    ("kw_resnet18", "kw_2x"): 0.1,  # configs/resnet18/kw2x_resnet18.json
    ("kw_resnet18", "kw_4x"): 0.1,  # configs/resnet18/kw4x_resnet18.json
    ("kw_resnet50", "static"): 0.1,  # configs/resnet50/resnet50.json
    ("kw_resnet50", "kw_1d2x"): 0.1,  # configs/resnet50/kw1d2x_resnet50.json
    ("kw_resnet50", "kw_1x"): 0.1,  # configs/resnet50/kw1x_resnet50.json
    ("kw_resnet50", "kw_4x"): 0.1,  # configs/resnet50/kw4x_resnet50.json
}
RESNET_BLOCKS = {"kw_resnet18": 8, "kw_resnet50": 16}


def _block_drop_rates(model: nn.Module) -> list:
    """The drop probability of every residual block's branch, in block order (0 where none)."""
    return [float(getattr(m.drop_path, "drop_prob", 0.0) or 0.0) for m in model.modules()
            if hasattr(m, "drop_path")]


def _build(cfg) -> nn.Module:
    return build_model(cfg.model, cfg.conv, num_classes=10)


@pytest.mark.parametrize("experiment,conv", sorted(KW_RESNET_DROP_PATH))
def test_kw_resnet_rows_drop_every_block_at_the_official_rate(experiment, conv):
    cfg = _row(experiment, conv)
    rates = _block_drop_rates(_build(cfg))
    assert len(rates) == RESNET_BLOCKS[experiment]
    assert rates == pytest.approx([KW_RESNET_DROP_PATH[experiment, conv]] * len(rates))


@pytest.mark.parametrize("conv,rate", [("static", 0.1), ("kw_1x", 0.3)])  # configs/convnext/*.json
def test_kw_convnext_rows_ramp_drop_path_linearly_as_the_official_model(conv, rate):
    # models/kw_convnext.py: dp_rates = torch.linspace(0, drop_path_rate, sum(depths)), depths (3, 3, 9, 3)
    official = torch.linspace(0, rate, 18).tolist()
    assert _block_drop_rates(_build(_row("kw_convnext", conv))) == pytest.approx(official)


def test_drop_path_mode_is_checked_and_linear_stays_timms_rule():
    with pytest.raises(ValueError, match="drop_path_mode='ramp'; choose one of: linear, uniform"):
        dynconv.create_model("resnet18", drop_path_rate=0.1, drop_path_mode="ramp")
    linear = _block_drop_rates(dynconv.create_model("resnet18", drop_path_rate=0.1))
    assert linear == pytest.approx([0.1 * i / 7 for i in range(8)])  # timm resnet.py: rate * idx / (N - 1)
    assert _block_drop_rates(dynconv.create_model("resnet18", drop_path_mode="uniform")) == [0.0] * 8


def test_a_uniform_block_drops_its_whole_branch_per_sample():
    torch.manual_seed(0)
    model = dynconv.create_model("resnet18", num_classes=4, drop_path_rate=0.5, drop_path_mode="uniform").train()
    block = model.layer2[1]
    x = torch.randn(64, 128, 4, 4)
    branch_off = block.act2(x)  # a dropped branch leaves relu(identity)
    out = block(x)
    dropped = [(o - branch_off[i]).abs().max() == 0 for i, o in enumerate(out)]
    assert 16 < sum(dropped) < 48  # about half the samples, each all or nothing


# ------------------------------------------------------------------------------------------------------
# Weight decay exclusions


def _decayed(groups) -> set:
    return {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}


def test_kw_convnext_kw_1x_decays_the_layer_scale_as_the_official_4d_parameter():
    """OSVAI/KernelWarehouse optim_factory.py: no decay iff ``len(shape) == 1`` or ``.bias``; its KW ConvNeXt
    layer scale is ``[1, dim, 1, 1]`` (models/kw_convnext.py), its baseline's ``(dim,)`` (models/convnext.py)."""
    cfg = _row("kw_convnext", "kw_1x")
    model = _build(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.recipe.optimizer, cfg.recipe.batch_size)
    decayed = {names[i] for i in _decayed(optimizer.param_groups)}
    gammas = {n for n in names.values() if n.endswith(".gamma")}
    assert len(gammas) == 18 and gammas <= decayed
    # everything else follows the official rule: decay exactly the multi-dimensional non-bias tensors
    official = {n for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")}
    assert decayed - gammas == official
    assert optimizer.param_groups[1]["weight_decay"] == 0.05
    static = _row("kw_convnext", "static")
    assert list(static.recipe.optimizer.decay_keys) == []


def _kw_detector_like_model() -> nn.Module:
    """A KW ResNet50 with a head whose names hold 'norm' (attention) and plain biases (classifier)."""
    return dynconv.create_model("resnet50", "kw_1x", num_classes=3)


def test_norm_key_matches_parameter_names_as_mmengines_constructor_does():
    """mmcv's / mmengine's ``paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)})`` (the KernelWarehouse
    COCO configs, detection/configs/kernelwarehouse/resnet50/mask_rcnn_kw1x_resnet50_adamw_1x_coco.py) matches
    keys as substrings of the parameter's full name; mmengine's own constructor is the reference here."""
    from mmengine.optim import DefaultOptimWrapperConstructor

    model = _kw_detector_like_model()
    keys = {"absolute_pos_embed": dict(decay_mult=0.0), "relative_position_bias_table": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0)}
    wrapper = DefaultOptimWrapperConstructor(
        dict(optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.05)), dict(custom_keys=keys))(model)
    reference = {id(p) for g in wrapper.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    ours = _decayed(weight_decay_groups(model, 0.05, decay_1d=True, no_decay_keys=list(keys)))
    assert ours == reference
    names = dict(model.named_parameters())
    assert id(names["bn1.weight"]) in ours and id(names["fc.bias"]) in ours  # BatchNorm and biases decayed
    spared = {n for n, p in names.items() if id(p) not in ours}
    assert spared and all(".attention.norm1." in n for n in spared)


def test_no_keys_keep_timms_grouping():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    groups = weight_decay_groups(model, 1e-4, decay_1d=False)
    assert _decayed(groups) == {id(model[0].weight)}
    assert _decayed(weight_decay_groups(model, 1e-4, decay_1d=True)) == {id(p) for p in model.parameters()}

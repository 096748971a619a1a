"""COCO experiment rows as the official detection configs set them, checked on the built detectors.

Official sources: OSVAI/KernelWarehouse ``detection/configs/kernelwarehouse/**`` and
``detection/mmdet/models/backbones/*.py``; yifan123/IC-Conv ``README.md`` (model zoo) and ``pattern_zoo/``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from timm.layers import DropPath

from dynconv.detection import create_detector
from dynconv.engine.config import apply_row
from dynconv.engine.tasks.detection import build_detector
from dynconv.engine.optim import build_optimizer
from dynconv.ops.icconv import InceptionConv2d
from dynconv.patterns import load_patterns
from dynconv.surgery.icconv import official_task_patterns

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
for _entry in ("train",):  # registers the config schema with Hydra
    _spec = importlib.util.spec_from_file_location(f"dynconv_entry_{_entry}_det", ROOT / f"{_entry}.py")
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))

# the custom_keys of every ResNet50 / MobileNetV2 config in detection/configs/kernelwarehouse/
OFFICIAL_CUSTOM_KEYS = ["absolute_pos_embed", "relative_position_bias_table", "norm"]


def _row(experiment, model, conv, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=/tmp/unused", f"experiment={experiment}", "data.root=/d",
                                          f"model={model}", f"conv={conv}", *overrides])
    cfg = OmegaConf.to_object(cfg)
    apply_row(cfg, protected={o.split("=")[0] for o in overrides})
    return cfg


def _block_drop_paths(model):
    return [m.drop_path for m in model.backbone.body.body.modules() if hasattr(m, "drop_path")]


@pytest.mark.parametrize("conv", ["kw_1x", "kw_4x"])
def test_kw_coco_kw_resnet50_rows_drop_every_block_at_01(conv):
    """detection/mmdet/models/backbones/kw_resnet.py: KW_ResNet(drop_path_rate=0.1) gives each block
    DropPath(drop_path_rate); mask_rcnn_kw{1,4}x_resnet50_adamw_1x_coco.py leave the default."""
    cfg = _row("kw_coco", "resnet50", conv)
    assert (cfg.model.drop_path_rate, cfg.model.drop_path_mode) == (0.1, "uniform")
    if conv == "kw_1x":  # built once: the detector's backbone has it in all 16 bottlenecks
        paths = _block_drop_paths(build_detector(cfg, num_classes=3))
        assert len(paths) == 16 and all(isinstance(p, DropPath) and p.drop_prob == 0.1 for p in paths)


@pytest.mark.parametrize("model,conv", [("resnet50", "static"), ("mobilenetv2_100", "static"),
                                        ("mobilenetv2_100", "kw_1x"), ("mobilenetv2_100", "kw_4x")])
def test_kw_coco_rows_without_drop_path(model, conv):
    """The baseline ResNet (backbones/resnet.py) and the (KW) MobileNetV2 backbones have no drop path."""
    assert _row("kw_coco", model, conv).model.drop_path_rate == 0.0


@pytest.mark.parametrize("conv", ["static", "kw_1x"])
def test_kw_coco_convnext_rows_freeze_nothing_and_keep_the_layer_decay_exclusions(conv):
    """backbones/convnext.py and kw_convnext.py have no frozen stages; LearningRateDecayOptimizerConstructor
    (mmcv_custom/layer_decay_optimizer_constructor.py) decays no 1-D parameter or bias, and the KW
    ConvNeXt's layer scale is [1, C, 1, 1] (kw_convnext.py), hence decayed."""
    cfg = _row("kw_coco", "convnext_tiny", conv)
    assert cfg.detector.frozen_stages == -1
    opt = cfg.recipe.optimizer
    assert opt.decay_1d is False and list(opt.no_decay_keys) == []
    assert list(opt.decay_keys) == ([".gamma"] if conv == "kw_1x" else [])


def _mmcv_weight_decay(name: str, base: float, custom_keys) -> float:
    """mmcv v1.3.x DefaultOptimizerConstructor.add_params with paramwise_cfg=dict(custom_keys=...):
    the first key (longest first) that is a substring of the name sets decay_mult; otherwise
    norm_decay_mult = bias_decay_mult = 1 (their defaults)."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return base * 0.0
    return base


@pytest.mark.parametrize("model", ["mobilenetv2_100"])
def test_kw_coco_weight_decay_follows_mmcv_custom_keys(model):
    """mask_rcnn_kw1x_{resnet50,mobilenetv2_100}_adamw_1x_coco.py: custom_keys {..., 'norm': decay_mult 0}
    spare the KW attention's norm1 only; BatchNorm weights and biases and all biases are decayed."""
    cfg = _row("kw_coco", model, "kw_1x")
    opt_cfg = cfg.recipe.optimizer
    assert opt_cfg.decay_1d is True and list(opt_cfg.no_decay_keys) == OFFICIAL_CUSTOM_KEYS
    detector = build_detector(cfg, num_classes=3)
    optimizer = build_optimizer(detector, opt_cfg, cfg.recipe.batch_size)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = {n: p for n, p in detector.named_parameters() if p.requires_grad}
    assert set(decay_of) == {id(p) for p in names.values()}
    for name, param in names.items():
        assert decay_of[id(param)] == _mmcv_weight_decay(name, 0.05, OFFICIAL_CUSTOM_KEYS), name
    spared = [n for n in names if decay_of[id(names[n])] == 0]
    assert spared and all(".norm1." in n for n in spared)  # the KW attention norms, nothing else
    assert any(n.endswith("bn1.weight") and decay_of[id(names[n])] == 0.05 for n in names)


@pytest.mark.parametrize("detector,task", [("faster_rcnn", "detection"), ("mask_rcnn", "segmentation")])
def test_icconv_detectors_use_the_pattern_files_of_their_task(detector, task):
    """yifan123/IC-Conv README model zoo: Faster R-CNN IC-R50 -> pattern_zoo/detection/ic_resnet50_k9.json,
    Mask R-CNN IC-R50 -> pattern_zoo/segmentation/ic_resnet50_k9.json (13 of the 16 layers differ)."""
    model = create_detector(detector, "resnet50", "icconv", num_classes=3, min_size=64, max_size=96)
    expected = load_patterns(f"{task}_ic_resnet50_k9")
    layers = [m for m in model.backbone.body.body.modules() if isinstance(m, InceptionConv2d)]
    assert len(layers) == 16
    assert [dict(layer.pattern) for layer in layers] == [dict(p) for p in expected]
    other = load_patterns(f"{'segmentation' if task == 'detection' else 'detection'}_ic_resnet50_k9")
    assert sum(dict(a) != dict(b) for a, b in zip(expected, other)) == 13  # so the choice matters


def test_icconv_pattern_choice_rules():
    assert official_task_patterns("resnet101", "segmentation") == "segmentation_ic_resnet101_k9"
    assert official_task_patterns("resnet18", "detection") is None  # no official file: hand-set defaults
    with pytest.raises(ValueError, match="segmentation"):
        official_task_patterns("resnet50", "pose")
    given = create_detector("mask_rcnn", "resnet50", "icconv", num_classes=3, min_size=64, max_size=96,
                            patterns="detection_ic_resnet50_k9")
    assert given.backbone.body.options["patterns"] == "detection_ic_resnet50_k9"  # an explicit choice wins


def test_icconv_coco_rows_build_their_task_patterns():
    for detector, task in (("faster_rcnn", "detection"), ("mask_rcnn", "segmentation")):
        cfg = _row("icconv_coco", "resnet50", "icconv", f"detector={detector}")
        model = build_detector(cfg, num_classes=3)
        assert model.backbone.body.options["patterns"] == f"{task}_ic_resnet50_k9"

"""The mmdet 3.x plugin (``dynconv.integrations.mmdet``) and the configs in ``configs/mmdet/``.

Runs in the project's own environment with ``requirements/mmdet-lite.txt`` (mmcv-lite 2.1.0, mmengine
0.10.7, mmdet 3.3.0 beside torch 2.14), so only mmdet's registry and config layer are exercised, not a
detector: ``mmdet.models`` imports mmcv's compiled ops, which mmcv-lite does not have. With mmcv-lite,
``import mmdet.models`` stops in ``mmdet/models/layers/bbox_nms.py`` -> ``mmcv/ops/__init__.py`` ->
``mmcv/utils/ext_loader.py`` with::

    ModuleNotFoundError: No module named 'mmcv._ext'

``MODELS.get`` imports ``mmdet.models`` (the registry's import location) before it looks anything up,
so when the ops are missing the ``mm`` fixture puts an empty stand-in for ``mmdet.models`` into
``sys.modules`` for this module's tests; with a full mmcv the real one is used.

setuptools >= 81 (the project pins 84) no longer ships ``pkg_resources``, which mmengine 0.10.7 uses to
find the installed mmdet for ``_base_ = 'mmdet::...'``; the fixture then swaps in an importlib-based
lookup of the same package directory. (A real mmdet environment pins ``setuptools<81``.)

Skipped, with the reason printed, where mmengine or mmdet is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

REASON = ("mmdet plugin tests need mmengine and mmdet: "
          ".venv/bin/python -m pip install --no-deps -r requirements/mmdet-lite.txt")
pytest.importorskip("mmengine", reason=REASON)
pytest.importorskip("mmdet", reason=REASON)

import dynconv  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.model import BaseModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "mmdet"
CONFIGS = sorted(CONFIG_DIR.glob("*.py"))


def _installed_path(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(package)
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="module")
def mm():
    """``(MODELS, DynconvBackbone)`` with the plugin imported; see the module docstring for the stand-ins."""
    patch = pytest.MonkeyPatch()
    if importlib.util.find_spec("pkg_resources") is None:
        import mmengine.config.config as config_module

        patch.setattr(config_module, "is_installed", lambda p: importlib.util.find_spec(p) is not None)
        patch.setattr(config_module, "get_installed_path", _installed_path)
    if importlib.util.find_spec("mmcv._ext") is None:
        patch.setitem(sys.modules, "mmdet.models", types.ModuleType("mmdet.models"))
    from mmdet.registry import MODELS

    from dynconv.integrations.mmdet import DynconvBackbone

    yield MODELS, DynconvBackbone
    patch.undo()


def _build(mm, **kwargs):
    models, _ = mm
    return models.build(dict(type="DynconvBackbone", **kwargs))


def test_registered_under_its_name(mm):
    models, cls = mm
    assert models.get("DynconvBackbone") is cls
    assert issubclass(cls, BaseModule)


def test_forward_returns_a_tuple_of_the_selected_levels(mm):
    backbone = _build(mm, arch="resnet18", conv="odconv_1x").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        levels = backbone(x)
    assert isinstance(levels, tuple) and len(levels) == 4
    assert backbone.out_channels == [64, 128, 256, 512]
    for level, stride, channels in zip(levels, (4, 8, 16, 32), backbone.out_channels):
        assert level.shape == (1, channels, 64 // stride, 64 // stride)

    three = _build(mm, arch="resnet18", conv="odconv_1x", out_indices=(1, 2, 3)).eval()
    with torch.no_grad():
        levels = three(x)
    assert len(levels) == 3 and three.out_channels == [128, 256, 512]
    assert [f.shape[1] for f in levels] == three.out_channels and levels[0].shape[-1] == 64 // 8

    with pytest.raises(ValueError, match="out_indices"):
        _build(mm, arch="resnet18", out_indices=(0, 4))


def test_frozen_stages_and_norm_eval_survive_train(mm):
    backbone = _build(mm, arch="resnet18", conv="odconv_1x", frozen_stages=1, norm_eval=True).train()
    body = backbone.dynconv.body
    for frozen in (body.conv1, body.bn1, body.layer1):
        assert not any(p.requires_grad for p in frozen.parameters())
        assert not any(m.training for m in frozen.modules())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert body.layer2[0].conv1.training  # an unfrozen dynamic conv trains
    norms = [m for m in backbone.modules() if isinstance(m, _BatchNorm)]
    assert any(".attention." in n for n, m in backbone.named_modules() if isinstance(m, _BatchNorm))
    assert norms and not any(m.training for m in norms)  # attention-branch BatchNorms included

    free = _build(mm, arch="resnet18", conv="odconv_1x", frozen_stages=1, norm_eval=False).train()
    assert free.dynconv.body.layer2[0].bn1.training and not free.dynconv.body.layer1[0].bn1.training


def test_schedule_progress_sets_the_layers(mm):
    from dynconv.ops._routing import schedule_state_keys
    from dynconv.schedules import scheduled_modules

    start = _build(mm, arch="resnet18", conv="odconv_1x", schedule_progress=0.0)
    end = _build(mm, arch="resnet18", conv="odconv_1x")
    x = torch.randn(1, 3, 32, 32)
    assert scheduled_modules(start.dynconv.body)
    with torch.no_grad():
        # the same weights; the schedule state (part of the state dict) stays each model's own
        keep = schedule_state_keys(end)
        assert keep
        end.load_state_dict({k: v for k, v in start.state_dict().items() if k not in keep})
        start.eval(), end.eval()
        assert not torch.allclose(start(x)[0], end(x)[0])  # temperature 30 at epoch 0, 1 at the end
        start.set_progress(1000.0)
        assert torch.allclose(start(x)[0], end(x)[0])


def test_schedule_progress_survives_the_checkpoint(mm, checkpoint):
    """A dynconv checkpoint carries the schedule state its run ended with; the configured progress wins."""
    from dynconv.schedules import set_progress

    path, _ = checkpoint
    x = torch.randn(1, 3, 32, 32)
    start = _build(mm, arch="resnet18", conv="odconv_1x", schedule_progress=0.0,
                   init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    start.init_weights()
    reference = _build(mm, arch="resnet18", conv="odconv_1x", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    reference.init_weights()
    set_progress(reference.dynconv.body, 0.0)
    with torch.no_grad():
        start.eval(), reference.eval()
        assert torch.equal(start(x)[0], reference(x)[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A dynconv training checkpoint of an ODConv 1x ResNet18 ImageNet classifier (random weights)."""
    model = dynconv.create_model("resnet18", "odconv_1x")
    path = tmp_path_factory.mktemp("ckpt") / "odconv1x_resnet18.pt"
    torch.save({"model": model.state_dict(),
                "meta": {"arch": "resnet18", "conv": "odconv_1x", "num_classes": 1000}}, path)
    return path, model.state_dict()


def _assert_loaded(backbone, state):
    mine = backbone.dynconv.body.state_dict()
    assert len(mine) > 100 and all(torch.equal(v, state[k]) for k, v in mine.items())


def test_init_weights_loads_the_pretrained_checkpoint(mm, checkpoint):
    path, state = checkpoint
    backbone = _build(mm, arch="resnet18", conv="odconv_1x",
                      init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    key = "layer1.0.conv1.weight"
    assert not torch.equal(backbone.dynconv.body.state_dict()[key], state[key])  # building loads nothing
    backbone.init_weights()
    assert backbone.is_init
    _assert_loaded(backbone, state)


def test_init_weights_on_a_torch_without_safe_globals(mm, checkpoint, monkeypatch):
    """mmdet's environment has torch 2.1, whose torch.serialization has no ``safe_globals`` (2.5+)."""
    path, state = checkpoint
    monkeypatch.delattr(torch.serialization, "safe_globals", raising=False)
    backbone = _build(mm, arch="resnet18", conv="odconv_1x", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    _assert_loaded(backbone, state)
    missing = _build(mm, arch="resnet18", init_cfg=dict(type="Pretrained", checkpoint=str(path) + ".missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        missing.init_weights()


def test_pretrained_shortcut_inside_a_detector_init(mm, checkpoint):
    """As mmdet calls it: the detector's ``init_weights`` reaches the backbone's."""
    path, state = checkpoint
    models, _ = mm

    class Detector(BaseModule):
        def __init__(self):
            super().__init__()
            self.backbone = models.build(dict(type="DynconvBackbone", arch="resnet18", conv="odconv_1x",
                                              pretrained=str(path)))
            self.neck = torch.nn.Conv2d(512, 8, 1)

    detector = Detector()
    assert detector.backbone.init_cfg == dict(type="Pretrained", checkpoint=str(path))
    detector.init_weights()
    _assert_loaded(detector.backbone, state)

    with pytest.raises(ValueError, match="not both"):
        _build(mm, arch="resnet18", pretrained=str(path), init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    wrong = _build(mm, arch="resnet18", init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone."))
    with pytest.raises(ValueError, match="prefix"):
        wrong.init_weights()


_BUILT: dict = {}


def _built_backbone(mm, cfg_backbone):
    """Build a config's backbone without its checkpoint, once per distinct backbone setting."""
    spec = {k: v for k, v in cfg_backbone.to_dict().items() if k not in ("type", "init_cfg")}
    key = repr(sorted(spec.items()))
    if key not in _BUILT:
        _BUILT[key] = _build(mm, **spec)
    return _BUILT[key]


def test_the_paper_config_set_is_complete():
    names = {p.stem for p in CONFIGS}
    od = {f"{det}_{bb}_fpn_1x_coco" for det in ("faster_rcnn", "mask_rcnn")
          for bb in ("r50", "odconv4x_r50", "mobilenetv2_100", "odconv4x_mobilenetv2_100")}
    kw = {f"mask_rcnn_{bb}_adamw_1x_coco" for bb in (
        "resnet50", "kw1x_resnet50", "kw4x_resnet50", "mobilenetv2_100", "kw1x_mobilenetv2_100",
        "kw4x_mobilenetv2_100", "convnext_tiny", "kw1x_convnext_tiny")}
    fd = {"faster_rcnn_fdconv_r50_fpn_1x_coco", "mask_rcnn_fdconv_r50_adamw_1x_coco"}  # Linwei-Chen/FDConv configs
    assert names == od | kw | fd


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_its_backbone_builds(mm, path):
    cfg = Config.fromfile(str(path))  # resolves mmdet:: bases and imports custom_imports
    assert "dynconv.integrations.mmdet" in cfg.custom_imports.imports
    assert cfg.custom_imports.allow_failed_imports is False
    assert cfg.find_unused_parameters is True
    backbone_cfg = cfg.model.backbone
    assert backbone_cfg.type == "DynconvBackbone"
    assert backbone_cfg.init_cfg.type == "Pretrained"
    assert backbone_cfg.init_cfg.checkpoint.startswith("checkpoints/")  # the placeholder users replace

    # the file name says the detector, arch and conv
    name = path.stem
    assert cfg.model.type == ("MaskRCNN" if name.startswith("mask_rcnn") else "FasterRCNN")
    assert backbone_cfg.arch == next((a for a in ("mobilenetv2_100", "convnext_tiny") if a in name), "resnet50")
    conv = next((c for c in ("odconv_4x", "kw_1x", "kw_4x", "fdconv") if c.replace("_", "") in name), "static")
    assert backbone_cfg.conv == conv

    backbone = _built_backbone(mm, backbone_cfg)
    assert list(cfg.model.neck.in_channels) == backbone.out_channels

    optimizer = cfg.optim_wrapper.optimizer
    milestones = next(s for s in cfg.param_scheduler if s.type == "MultiStepLR").milestones
    assert cfg.train_cfg.max_epochs == 12
    if name.endswith("_adamw_1x_coco"):  # KernelWarehouse recipe
        assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ("AdamW", 1e-4, 0.05)
        assert tuple(optimizer.betas) == (0.9, 0.999) and "momentum" not in optimizer
        paramwise = cfg.optim_wrapper.paramwise_cfg
        if "convnext" in name:  # mmcv_custom LearningRateDecayOptimizerConstructor: no decay for 1-D and biases
            assert (paramwise.norm_decay_mult, paramwise.bias_decay_mult) == (0.0, 0.0)
            # KW ConvNeXt's layer scale is [1, C, 1, 1] in detection/mmdet/models/backbones/kw_convnext.py
            assert paramwise.custom_keys == {".gamma": dict(decay_mult=1.0 if "kw1x" in name else 0.0)}
        else:  # detection/configs/kernelwarehouse/{resnet50,mobilenetv2}/*.py, verbatim
            assert paramwise == dict(custom_keys={"absolute_pos_embed": dict(decay_mult=0.0),
                                                  "relative_position_bias_table": dict(decay_mult=0.0),
                                                  "norm": dict(decay_mult=0.0)})
        # FDConv: Linwei-Chen/FDConv FDConv_detection/configs/mask_rcnn/mask_rcnn_r50_fpn_1x_coco_adamw_FDConv.py
        # lr_config step=[10, 11]
        assert milestones == ([10, 11] if "fdconv" in name else [9, 11] if "convnext" in name else [8, 11])
        assert [t.type for t in cfg.train_dataloader.dataset.pipeline][2:4] == ["RandomFlip", "RandomChoice"]
        if "convnext" in name:
            assert backbone_cfg.conv_options.drop_path_rate == 0.4
        elif "kw" in name and "resnet50" in name:  # KW_ResNet default drop_path_rate=0.1 in every block
            assert backbone_cfg.conv_options == dict(drop_path_rate=0.1, drop_path_mode="uniform")
            paths = [m.drop_path for m in backbone.modules() if hasattr(m, "drop_path")]
            assert len(paths) == 16 and all(getattr(p, "drop_prob", None) == 0.1 for p in paths)
        else:  # the baseline ResNet and the MobileNetV2 backbones have no drop path
            assert "conv_options" not in backbone_cfg
    else:  # ODConv recipe: mmdet's SGD 1x
        assert (optimizer.type, optimizer.lr, optimizer.momentum, optimizer.weight_decay) == ("SGD", 0.02, 0.9, 1e-4)
        assert milestones == [8, 11]
    if "convnext" not in name:
        assert (backbone_cfg.frozen_stages, backbone_cfg.norm_eval) == (1, True)


def test_import_dynconv_leaves_mmdet_unimported():
    code = ("import sys, dynconv, dynconv.detection, dynconv.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmcv', 'mmengine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout


def test_kw_custom_keys_decay_batchnorm_and_biases_under_mmengine(mm):
    """The ResNet50 / MobileNetV2 KW configs' custom_keys, applied by mmengine's optimizer constructor (the
    same substring rule as mmcv v1.3 DefaultOptimizerConstructor.add_params): only the KW attention's
    norm1 is spared; BatchNorm parameters and biases are decayed, as in the official runs."""
    from mmengine.optim import DefaultOptimWrapperConstructor

    cfg = Config.fromfile(str(CONFIG_DIR / "mask_rcnn_kw1x_mobilenetv2_100_adamw_1x_coco.py"))
    backbone = _built_backbone(mm, cfg.model.backbone)
    constructor = DefaultOptimWrapperConstructor(cfg.optim_wrapper.to_dict(), cfg.optim_wrapper.paramwise_cfg.to_dict())
    groups: list = []  # the parameter groups the constructor would hand to AdamW
    constructor.add_params(groups, torch.nn.ModuleDict({"backbone": backbone}))
    decay = {id(p): g.get("weight_decay", 0.05) for g in groups for p in g["params"]}
    named = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    spared = sorted(n for n, p in named.items() if decay[id(p)] == 0)
    assert spared and all(".norm1." in n for n in spared)
    decayed = [n for n in named if ".bn" in n or (n.endswith(".bias") and ".norm1." not in n)]
    assert decayed and all(decay[id(named[n])] == 0.05 for n in decayed)

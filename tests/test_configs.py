"""Every config option composes into the schema; the recipes hold the official settings (the official
training commands and configs named beside each value)."""
from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import dynconv
from dynconv.engine.config import EvalConfig, TrainConfig, apply_row, validate
from dynconv.engine.optim import apply_schedule, build_optimizer, build_scheduler, current_lr

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _load_entry_point(name: str) -> None:
    """Import ``train.py`` / ``eval.py`` as modules: that registers their schemas with Hydra."""
    spec = importlib.util.spec_from_file_location(f"dynconv_entry_{name}", ROOT / f"{name}.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


_load_entry_point("train")
_load_entry_point("eval")


def options(group: str):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def load(overrides=(), config="train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        unset = "run_dir" if config == "train" else "output"
        cfg = compose(config, overrides=[f"{unset}=/tmp/unused"] + list(overrides))
    cfg = OmegaConf.to_object(cfg)
    assert isinstance(cfg, TrainConfig if config == "train" else EvalConfig)
    return cfg


def test_groups_cover_every_arch_and_conv():
    assert options("model") == sorted(dynconv.list_archs())
    assert options("conv") == sorted(dynconv.list_convs())
    assert options("recipe") == ["classic_100ep", "convnext_300ep", "demo", "det_1x_adamw", "det_1x_sgd",
                                 "det_demo", "finetune_static", "mobilenetv2_150ep"]
    assert options("data") == ["coco", "imagenet", "synthetic", "synthetic_coco"]
    assert options("logger") == ["none", "wandb"] and options("task") == ["classification", "detection"]
    assert options("detector") == ["faster_rcnn", "mask_rcnn"]


DETECTION_DATA = ("coco", "synthetic_coco")


@pytest.mark.parametrize("group", ["model", "conv", "recipe", "data", "logger", "experiment", "task", "detector"])
def test_every_option_composes_and_validates(group):
    for name in options(group):
        overrides = [f"{group}={name}"]
        if group in ("data", "experiment"):
            overrides.append("data.root=/data/x")
        if (group == "data" and name in DETECTION_DATA) or group == "detector":
            overrides.append("task=detection")
        cfg = load(overrides)
        validate(cfg)
        if group in ("model", "conv", "detector"):
            assert getattr(cfg, group).name == name
        if group == "task":
            assert cfg.task == name
        if group == "experiment":
            # the paper tables read the real datasets; the demos generate theirs
            expected = {"detection": "coco", "classification": "imagenet"}[cfg.task]
            if name.endswith("_demo"):
                expected = "synthetic_coco" if cfg.task == "detection" else "synthetic"
            assert cfg.name == name and cfg.data.name == expected
            apply_row(cfg)


def test_detection_task_switches_recipe_and_data_and_the_command_line_wins():
    cfg = load(["task=detection"])
    assert (cfg.task, cfg.recipe.name, cfg.data.name, cfg.detector.name) == \
        ("detection", "det_1x_sgd", "synthetic_coco", "faster_rcnn")
    cfg = load(["task=detection", "detector=mask_rcnn", "model=resnet50", "conv=odconv_4x", "data=coco",
                "data.root=/data/coco"])  # the command of the issue
    validate(cfg)
    assert (cfg.recipe.name, cfg.data.name, cfg.detector.name, cfg.data.root) == \
        ("det_1x_sgd", "coco", "mask_rcnn", "/data/coco")
    assert load(["task=detection", "recipe=det_1x_adamw"]).recipe.name == "det_1x_adamw"
    with pytest.raises(ValueError, match=r"data.name='imagenet' is not valid; choose one of: coco, synthetic_coco"):
        validate(load(["task=detection", "data=imagenet", "data.root=/d"]))
    with pytest.raises(ValueError, match=r"data.name='coco' is not valid; choose one of: synthetic, imagenet"):
        validate(load(["data=coco", "data.root=/d"]))
    ev = load(["task=detection", "detector=mask_rcnn", "data=coco", "data.root=/d"], config="eval")
    assert (ev.task, ev.detector.name, ev.data.name) == ("detection", "mask_rcnn", "coco")


def test_default_is_the_cpu_demo():
    cfg = load()
    validate(cfg)
    assert (cfg.model.name, cfg.conv.name, cfg.recipe.name, cfg.data.name, cfg.logger.name) == \
        ("mobilenetv2_100", "odconv_1x", "demo", "synthetic", "none")
    ev = load(config="eval")
    assert (ev.model.name, ev.conv.name, ev.data.name) == ("mobilenetv2_100", "odconv_1x", "synthetic")


def test_cross_key_checks_name_the_key():
    cfg = load(["recipe.scheduler.name=linear"])
    with pytest.raises(ValueError, match=r"recipe.scheduler.name='linear' is not valid; choose one of: step"):
        validate(cfg)
    cfg = load(["trainer.amp=fp32"])
    with pytest.raises(ValueError, match=r"trainer.amp='fp32'.*none, bf16, fp16"):
        validate(cfg)


def _row(experiment, conv, model=None, overrides=()):
    """The config of one row of an experiment's sweep, with its per-row settings applied."""
    cfg = load([f"experiment={experiment}", "data.root=/d", f"conv={conv}", *([f"model={model}"] if model else []),
                *overrides])
    apply_row(cfg, protected={o.split("=")[0] for o in overrides})
    return cfg


def test_experiment_rows_follow_the_official_configs():
    assert _row("kw_resnet18", "kw_4x").model.drop_path_rate == 0.1
    tiny = _row("kw_resnet18", "kw_1d4x")
    assert tiny.model.drop_path_rate == 0 and tiny.recipe.aug.mixup == tiny.recipe.aug.cutmix == 0
    assert _row("kw_resnet18", "kw_1d2x").recipe.aug.mixup == 0.8  # only 1/4x turns mixup off
    assert _row("kw_resnet18", "static").model.drop_path_rate == 0
    convnext = _row("kw_convnext", "kw_1x")
    assert convnext.recipe.ema.enabled and convnext.model.drop_path_rate == 0.3
    assert _row("kw_convnext", "static").model.drop_path_rate == 0.1
    mbv2 = _row("kw_mobilenetv2", "kw_4x", "mobilenetv2_050")
    assert mbv2.recipe.aug.smoothing == 0.1 and mbv2.recipe.optimizer.name == "sgd"
    assert _row("kw_mobilenetv2", "kw_1d2x").recipe.aug.smoothing == 0
    assert _row("odconv_resnet18", "odconv_4x").model.drop_rate == 0.2
    assert _row("odconv_resnet18", "se").model.drop_rate == 0
    assert _row("dgc_resnet18", "dgc").conv.options == {"total_epochs": 120}
    # the command line wins over a row's setting
    assert _row("kw_resnet18", "kw_1d4x", overrides=["model.drop_path_rate=0.05"]).model.drop_path_rate == 0.05


def test_row_names_and_keys_are_checked():
    cfg = load(["experiment=kw_resnet18", "data.root=/d"])
    cfg.rows["kw_3x"] = {}
    with pytest.raises(ValueError, match=r"rows.kw_3x: not a conv variant"):
        apply_row(cfg)
    cfg = load(["experiment=kw_resnet18", "data.root=/d", "conv=kw_1d2x"])
    cfg.rows["kw_1d2x"] = {"model.drop_pth_rate": 0.0}
    with pytest.raises(ValueError, match=r"'model.drop_pth_rate' is not a config key"):
        apply_row(cfg)


def _paper_rows(task="classification"):
    with open(ROOT / "results" / "paper.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["task"] == task]


def test_each_paper_table_has_an_experiment_whose_sweep_covers_its_rows():
    tables = {}
    for row in _paper_rows():
        tables.setdefault(row["table"], set()).add((row["arch"], row["conv"]))
    for table, pairs in tables.items():
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={table}", "data.root=/d", "run_dir=/x"],
                          return_hydra_config=True)
        params = dict(cfg.hydra.sweeper.params or {})
        archs = params.get("model", cfg.model.name).split(",")
        convs = params.get("conv", cfg.conv.name).split(",")
        swept = {(a, c) for a in archs for c in convs}
        assert pairs <= swept, (table, sorted(pairs - swept))
        assert len(swept) <= len(pairs) + 1, (table, sorted(swept - pairs))  # no expensive extras


def _commands_in_comments(table):
    """The extra sweeps an experiment file names in its comments (``python train.py -m experiment=...``)."""
    lines = (CONFIGS / "experiment" / f"{table}.yaml").read_text().splitlines()
    for line in lines:
        if line.startswith("#") and f"experiment={table}" in line:
            yield dict(arg.split("=", 1) for arg in line.split(f"experiment={table}")[1].split())


def test_each_coco_table_is_covered_by_its_sweep_and_the_commands_it_names():
    tables = {}
    for row in _paper_rows("detection"):
        tables.setdefault(row["table"], set()).add((row["detector"], row["arch"], row["conv"]))
    for table, rows in tables.items():
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={table}", "data.root=/d", "run_dir=/x"],
                          return_hydra_config=True)
        assert cfg.task == "detection" and cfg.recipe.name == next(
            r["recipe"] for r in _paper_rows("detection") if r["table"] == table)
        swept = set()
        for params in [dict(cfg.hydra.sweeper.params or {}), *_commands_in_comments(table)]:
            merged = {"detector": cfg.detector.name, "model": cfg.model.name, "conv": cfg.conv.name,
                      **dict(cfg.hydra.sweeper.params or {}), **params}
            swept |= {(d, a, c) for d in merged["detector"].split(",") for a in merged["model"].split(",")
                      for c in merged["conv"].split(",")}
        assert rows <= swept, (table, sorted(rows - swept))


def test_kw_coco_convnext_rows_follow_the_official_configs():
    convnext = _row("kw_coco", "kw_1x", "convnext_tiny")
    assert convnext.model.drop_path_rate == 0.4 and convnext.recipe.scheduler.milestones == [9, 11]
    assert _row("kw_coco", "kw_1x", "resnet50").recipe.scheduler.milestones == [8, 11]



def test_fdconv_coco_rows_follow_the_official_configs():
    """Linwei-Chen/FDConv FDConv_detection/configs: faster_rcnn_r50_fpn_1x_coco_FDConv.py (SGD 1x, Pad 64 from
    _base_/datasets/coco_detection.py, need_grad_list=['KSM', 'FBM']) and mask_rcnn_r50_fpn_1x_coco_adamw_FDConv.py
    (AdamW 1e-4 / 0.05, custom_keys 'norm' at decay_mult 0, lr_config step=[10, 11], fp16, train Pad 64)."""
    faster = _row("fdconv_coco", "fdconv")
    assert (faster.detector.name, faster.recipe.name, faster.model.name) == ("faster_rcnn", "det_1x_sgd", "resnet50")
    assert faster.recipe.optimizer.lr == 0.02 and faster.recipe.scheduler.milestones == [8, 11]
    assert faster.detector.kwargs["size_divisible"] == 64 and list(faster.detector.frozen_trainable) == ["KSM", "FBM"]
    assert list(_row("fdconv_coco", "odconv_4x").detector.frozen_trainable) == []  # ODConv froze its whole stage
    mask = _row("fdconv_coco_mask", "fdconv")
    assert (mask.detector.name, mask.recipe.name, mask.trainer.amp) == ("mask_rcnn", "det_1x_adamw", "fp16")
    assert mask.recipe.scheduler.milestones == [10, 11] and mask.recipe.optimizer.lr == 1e-4
    assert mask.recipe.optimizer.weight_decay == 0.05 and mask.recipe.optimizer.decay_1d
    assert "norm" in mask.recipe.optimizer.no_decay_keys and mask.detector.kwargs["size_divisible"] == 64
    assert list(mask.detector.frozen_trainable) == ["KSM", "FBM"]
    assert _row("fdconv_coco_mask", "kw_1x").model.drop_path_rate == 0.1

# ------------------------------------------------------------------------------------------------------
# Recipes as the official code ran them: learning rate per epoch / update, weight decay groups.


def _lrs(recipe: str, overrides=(), global_batch=None, updates_per_epoch=10, experiment=None):
    cfg = load([f"recipe={recipe}", *overrides] + ([f"experiment={experiment}", "data.root=/d"] if experiment else []))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    batch = global_batch or cfg.recipe.batch_size
    optimizer = build_optimizer(model, cfg.recipe.optimizer, batch)
    scheduler = build_scheduler(optimizer, cfg.recipe.scheduler, cfg.recipe.epochs, updates_per_epoch)
    out = []
    for step in range(cfg.recipe.epochs * updates_per_epoch):
        apply_schedule(scheduler, step // updates_per_epoch, step)
        out.append(current_lr(optimizer))
    return cfg, optimizer, out


def test_classic_recipe_steps_at_30_60_90_like_odconv_main():
    _, optimizer, lrs = _lrs("classic_100ep", updates_per_epoch=3)
    official = [0.1 * 0.1 ** (epoch // 30) for epoch in range(100)]  # OSVAI/ODConv adjust_learning_rate
    assert lrs[::3] == pytest.approx(official) and lrs[1::3] == pytest.approx(official)
    assert type(optimizer) is torch.optim.SGD and not optimizer.defaults["nesterov"]
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 1e-4  # BN too
    _, _, doubled = _lrs("classic_100ep", global_batch=512, updates_per_epoch=1)
    assert doubled[0] == pytest.approx(0.2)  # linear scaling with the global batch


def test_convnext_recipe_warms_up_then_cosine_per_iteration():
    cfg, optimizer, lrs = _lrs("convnext_300ep", updates_per_epoch=2)
    base, floor, warm, total = 4e-3, 1e-6, 40, 600
    expected = [base * t / warm if t < warm else
                floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * (t - warm) / (total - warm))) for t in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == (0.9, 0.999)
    decay = {len(g["params"]): g["weight_decay"] for g in optimizer.param_groups}
    assert sorted(decay.values()) == [0.0, 0.05]
    no_decay = next(g for g in optimizer.param_groups if g["weight_decay"] == 0)
    assert all(p.ndim <= 1 for p in no_decay["params"])  # biases and norm weights
    assert cfg.recipe.aug.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.recipe.aug.reprob == 0.25
    assert (cfg.recipe.aug.mixup, cfg.recipe.aug.cutmix, cfg.recipe.aug.smoothing) == (0.8, 1.0, 0.1)


def test_detection_1x_recipes_are_mmdets_schedule():
    """500 linear warm-up iterations from 0.001 x lr, then x0.1 after epochs 8 and 11 (mmdet's 1x)."""
    cfg, optimizer, lrs = _lrs("det_1x_sgd", updates_per_epoch=100)
    base = 0.02
    expected = [2e-5 + (base - 2e-5) * t / 500 if t < 500 else base * 0.1 ** ((t >= 800) + (t >= 1100))
                for t in range(1200)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert len(optimizer.param_groups) == 1 and cfg.recipe.batch_size == 16
    assert cfg.recipe.det_aug.scales == [1.0] and cfg.recipe.det_aug.crop_prob == 0
    cfg, adamw, lrs = _lrs("det_1x_adamw", updates_per_epoch=100)
    assert type(adamw) is torch.optim.AdamW and lrs[600] == pytest.approx(1e-4) and lrs[900] == pytest.approx(1e-5)
    assert sorted(g["weight_decay"] for g in adamw.param_groups) == [0.0, 0.05]
    from dynconv.engine.tasks.detection import train_sizes

    assert train_sizes(cfg.data, cfg.recipe.det_aug) == list(range(480, 801, 32))  # DETR-style 480..800
    assert [round(s * 800) for s in cfg.recipe.det_aug.crop_resize] == [400, 500, 600]
    assert [round(s * 800) for s in cfg.recipe.det_aug.crop_size] == [384, 600]


def test_mobilenetv2_recipes_per_epoch_and_kw_per_iteration_cosine():
    _, optimizer, lrs = _lrs("mobilenetv2_150ep", updates_per_epoch=2)
    per_epoch = [0.5 * 0.05 * (1 + math.cos(math.pi * e / 150)) for e in range(150)]
    assert lrs[::2] == pytest.approx(per_epoch) and lrs[1::2] == pytest.approx(per_epoch)
    assert optimizer.param_groups[0]["weight_decay"] == 4e-5 and len(optimizer.param_groups) == 1
    _, kw, kw_lrs = _lrs("mobilenetv2_150ep", experiment="kw_mobilenetv2", updates_per_epoch=2)
    per_iter = [1e-6 + 0.5 * (0.05 - 1e-6) * (1 + math.cos(math.pi * t / 300)) for t in range(300)]
    assert kw_lrs == pytest.approx(per_iter) and kw.defaults["nesterov"]
    assert sorted(g["weight_decay"] for g in kw.param_groups) == [0.0, 4e-5]

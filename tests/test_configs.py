"""Every config option composes into the schema; the recipes hold the official settings (algorithms.md §10)."""
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
    assert options("recipe") == ["classic_100ep", "convnext_300ep", "demo", "mobilenetv2_150ep"]
    assert options("data") == ["imagenet", "synthetic"] and options("logger") == ["none", "wandb"]


@pytest.mark.parametrize("group", ["model", "conv", "recipe", "data", "logger", "experiment"])
def test_every_option_composes_and_validates(group):
    for name in options(group):
        cfg = load([f"{group}={name}", "data.root=/data/imagenet"] if group in ("data", "experiment")
                   else [f"{group}={name}"])
        validate(cfg)
        if group in ("model", "conv"):
            assert getattr(cfg, group).name == name
        if group == "experiment":
            assert cfg.name == name and cfg.data.name == "imagenet"
            apply_row(cfg)


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


def _paper_rows():
    with open(ROOT / "results" / "paper.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["task"] == "classification"]


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


def test_mobilenetv2_recipes_per_epoch_and_kw_per_iteration_cosine():
    _, optimizer, lrs = _lrs("mobilenetv2_150ep", updates_per_epoch=2)
    per_epoch = [0.5 * 0.05 * (1 + math.cos(math.pi * e / 150)) for e in range(150)]
    assert lrs[::2] == pytest.approx(per_epoch) and lrs[1::2] == pytest.approx(per_epoch)
    assert optimizer.param_groups[0]["weight_decay"] == 4e-5 and len(optimizer.param_groups) == 1
    _, kw, kw_lrs = _lrs("mobilenetv2_150ep", experiment="kw_mobilenetv2", updates_per_epoch=2)
    per_iter = [1e-6 + 0.5 * (0.05 - 1e-6) * (1 + math.cos(math.pi * t / 300)) for t in range(300)]
    assert kw_lrs == pytest.approx(per_iter) and kw.defaults["nesterov"]
    assert sorted(g["weight_decay"] for g in kw.param_groups) == [0.0, 4e-5]

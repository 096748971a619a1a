"""``recipe=finetune_static``: a dynamic model converted from a static checkpoint (``model.pretrained``) and
fine-tuned. The recipe composes and validates, its layer schedules start where converted weights are exact
(KernelWarehouse tau = 1) and end inside the run, and a fine-tune run scores its starting weights
(``trainer.eval_before_train``) exactly as the static run scored the checkpoint it starts from."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import dynconv
from cli import ROOT, TINY, ok, run, summary
from dynconv import set_progress
from dynconv.engine.builders import build_model
from dynconv.engine.config import TrainConfig, validate
from dynconv.engine.trainer import Trainer
from dynconv.ops._routing import TemperatureScheduled
from dynconv.ops.kernelwarehouse import KWAttention
from dynconv.ops.odconv import ODAttention


def _compose(overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dynconv_entry_train_ft", ROOT / "train.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers the train schema
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=/tmp/unused", *overrides])
    cfg = OmegaConf.to_object(cfg)
    assert isinstance(cfg, TrainConfig)
    return cfg


def _static_checkpoint(path: Path) -> Path:
    """A static MobileNetV2-0.5 state dict (timm layout), what ``model.pretrained`` takes."""
    torch.manual_seed(0)
    torch.save(dynconv.create_model("mobilenetv2_050", "static", num_classes=4).state_dict(), path)
    return path


def _values(model, kind):
    return sorted({float(m.temperature) for m in model.modules() if isinstance(m, kind)})


def test_recipe_composes_validates_and_schedules_start_exact_and_end_inside_the_run(tmp_path):
    source = _static_checkpoint(tmp_path / "static.pth")
    updates = 10  # per epoch; the schedules depend on progress in epochs only
    for conv, kind, start, end in (("kw_1x", KWAttention, 1.0, 0.0), ("odconv_1x", ODAttention, 30.0, 1.0)):
        cfg = _compose(["recipe=finetune_static", "model=mobilenetv2_050", f"conv={conv}",
                        f"model.pretrained={source}", "data.num_classes=4"])
        validate(cfg)
        recipe = cfg.recipe
        assert recipe.name == "finetune_static" and cfg.model.pretrained == str(source)
        # a shorter, lower-rate run than the from-scratch demo recipe it fine-tunes from
        demo = _compose(["recipe=demo"]).recipe
        assert recipe.epochs < demo.epochs and recipe.optimizer.lr <= demo.optimizer.lr / 10
        assert 0 < recipe.scheduler.warmup_epochs < 1
        model = build_model(cfg.model, cfg.conv, 4)
        assert model.pretrained_report is not None
        clock = SimpleNamespace(cfg=cfg, updates_per_epoch=updates, global_step=0)
        # step 0, as the trainer computes it (Trainer.schedule_progress, called before every update)
        set_progress(model, Trainer.schedule_progress(clock))
        assert _values(model, kind) == [start]  # official start: KW tau = 1 assembles the static kernels
        # KW's tau reaches 0 at half the run (official 15 MobileNetV2 epochs at schedule_speed 7.5 = 2 of 4
        # epochs), ODConv's temperature reaches 1 at 10 / 7.5 = 1.33 epochs (OSVAI/ODConv get_temperature)
        clock.global_step = recipe.epochs * updates // 2
        set_progress(model, Trainer.schedule_progress(clock))
        assert _values(model, kind) == [end]
        clock.global_step = 1
        set_progress(model, Trainer.schedule_progress(clock))
        assert _values(model, kind)[0] != start  # the ramp moves from the first update on
        assert all(isinstance(m, TemperatureScheduled) for m in model.modules() if isinstance(m, kind))


def test_fine_tune_from_a_static_checkpoint_starts_at_its_accuracy(tmp_path):
    """``trainer.eval_before_train``: the epoch-0 row of the fine-tune (the converted ODConv model before any update) equals the static run's
    evaluation of the checkpoint it starts from: ODConv 1x starts bitwise at the static function (its sigmoid
    heads start at 1/2 with the kernel scaled by 2^h, dynconv/pretrained.py), on the same validation data."""
    cache = tmp_path / "cache"
    arch = ["model=mobilenetv2_050"]
    static_dir, tuned_dir = tmp_path / "static", tmp_path / "tuned"
    ok(run("train.py", TINY + arch + ["conv=static", "recipe.epochs=1", "recipe.scheduler.warmup_epochs=0"],
           static_dir, cache))
    static_row = summary(static_dir)["rows"][-1]
    assert static_row["epoch"] == 1  # best.pt is this epoch's checkpoint (the only one)
    tune = TINY + arch + ["conv=odconv_1x", "recipe=finetune_static", "recipe.epochs=1",
                          f"model.pretrained={static_dir / 'best.pt'}"]
    result = ok(run("train.py", tune + ["trainer.eval_before_train=true"], tuned_dir, cache))
    assert "epoch 0/1 (before training): " in result.stdout
    rows = summary(tuned_dir)["rows"]
    assert [r["epoch"] for r in rows] == [0, 1]
    start = rows[0]
    assert start["eval_top1"] == static_row["eval_top1"] and start["eval_top5"] == static_row["eval_top5"]
    assert math.isclose(start["eval_loss"], static_row["eval_loss"], rel_tol=1e-5)
    assert start["eval_ema_top1"] == static_row["eval_top1"]  # the recipe's EMA starts at the converted weights
    assert "train_loss" not in start  # nothing was trained before it
    # the epoch-0 evaluation changes nothing afterwards: the run trains exactly as it does without it
    plain_dir = tmp_path / "plain"
    ok(run("train.py", tune, plain_dir, cache))
    assert summary(plain_dir)["rows"] == [{**rows[1], "epoch_time_s": summary(plain_dir)["rows"][0]["epoch_time_s"]}]

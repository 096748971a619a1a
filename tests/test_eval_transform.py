"""``eval.py`` scores a checkpoint with the resize interpolation and crop its run was validated with."""
from __future__ import annotations

import json

import pytest
from test_configs import load

from cli import TINY, ok, run, summary
from dynconv.engine.tasks.classification import eval_transform


def _stored(interpolation, crop_pct, recipe="convnext_300ep"):
    return {"config": {"recipe": {"name": recipe, "aug": {"eval_interpolation": interpolation}},
                       "data": {"crop_pct": crop_pct}}}


def test_a_dynconv_checkpoint_brings_its_recipes_transform():
    cfg = load(config="eval")  # eval.yaml's own recipe is the (bilinear) demo
    assert eval_transform(cfg, _stored("bicubic", 0.95)) == ("bicubic", 0.95, "the checkpoint's recipe (convnext_300ep)")


def test_the_command_line_wins_over_the_checkpoint():
    cfg = load(["interpolation=bilinear", "crop_pct=0.9"], config="eval")
    assert eval_transform(cfg, _stored("bicubic", 0.95)) == ("bilinear", 0.9, "interpolation=")


def test_an_official_file_takes_the_recipe_named_on_the_command_line():
    # OSVAI/KernelWarehouse datasets.py: the 300-epoch models are validated with Resize(256, bicubic) + CenterCrop(224)
    official = {"state_dict": {}}
    assert eval_transform(load(["recipe=convnext_300ep", "data=imagenet", "data.root=/d"], config="eval"), official) == \
        ("bicubic", 0.875, "recipe=convnext_300ep")
    # ODConv main.py: Resize(256) + CenterCrop(224), bilinear, as the classic recipe
    assert eval_transform(load(["recipe=classic_100ep", "data=imagenet", "data.root=/d"], config="eval"), official)[:2] == ("bilinear", 0.875)


def test_eval_py_reproduces_a_bicubic_runs_validation(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    ok(run("train.py", TINY + ["recipe.aug.eval_interpolation=bicubic", "data.crop_pct=0.75"], run_dir, cache))
    validated = summary(run_dir)["rows"][-1]
    ok(run("eval.py", TINY[:4] + [f"checkpoint={run_dir / 'last.pt'}", f"output={tmp_path / 'e.json'}"],
           tmp_path / "eval", cache))
    scored = json.loads((tmp_path / "e.json").read_text())
    assert (scored["interpolation"], scored["crop_pct"]) == ("bicubic", 0.75)
    assert scored["top1"] == pytest.approx(validated["eval_top1"], abs=1e-3)
    assert scored["loss"] == pytest.approx(validated["eval_loss"], rel=1e-5)

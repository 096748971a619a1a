"""Bad values stop before any work, with one line that names the key and what it must be."""
from __future__ import annotations

import pytest
from test_configs import load

from cli import ok, run
from dynconv.engine.config import unknown_keys, validate

BAD = [
    (["+trainer.wrkers=2"], r"^trainer.wrkers is not a config key \(given with '\+'\?\); did you mean trainer.workers\?$"),
    (["+recipe.optimizer.momentun=0.8"], r"recipe.optimizer.momentun is not a config key.*did you mean recipe.optimizer.momentum"),
    (["trainer.batch_size=0"], r"^trainer.batch_size=0 is not valid: it must be at least 1$"),
    (["trainer.eval_batch_size=0"], r"^trainer.eval_batch_size=0 is not valid"),
    (["trainer.max_epochs=0"], r"^trainer.max_epochs=0 is not valid"),
    (["trainer.checkpoint_interval=-1"], r"^trainer.checkpoint_interval=-1 is not valid: it must be at least 0"),
    (["trainer.log_interval=0"], r"^trainer.log_interval=0 is not valid"),
    (["trainer.workers=-1"], r"^trainer.workers=-1 is not valid"),
    (["data.crop_pct=0"], r"^data.crop_pct=0.0 is not valid: it must be in \(0, 1\]"),
    (["data.crop_pct=1.5"], r"^data.crop_pct=1.5 is not valid"),
    (["+conv.options.temperature_epochs=-1"], r"^conv.options.temperature_epochs=-1 is not valid: it must be at least 0$"),
    (["recipe.optimizer.lr=-0.1"], r"^recipe.optimizer.lr=-0.1 at recipe.optimizer.lr_batch=256 is not valid"),
    (["recipe.optimizer.weight_decay=-1e-4"], r"^recipe.optimizer.weight_decay=-0.0001 is not valid"),
    (["recipe.optimizer.name=sgdd"], r"^recipe.optimizer.name='sgdd' is not a timm optimizer; did you mean sgd"),
    (["recipe.epochs=0"], r"^recipe.epochs=0 is not valid"),
    (["recipe.schedule_speed=0"], r"^recipe.schedule_speed=0.0 is not valid"),
    # the demo warms up for one epoch: a one-epoch run is refused with the fix named
    (["recipe.epochs=1"], r"^recipe.scheduler.warmup_epochs=1 is not shorter than recipe.epochs=1: .* lower it "
                          r"\(e.g. recipe.scheduler.warmup_epochs=0.1\) or raise recipe.epochs$"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_value_is_refused_with_its_key(overrides, message):
    cfg = load(overrides)
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_the_fix_named_for_a_short_run_works():
    validate(load(["recipe.epochs=1", "recipe.scheduler.warmup_epochs=0.1"]))


def test_free_form_options_are_not_schema_keys():
    cfg = load(["+conv.options.kernel_num=2", "+model.kwargs.in_chans=1", "+detector.kwargs.min_size=600"])
    assert unknown_keys(cfg) == []
    validate(cfg)


def test_eval_batch_size_is_checked():
    with pytest.raises(ValueError, match=r"^batch_size=0 is not valid"):
        validate(load(["batch_size=0"], config="eval"))


def test_the_command_line_gets_one_line_and_exit_1(tmp_path):
    result = run("train.py", ["+trainer.wrkers=2"], tmp_path / "run", tmp_path / "cache", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: trainer.wrkers is not a config key (given with '+'?); did you mean trainer.workers?"
    assert not (tmp_path / "run" / "last.pt").exists()
    ok(run("train.py", ["trainer.workers=0", "recipe.epochs=1", "recipe.scheduler.warmup_epochs=0.5",
                        "data.image_size=16", "data.num_classes=2", "data.train_per_class=16", "data.val_per_class=2",
                        "recipe.batch_size=16", "trainer.limit_train_batches=1"],
           tmp_path / "short", tmp_path / "cache", timeout=300))

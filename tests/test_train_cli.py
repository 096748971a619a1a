"""``train.py`` and ``eval.py`` end to end, as subprocesses: the default run in miniature, exact resume
after SIGKILL, the NaN guard, and the messages for bad configs, data and checkpoints."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cli import TINY, command, env, ok, run, steps, summary
from dynconv.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_default_run_in_miniature_then_eval(tmp_path, cache):
    run_dir = tmp_path / "run"
    out = ok(run("train.py", TINY, run_dir, cache)).stdout
    assert "mobilenetv2_100 conv=odconv_1x recipe=demo data=synthetic (32 train / 16 val images, 4 classes)" in out
    rows = summary(run_dir)["rows"]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["eval_count"] == 16 for r in rows)
    assert sorted(steps(run_dir)) == list(range(1, 9))
    assert (run_dir / "summary.csv").read_text().splitlines()[0].startswith("epoch,train_loss,eval_loss")
    state = load_checkpoint(run_dir / "last.pt")
    assert state["global_step"] == 8 and state["meta"]["arch"] == "mobilenetv2_100"
    assert isinstance(state["config"], dict) and state["config"]["conv"]["name"] == "odconv_1x"

    # eval.py on the checkpoint scores the same weights on the same images: the last epoch's numbers
    result = ok(run("eval.py", TINY[:4] + [f"checkpoint={run_dir / 'last.pt'}", f"output={tmp_path / 'e.json'}"],
                    tmp_path / "eval", cache))
    scored = json.loads((tmp_path / "e.json").read_text())
    assert scored["top1"] == pytest.approx(rows[-1]["eval_top1"], abs=1e-3)
    assert scored["top5"] == pytest.approx(rows[-1]["eval_top5"], abs=1e-3)
    assert scored["num_images"] == 16 and scored["param_count"] == round(summary(run_dir)["summary"]["params"] / 1e6, 3)
    assert scored["macs_g"] > 0 and scored["infer_samples_per_sec"] > 0
    assert '"top1"' in result.stdout

    # the same command again finds the finished run and does nothing
    again = ok(run("train.py", TINY, run_dir, cache)).stdout
    assert "nothing to do" in again and len(steps(run_dir)) == 8


RESUME = ["model=resnet18", "conv=odconv_1x", "recipe.epochs=3", "trainer.checkpoint_interval=3",
          "recipe.aug.mixup=0.4", "recipe.aug.cutmix=1.0", "model.drop_path_rate=0.1", "recipe.ema.enabled=true",
          "recipe.ema.decay=0.9"]


def _kill_after(cmd, run_dir, cache, step: int) -> int:
    """Start ``cmd``, SIGKILL it once ``step`` is logged; the global step of its last checkpoint."""
    proc = subprocess.Popen(cmd, env=env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "steps.jsonl").exists() and max(steps(run_dir), default=0) >= step:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    return load_checkpoint(run_dir / "last.pt")["global_step"]


def test_sigkill_mid_epoch_then_resume_is_bitwise(tmp_path, cache):
    """Mixup/CutMix (numpy RNG), drop path (torch RNG), EMA and the temperature schedule all continue
    exactly; the resumed process even uses DataLoader workers where the reference used none."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(run("train.py", TINY + RESUME, straight, cache))
    saved = _kill_after(command("train.py", TINY + RESUME, killed), killed, cache, step=7)
    assert 0 < saved < 12 and saved % 4 != 0  # a mid-epoch checkpoint
    ok(run("train.py", TINY + RESUME + ["trainer.workers=2"], killed, cache))

    a, b = steps(straight), steps(killed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[s]["train/loss"] for s in a] == [b[s]["train/loss"] for s in a]
    assert [a[s]["train/lr"] for s in a] == [b[s]["train/lr"] for s in a]
    end_a, end_b = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    for key in ("model", "ema"):
        assert end_a[key].keys() == end_b[key].keys()
        assert all(torch.equal(end_a[key][k], end_b[key][k]) for k in end_a[key])
    assert end_b["meta"]["epoch"] == 3.0  # what eval.py sets the layer schedules from
    assert [r["eval_top1"] for r in summary(straight)["rows"]] == [r["eval_top1"] for r in summary(killed)["rows"]]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, cache):
    run_dir = tmp_path / "run"
    args = TINY + ["model=resnet18", "conv=static", "recipe.optimizer.lr=1e12", "recipe.scheduler.warmup_epochs=0",
                   "trainer.checkpoint_interval=1", "recipe.epochs=3"]
    result = run("train.py", args, run_dir, cache)
    assert result.returncode == 1, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite training loss") and "at step" in message
    assert f"the last good checkpoint is {run_dir / 'last.pt'}" in message
    state = load_checkpoint(run_dir / "last.pt")  # intact, from before the bad step
    bad_step = int(message.split("at step ")[1].split()[0])
    assert state["global_step"] == bad_step and all(np.isfinite(steps(run_dir)[s]["train/loss"]) for s in steps(run_dir))
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["conv=odconv_8x"], ["Could not find 'conv/odconv_8x'", "Available options in 'conv'", "odconv_4x", "kw_1d2x"]),
    (["trainer.wrkers=2"], ["Could not override 'trainer.wrkers'", "Key 'wrkers' not in 'TrainerConfig'"]),
    (["recipe.epochs=ten"], ["Value 'ten' of type 'str' could not be converted to Integer", "recipe.epochs"]),
    (["data=imagenet"], ["missing mandatory value: root", "full_key: data.root"]),
    (["data=imagenet", "data.root=/no/such/imagenet"], ["data.root=/no/such/imagenet", "directory not found",
                                                        "<root>/train/<class>/*.JPEG"]),
    (["conv=icconv", "+conv.options.patterns=/no/such.json"], ["/no/such.json"]),
])
def test_config_and_path_errors_name_what_is_wrong(tmp_path, cache, args, expected):
    result = run("train.py", TINY + args, tmp_path / "run", cache)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "last.pt").exists()


def _fake_imagenet(root, corrupt: bool):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("n01", "n02")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = np.full((20, 20, 3), 60 + 120 * c, np.uint8) + rng.integers(0, 20, (20, 20, 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", "JPEG")
    bad = root / "val" / "n02" / "2.JPEG"
    if corrupt:
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    return bad


def test_corrupt_image_raises_or_is_skipped_and_logged(tmp_path, cache):
    bad = _fake_imagenet(tmp_path / "imagenet", corrupt=True)
    args = ["data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.image_size=16", "recipe.batch_size=4",
            "recipe.epochs=2", "trainer.workers=0", "model=resnet18", "conv=static"]
    result = run("train.py", args, tmp_path / "run", cache)
    assert result.returncode == 1 and str(bad) in result.stderr and "data.on_corrupt=skip" in result.stderr
    skipped = ok(run("train.py", args + ["data.on_corrupt=skip", "data.max_bad_fraction=0.1"], tmp_path / "run2", cache))
    assert str(bad) in skipped.stderr + skipped.stdout
    assert summary(tmp_path / "run2")["rows"][-1]["eval_count"] == 8  # the next image stands in for it


def test_checkpoint_of_another_model_is_refused(tmp_path, cache):
    run_dir = tmp_path / "run"
    ok(run("train.py", TINY + ["model=resnet18", "conv=static", "recipe.epochs=1", "recipe.scheduler.warmup_epochs=0"],
           run_dir, cache))
    wrong = run("eval.py", TINY[:4] + ["model=resnet34", "conv=static", f"checkpoint={run_dir / 'last.pt'}"],
                tmp_path / "eval", cache)
    assert wrong.returncode == 1
    assert "was trained for arch=resnet18 conv=static" in wrong.stderr and "arch=resnet34" in wrong.stderr
    assert f"checkpoint {run_dir / 'last.pt'} was trained for" in wrong.stderr  # the file, not <in-memory ...>
    # resuming a run directory with another conv: refused, and the checkpoint is left as it was
    before = (run_dir / "last.pt").read_bytes()
    other = run("train.py", TINY + ["model=resnet18", "conv=se", "recipe.epochs=2"], run_dir, cache)
    assert other.returncode == 1 and "was trained for arch=resnet18 conv=static" in other.stderr
    assert (run_dir / "last.pt").read_bytes() == before


def test_experiment_row_settings_apply_and_the_command_line_wins(tmp_path, cache):
    """experiment=kw_resnet18, row kw_1d4x: no mixup / cutmix (its row); drop path from the command line."""
    args = TINY + ["experiment=kw_resnet18", "data=synthetic", "conv=kw_1d4x", "model.drop_path_rate=0.05",
                   "recipe.scheduler.warmup_epochs=0", "recipe.epochs=1"]
    ok(run("train.py", args, tmp_path / "run", cache))
    config = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert config["name"] == "kw_resnet18" and config["recipe"]["name"] == "convnext_300ep"
    assert config["recipe"]["aug"]["mixup"] == config["recipe"]["aug"]["cutmix"] == 0.0
    assert config["model"]["drop_path_rate"] == 0.05 and config["recipe"]["aug"]["smoothing"] == 0.1

"""Runs that survive what users do: concurrent commands, reruns with other values, NaN, kills at epoch end."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from cli import TINY, command, env, ok, run, steps, summary
from dynconv.checkpoint import CheckpointManager, load_checkpoint

pytestmark = pytest.mark.slow

STATIC = TINY + ["model=resnet18", "conv=static", "recipe.scheduler.warmup_epochs=0"]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_a_second_command_on_the_same_run_directory_stops_at_once(tmp_path, cache):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(command("train.py", STATIC + ["recipe.epochs=40"], run_dir), env=env(cache),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "steps.jsonl").exists():
            time.sleep(0.1)
        second = run("train.py", STATIC + ["recipe.epochs=40", "recipe.optimizer.lr=0.8"], run_dir, cache)
        assert second.returncode == 1
        assert f"is in use by PID {first.pid} on host" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    orphan = run_dir / ".last.pt.99999.0badf00d.tmp"
    orphan.write_bytes(b"left by a killed writer")
    # the killed holder left no stale lock, and its orphan temp files go on start
    ok(run("train.py", STATIC + ["recipe.epochs=40", "trainer.max_epochs=1"], run_dir, cache))
    assert not orphan.exists()


def test_rerun_with_another_value_is_refused_or_continued_as_asked(tmp_path, cache):
    run_dir = tmp_path / "run"
    one = STATIC + ["recipe.epochs=1"]
    ok(run("train.py", one, run_dir, cache))
    before = (run_dir / "last.pt").read_bytes()
    other = run("train.py", STATIC + ["recipe.epochs=1", "recipe.optimizer.lr=0.8"], run_dir, cache)
    assert other.returncode == 1
    assert "recipe.optimizer.lr: 0.2 in the run, 0.8 now" in other.stderr
    assert "trainer.resume_changes=[recipe.optimizer.lr]" in other.stderr and "nothing to do" not in other.stdout
    assert (run_dir / "last.pt").read_bytes() == before
    # more epochs, asked for: the schedule is the one of a 2-epoch run from the resume on (not lr 0)
    ok(run("train.py", STATIC + ["recipe.epochs=2", "trainer.resume_changes=[recipe.epochs]"], run_dir, cache))
    fresh = tmp_path / "fresh"
    ok(run("train.py", STATIC + ["recipe.epochs=2"], fresh, cache))
    extended, straight = steps(run_dir), steps(fresh)
    assert sorted(extended) == sorted(straight) == list(range(1, 9))
    assert [extended[s]["train/lr"] for s in range(5, 9)] == [straight[s]["train/lr"] for s in range(5, 9)]
    assert min(extended[s]["train/lr"] for s in range(5, 8)) > 0
    assert [r["epoch"] for r in summary(run_dir)["rows"]] == [1, 2]


def _finite(state):
    return all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point())


def test_a_skipped_nan_step_leaves_the_batchnorm_statistics_alone(tmp_path, cache, monkeypatch):
    """With nan_policy=skip, a step whose loss is NaN changes nothing: its forward's BatchNorm updates are undone."""
    from test_configs import load

    from dynconv.engine.distributed import init_distributed
    from dynconv.engine.run import task_for
    from dynconv.engine.trainer import Trainer

    monkeypatch.setenv("DYNCONV_CACHE", str(cache))
    cfg = load(STATIC + ["trainer.nan_policy=skip", "trainer.device=cpu"])
    cfg.run_dir = str(tmp_path / "run")
    trainer = Trainer(task_for(cfg), cfg, init_distributed("cpu"))
    try:
        images, targets = next(iter(trainer.train_loader))
        images[0, 0, 0, 0] = float("nan")
        before = {name: b.clone() for name, b in trainer.module.named_buffers()}
        weights = {name: p.clone() for name, p in trainer.module.named_parameters()}
        assert trainer.train_step([(images, targets)], epoch=0) is None  # skipped
        for name, buffer in trainer.module.named_buffers():
            assert torch.equal(buffer, before[name]), name
        assert all(torch.equal(p, weights[n]) for n, p in trainer.module.named_parameters())
        assert trainer.train_step([(images.nan_to_num(0.0), targets)], epoch=0) is not None  # a good step goes on
    finally:
        trainer.close()


def test_no_checkpoint_with_non_finite_statistics_and_the_advice_works(tmp_path, cache):
    run_dir = tmp_path / "run"
    bad = STATIC + ["recipe.optimizer.lr=1e6", "recipe.epochs=2", "trainer.checkpoint_interval=1"]
    result = run("train.py", bad, run_dir, cache)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite") and "trainer.resume_changes=[recipe.optimizer.lr]" in message
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            assert _finite(load_checkpoint(run_dir / name)), name
    if (run_dir / "last.pt").exists():
        # eval.py on what was kept scores a finite loss, or stops saying so: never exit 0 with a NaN loss
        scored = run("eval.py", TINY[:4] + ["model=resnet18", "conv=static", f"checkpoint={run_dir / 'last.pt'}",
                                            f"output={tmp_path / 'e.json'}"], tmp_path / "eval", cache)
        if scored.returncode == 0:
            assert np.isfinite(json.loads((tmp_path / "e.json").read_text())["loss"])
        else:
            assert scored.stderr.startswith("error: non-finite evaluation loss")
    # following the advice is accepted on resume: the run goes on from its checkpoint with the lower lr (here
    # the kept weights have diverged already, so it stops again with the same one line, not a config error)
    again = run("train.py", STATIC + ["recipe.optimizer.lr=0.1", "recipe.epochs=2", "trainer.checkpoint_interval=1",
                                      "trainer.resume_changes=[recipe.optimizer.lr]"], run_dir, cache)
    assert "resuming with changed recipe.optimizer.lr" in again.stdout
    assert again.returncode == 0 or again.stderr.startswith("error: non-finite")
    # without mid-epoch checkpoints nothing was kept, and the lower lr simply trains in the same directory
    fresh = tmp_path / "fresh"
    failed = run("train.py", STATIC + ["recipe.optimizer.lr=1e6", "recipe.epochs=2"], fresh, cache)
    assert failed.returncode == 1 and "no checkpoint was written yet" in failed.stderr
    ok(run("train.py", STATIC + ["recipe.optimizer.lr=0.1", "recipe.epochs=2"], fresh, cache))
    assert summary(fresh)["summary"]["finished"]


def test_eval_py_fails_on_a_non_finite_checkpoint(tmp_path, cache):
    run_dir = tmp_path / "run"
    ok(run("train.py", STATIC + ["recipe.epochs=1"], run_dir, cache))
    state = load_checkpoint(run_dir / "last.pt")
    state["model"]["layer1.0.bn1.running_var"][0] = float("nan")
    CheckpointManager(tmp_path / "poisoned").save("last", state)
    result = run("eval.py", TINY[:4] + ["model=resnet18", "conv=static", f"checkpoint={tmp_path / 'poisoned' / 'last.pt'}"],
                 tmp_path / "eval", cache)
    assert result.returncode == 1 and "non-finite" in result.stderr and "poisoned" in result.stderr


def test_a_kill_at_the_end_of_an_epoch_loses_no_row_and_no_best(tmp_path, cache):
    """SIGKILL right after an epoch's row is written, before last.pt moves on: the resume repeats that epoch
    exactly, so the row, best.pt and the final result are those of an uninterrupted run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = STATIC + ["recipe.epochs=2"]
    ok(run("train.py", args, straight, cache))
    proc = subprocess.Popen(command("train.py", args, killed), env=env(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (killed / "summary.json").exists() and (killed / "best.pt").exists():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "best.pt").exists()
    ok(run("train.py", args, killed, cache))
    a, b = summary(straight)["rows"], summary(killed)["rows"]
    assert [r["epoch"] for r in b] == [1, 2]
    assert [(r["train_loss"], r["eval_top1"]) for r in a] == [(r["train_loss"], r["eval_top1"]) for r in b]
    assert (killed / "best.pt").exists()


def test_a_mid_epoch_resume_averages_the_whole_epochs_loss(tmp_path, cache):
    from test_train_cli import _kill_after

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = STATIC + ["recipe.epochs=2", "trainer.checkpoint_interval=1"]
    ok(run("train.py", args, straight, cache))
    saved = _kill_after(command("train.py", args, killed), killed, cache, step=6)
    assert 4 < saved < 8  # inside the second epoch (4 updates an epoch)
    ok(run("train.py", args, killed, cache))
    per_step = steps(straight)
    assert summary(straight)["rows"][1]["train_loss"] == pytest.approx(sum(per_step[s]["train/loss"] for s in range(5, 9)) / 4)
    assert [r["train_loss"] for r in summary(killed)["rows"]] == [r["train_loss"] for r in summary(straight)["rows"]]

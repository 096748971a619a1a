"""dynconv.engine.run_logging: summary files, W&B offline run contents and resume, console progress."""
import csv
import io
import json
import sys

import pytest

from dynconv.engine import run_logging
from wandb_files import finished_wandb_records, item_key, wandb_history, wandb_summary
from dynconv.engine.run_logging import Progress, RunLogger

CONFIG = {"model": {"arch": "resnet18", "conv": "odconv_4x"}, "lr": 0.1}


def _csv(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


def test_summary_files(tmp_path):
    run = tmp_path / "run"
    log = RunLogger(run, config=CONFIG)
    log.log_epoch({"epoch": 0, "train_loss": 2.5, "eval_top1": 40.0, "lr": 0.1}, step=10)
    log.log_epoch({"epoch": 1, "train_loss": 2.0, "eval_top1": 50.0, "lr": 0.05}, step=20)
    log.log_epoch({"epoch": 1, "train_loss": 1.9, "eval_top1": 52.5, "lr": 0.05}, step=20)  # re-done epoch
    log.log_epoch({"epoch": 2, "train_loss": 1.5, "eval_top1": 60.0, "eval_top5": 80.0, "lr": 0.01}, step=30)
    log.set_summary(best_top1=60.0, params_m=11.7)
    log.finish()

    header, rows = _csv(run / "summary.csv")
    assert header == ["epoch", "train_loss", "eval_top1", "lr", "eval_top5"]  # union, first-seen order
    assert rows == [
        ["0", "2.5", "40.0", "0.1", ""],
        ["1", "1.9", "52.5", "0.05", ""],
        ["2", "1.5", "60.0", "0.01", "80.0"],
    ]
    data = json.loads((run / "summary.json").read_text())
    assert [r["epoch"] for r in data["rows"]] == [0, 1, 2]
    assert data["rows"][1] == {"epoch": 1, "train_loss": 1.9, "eval_top1": 52.5, "lr": 0.05}
    assert data["summary"] == {"best_top1": 60.0, "params_m": 11.7}
    assert sorted(p.name for p in run.iterdir()) == ["summary.csv", "summary.json"]  # no temp files, no W&B


def test_resume_keeps_rows_and_replaces_epoch(tmp_path):
    first = RunLogger(tmp_path, config=CONFIG)
    for epoch in range(4):
        first.log_epoch({"epoch": epoch, "eval_top1": 10.0 * epoch}, step=epoch)
    first.set_summary(params_m=11.7)
    # preempted during epoch 3; the requeued job re-does it from the epoch-2 checkpoint
    second = RunLogger(tmp_path, config=CONFIG)
    second.log_epoch({"epoch": 3, "eval_top1": 33.0}, step=3)
    second.log_epoch({"epoch": 4, "eval_top1": 44.0}, step=4)
    _, rows = _csv(tmp_path / "summary.csv")
    assert rows == [["0", "0.0"], ["1", "10.0"], ["2", "20.0"], ["3", "33.0"], ["4", "44.0"]]
    assert json.loads((tmp_path / "summary.json").read_text())["summary"] == {"params_m": 11.7}


def test_non_primary_is_silent(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises
    run = tmp_path / "run"
    with RunLogger(run, config=CONFIG, is_primary=False, wandb={"project": "p"}) as log:
        log.log_step({"train/loss": 1.0}, step=1)
        log.log_epoch({"epoch": 0, "eval_top1": 1.0}, step=1)
        log.set_summary(best_top1=1.0)
    log.finish()
    assert not run.exists()


# --------------------------------------------------------------------------------------------------
# W&B offline


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    options = {"project": "dynconv-test", "entity": None, "group": "tab2", "name": "r18-odconv",
               "job_type": "train", "tags": ["resnet18", "odconv_4x"], "mode": None}
    return options


def test_wandb_offline_run_contents_and_resume(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    log = RunLogger(run_dir, config=CONFIG, wandb=wandb_offline)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert log.wandb_id == run_id and log.run.settings.mode == "offline"
    log.log_step({"train/loss": 2.5, "train/lr": 0.1}, step=1)
    log.log_step({"train/loss": 2.25, "train/lr": 0.09}, step=2)
    log.log_epoch({"epoch": 0, "train_loss": 2.4, "eval_top1": 55.0, "eval_loss": 1.8}, step=2)
    log.log_epoch({"epoch": 1, "train_loss": 2.1, "eval_top1": 50.0, "eval_loss": 1.9}, step=4)
    log.set_summary(params_m=11.7)
    log.finish()
    log.finish()  # twice is fine

    files = list(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
    assert len(files) == 1
    records = finished_wandb_records(files[0])
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.run_id == run_id and run_record.run_group == "tab2" and run_record.job_type == "train"
    assert list(run_record.tags) == ["resnet18", "odconv_4x"]
    config = {item_key(i): json.loads(i.value_json) for i in run_record.config.update}
    assert config["lr"] == 0.1 and config["model"] == {"arch": "resnet18", "conv": "odconv_4x"}

    history = wandb_history(records)
    assert history[1]["train/loss"] == 2.5 and history[1]["train/lr"] == 0.1
    assert history[2]["train/loss"] == 2.25  # step and epoch values of step 2 in one row
    assert history[2]["eval/top1"] == 55.0 and history[2]["epoch/train_loss"] == 2.4 and history[2]["epoch"] == 0
    assert history[4]["eval/top1"] == 50.0 and history[4]["eval/loss"] == 1.9
    summary = wandb_summary(records)
    assert summary["eval/top1"] == {"max": 55.0}  # the best epoch, not the last
    assert summary["eval/loss"] == {"min": 1.8}
    assert summary["params_m"] == 11.7

    # requeued job: same run dir, same W&B run id
    with RunLogger(run_dir, config=CONFIG, wandb=wandb_offline) as again:
        assert again.wandb_id == run_id
        again.log_epoch({"epoch": 2, "eval_top1": 60.0}, step=6)
    files = list(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
    resumed = [r.run for f in files for r in finished_wandb_records(f) if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in resumed} == {run_id}
    assert any(wandb_history(finished_wandb_records(f)).get(6, {}).get("eval/top1") == 60.0 for f in files)
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id


def test_wandb_unknown_option(tmp_path, wandb_offline):
    with pytest.raises(ValueError, match="projct"):
        RunLogger(tmp_path, config=CONFIG, wandb={"projct": "typo"})


# --------------------------------------------------------------------------------------------------
# Progress


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(run_logging.time, "monotonic", lambda: now[0])
    return now


def test_progress_plain_lines(capsys, clock):
    with Progress(120, description="train epoch 3", log_every=50) as bar:
        for step in range(1, 121):
            clock[0] += 0.5  # 2 steps/s
            bar.update(step, loss=2.3056, img_s=410.2, lr=1.25e-4)
    assert capsys.readouterr().out.splitlines() == [
        "train epoch 3 [50/120] loss 2.31 img/s 410 lr 1.25e-04 eta 0:00:35",  # 70 steps at 2/s
        "train epoch 3 [100/120] loss 2.31 img/s 410 lr 1.25e-04 eta 0:00:10",
        "train epoch 3 [120/120] loss 2.31 img/s 410 lr 1.25e-04 eta 0:00:00",
    ]


def test_progress_resumed_and_cut_short(capsys, clock):
    bar = Progress(500, description="train epoch 1", log_every=50, start=40)
    for step in range(41, 71):
        clock[0] += 1.0
        bar.update(step, loss=1.0)
    bar.close()
    bar.close()
    assert capsys.readouterr().out.splitlines() == [
        "train epoch 1 [50/500] loss 1 eta 0:07:30",  # 10 steps in 10 s, 450 to go
        "train epoch 1 [70/500] loss 1 eta 0:07:10",  # close() prints the last state
    ]


def test_progress_disabled_prints_nothing(capsys):
    with Progress(10, description="train", enabled=False, log_every=1) as bar:
        for step in range(1, 11):
            bar.update(step, loss=1.0)
    assert capsys.readouterr().out == ""


def test_progress_rich_bar_on_tty(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    with Progress(10, description="train epoch 0") as bar:
        bar.update(4, loss=0.5, img_s=100.0)
    text = screen.getvalue()
    assert "train epoch 0" in text and "4/10" in text and "loss 0.5 img/s 100" in text

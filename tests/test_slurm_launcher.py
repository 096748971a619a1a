"""``train.py -m hydra/launcher=slurm`` against the real local cluster (``scripts/slurm_cluster.sh``):
a 2-job sweep, a 2-task DDP job, and a job requeued mid-run that resumes from its checkpoint."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from cli import TINY, command, env, ok, run, steps, summary

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10"]


def sweep(args, sweep_dir: Path, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = command("train.py", ["-m", *LAUNCHER, *args, f"hydra.sweep.dir={sweep_dir}"])
    return subprocess.run(cmd, env=env(cache), capture_output=True, text=True, timeout=timeout)


def job_dirs(sweep_dir: Path):
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_two_job_sweep_completes_with_both_summaries(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    ok(sweep(TINY + ["model=resnet18", "conv=static,odconv_1x"], sweep_dir, tmp_path / "cache"))
    dirs = job_dirs(sweep_dir)
    assert [d.name.split(",")[0] for d in dirs] == ["conv=odconv_1x", "conv=static"]
    for d in dirs:
        rows = summary(d)["rows"]
        assert [r["epoch"] for r in rows] == [1, 2] and (d / "last.pt").exists()


def test_two_task_job_is_one_ddp_run_equal_to_one_process(slurm_cluster, tmp_path):
    """GroupNorm + DY-Conv as in test_train_distributed: 2 SLURM tasks x 4 images == 1 process x 8."""
    cache = tmp_path / "cache"
    args = TINY + ["model=resnet18", "conv=dyconv_4x", "+model.kwargs.norm_layer=groupnorm1",
                   "recipe.optimizer.lr=0.1"]
    ok(sweep(args + ["hydra.launcher.tasks_per_node=2"], tmp_path / "sweep", cache))
    (job,) = job_dirs(tmp_path / "sweep")
    ok(run("train.py", args, tmp_path / "local", cache))
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_0_log.out"))
    assert "2 process(es) on cpu, global batch 8 = 4 x 2 x 1" in logs
    a, b = steps(tmp_path / "local"), steps(job)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert b[s]["train/loss"] == pytest.approx(a[s]["train/loss"], rel=1e-4)


def test_requeued_job_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    cache, sweep_dir = tmp_path / "cache", tmp_path / "sweep"
    # 12 epochs of 4 steps: still running when SLURM kills it KillWait (5 s) after the requeue's SIGTERM
    args = TINY + ["model=resnet18", "conv=odconv_1x", "recipe.epochs=12", "trainer.checkpoint_interval=2"]
    cmd = command("train.py", ["-m", *LAUNCHER, *args, f"hydra.sweep.dir={sweep_dir}"])
    launcher = subprocess.Popen(cmd, env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    job_id, requeued_at = None, None
    while time.time() < deadline and launcher.poll() is None:
        dirs = job_dirs(sweep_dir) if sweep_dir.exists() else []
        if dirs and (dirs[0] / "steps.jsonl").exists() and max(steps(dirs[0]), default=0) >= 5:
            # an array task "<array>_<index>" when submitit submitted an array, else the plain job id
            job_id = min((p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()),
                         key=lambda name: ("_" not in name, name))
            requeued_at = max(steps(dirs[0]))
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
            break
        time.sleep(0.1)
    assert job_id is not None and requeued_at < 48, "the job ended before it could be requeued"
    out, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, out[-3000:]
    (job,) = job_dirs(sweep_dir)
    log = "".join(p.read_text() for p in (sweep_dir / ".submitit" / job_id).glob("*_log.out"))
    assert "(resumed from last.pt at step " in log, log[-3000:]
    resumed_step = int(log.split("(resumed from last.pt at step ")[1].split(")")[0])
    assert 0 < resumed_step < 48
    # the requeued job continued the run: the same losses as an uninterrupted local run
    ok(run("train.py", args, tmp_path / "straight", cache))
    a, b = steps(tmp_path / "straight"), steps(job)
    assert sorted(b) == list(range(1, 49))
    assert [a[s]["train/loss"] for s in sorted(a)] == [b[s]["train/loss"] for s in sorted(b)]

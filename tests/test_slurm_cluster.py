"""A real one-node SLURM cluster (scripts/slurm_cluster.sh) runs batch jobs with several tasks."""

import os
import subprocess
import time
from pathlib import Path
from typing import List, Tuple

import pytest


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def state_without_jobs(node: str, wait_s: float = 540.0, poll_s: float = 0.5) -> Tuple[str, List[str]]:
    """The node's state (``sinfo %T``: idle, idle*, mixed, drained, down, ...) read at a moment when no job
    holds it, and the jobs seen on it while waiting for that moment.

    Jobs of slurm tests running in parallel make a healthy node mixed or allocated for a while, so the state
    is read between two ``squeue`` listings that both show no job on the node; a node still held after
    ``wait_s`` gives its busy state, which is not idle.
    """
    seen: List[str] = []
    deadline = time.monotonic() + wait_s
    while True:
        before = _out("squeue", "-h", "-w", node, "-o", "%i %T").splitlines()
        state = _out("sinfo", "-h", "-n", node, "-o", "%T")
        after = _out("squeue", "-h", "-w", node, "-o", "%i %T").splitlines()
        seen += [job for job in dict.fromkeys(before + after) if job not in seen]
        if not before and not after or time.monotonic() > deadline:
            return state, seen
        time.sleep(poll_s)


@pytest.mark.slurm
def test_node_is_idle(slurm_cluster: str) -> None:
    """With no job on it the node must be idle: not down, drained, not responding (idle*) or left allocated."""
    state, jobs = state_without_jobs(slurm_cluster)
    assert state == "idle", (state, jobs, _out("scontrol", "show", "node", slurm_cluster))


@pytest.mark.slurm
def test_batch_job_with_two_tasks(slurm_cluster: str, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    log = tmp_path / "job.out"
    job = subprocess.run(
        ["sbatch", "--wait", "-n", "2", "-t", "1", "-o", str(log),
         "--wrap", "echo ntasks=$SLURM_NTASKS; srun hostname"],
        capture_output=True, text=True, timeout=60,
    )
    assert job.returncode == 0, job.stdout + job.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "ntasks=2", lines
    assert lines[1:] == [slurm_cluster, slurm_cluster], lines


def _fake_slurm(tmp_path: Path, monkeypatch, states: List[str], jobs: List[str]) -> None:
    """``sinfo`` printing ``states`` one call after another, ``squeue`` printing ``jobs`` likewise."""
    for name, outputs in (("sinfo", states), ("squeue", jobs)):
        answers = tmp_path / f"{name}.answers"
        answers.write_text("\n".join(outputs) + "\n")
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\nhead -n1 {answers}\nsed -i 1d {answers}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("states, jobs, expected", [
    (["idle"], ["", ""], "idle"),
    (["idle*"], ["", ""], "idle*"),  # slurmd not responding
    (["drained"], ["", ""], "drained"),
    (["mixed"], ["", ""], "mixed"),  # allocated CPUs but no job: what test_node_is_idle must refuse
    (["mixed", "mixed", "idle"], ["7 RUNNING", "7 RUNNING", "7 COMPLETING", "", "", ""], "idle"),
])
def test_state_is_read_when_no_job_holds_the_node(tmp_path, monkeypatch, states, jobs, expected):
    """The helper of test_node_is_idle, against stand-in commands: it waits out other tests' jobs and
    reports any other state as it is, so the test fails on a node that is not idle."""
    _fake_slurm(tmp_path, monkeypatch, states, jobs)
    state, seen = state_without_jobs("node", poll_s=0)
    assert state == expected
    assert seen == (["7 RUNNING", "7 COMPLETING"] if len(jobs) > 2 else [])


def test_a_node_held_past_the_wait_is_reported_busy(tmp_path, monkeypatch):
    _fake_slurm(tmp_path, monkeypatch, ["allocated"] * 3, ["7 RUNNING"] * 6)
    assert state_without_jobs("node", wait_s=0, poll_s=0) == ("allocated", ["7 RUNNING"])

"""A real one-node SLURM cluster (scripts/slurm_cluster.sh) runs batch jobs with several tasks."""

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

def test_node_is_idle(slurm_cluster: str) -> None:
    out = subprocess.run(
        ["sinfo", "-h", "-n", slurm_cluster, "-o", "%T"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()
    # Jobs from other tests running at the same time make the node mixed/allocated.
    assert out and out[0] in {"idle", "mixed", "allocated"}, out


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

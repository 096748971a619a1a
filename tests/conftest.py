"""Shared pytest set-up: one torch thread per xdist worker, and a fixed seed for every test."""

import importlib.util
import os
import random
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

# Under pytest-xdist each worker is its own process; one intra-op thread each keeps
# 2 workers on 2 cores from oversubscribing the CPU.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """Build yapf's grammar cache once, before any xdist worker starts.

    mmengine imports yapf, which pickles its grammar into ~/.cache/YAPF on first import and
    renames the file into place before flushing it: on a fresh machine one worker can read
    the other's empty file and fail collection with ``EOFError: Ran out of input``.
    """
    if not hasattr(config, "workerinput") and importlib.util.find_spec("yapf") is not None:
        import yapf  # noqa: F401


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch, random and numpy with 0 before every test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


# ---------------------------------------------------------------------------------------------------
# The local one-node SLURM cluster (tests marked `slurm`)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_cluster.sh"
# scripts/slurm_cluster.sh exits 2 (not root, no sudo) or 3 (apt-get failed) when it cannot
# install the packages; every other failure is a bug and must fail the tests.
CANNOT_INSTALL = {2, 3}


def _run_script(command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Install and start the local cluster once per session; return the node name.

    The cluster is deliberately left running when the session ends: other test modules
    (submitit launcher, requeue) reuse it, and `start` is a no-op when it is already up.
    Stop it by hand with `scripts/slurm_cluster.sh stop`.
    """
    install = _run_script("install", timeout=600)
    if install.returncode in CANNOT_INSTALL:
        reason = f"SLURM packages cannot be installed (exit {install.returncode}): " + (
            install.stderr.strip() or install.stdout.strip()[-500:]
        )
        print(reason)
        pytest.skip(reason)
    assert install.returncode == 0, install.stdout + install.stderr
    start = _run_script("start", timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    return socket.gethostname().split(".")[0]

"""Running ``train.py`` / ``eval.py`` / ``torchrun`` as a user does, in a subprocess, on tiny generated data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

# The default run in miniature: 4 classes of 16 px shapes, 8 + 4 images per class, 4 updates per epoch.
TINY = [
    "data.image_size=16", "data.num_classes=4", "data.train_per_class=8", "data.val_per_class=4",
    "recipe.batch_size=8", "recipe.epochs=2", "trainer.workers=0", "trainer.log_interval=1",
]


def env(cache: Path, **extra: str) -> Dict[str, str]:
    out = {**os.environ, "DYNCONV_CACHE": str(cache), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "HYDRA_FULL_ERROR": "0", **extra}
    out.pop("PYTEST_XDIST_WORKER", None)
    return out


def command(script: str, args: Sequence[str], run_dir: Optional[Path] = None) -> List[str]:
    out = [sys.executable, str(ROOT / script), *args]
    return out + [f"hydra.run.dir={run_dir}"] if run_dir is not None else out


def run(script: str, args: Sequence[str], run_dir: Optional[Path], cache: Path, timeout: float = 300,
        **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, args, run_dir), cwd=ROOT, env=env(cache, **extra_env),
                          capture_output=True, text=True, timeout=timeout)


def torchrun(args: Sequence[str], run_dir: Path, cache: Path, nproc: int = 2,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """``train.py`` under ``torchrun --standalone`` with ``nproc`` processes (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *command("train.py", args, run_dir)[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def steps(run_dir: Path) -> Dict[int, dict]:
    """``steps.jsonl`` as ``{step: metrics}``; a step logged again after a resume counts once, the last time."""
    out: Dict[int, dict] = {}
    for line in (run_dir / "steps.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        out[row["step"]] = row
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())

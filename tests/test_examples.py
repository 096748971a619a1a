"""``examples/custom_family``: a method defined outside dynconv, against the public API only, keeps the same
contract as the built-in families (``test_family_contract.py``), run in a subprocess so that its registration
stays out of the other tests' processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/custom_family/weightnet.py"


def test_weightnet_example_keeps_the_family_contract(tmp_path):
    env = {**os.environ, "DYNCONV_CONTRACT_FAMILIES": EXAMPLE, "DYNCONV_CONTRACT_ONLY": "weightnet",
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                          "--basetemp", str(tmp_path / "pytest"), "tests/test_family_contract.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "weightnet" not in summary and " passed" in summary and "skipped" not in summary, summary

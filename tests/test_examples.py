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


SEARCH_PATH = "hydra.searchpath=[file://examples/custom_family/configs]"


def test_train_and_eval_with_a_custom_family_from_its_config_file(tmp_path):
    """``python train.py conv=weightnet`` with the example's config directory on Hydra's search path trains (the
    config's ``module`` registers the family in the run's process), and ``eval.py`` scores its checkpoint."""
    from cli import TINY, ok, run, summary

    run_dir = tmp_path / "run"
    ok(run("train.py", [SEARCH_PATH, "conv=weightnet", *TINY], run_dir, tmp_path / "cache", timeout=600))
    done = summary(run_dir)["summary"]
    assert done["conv"] == "weightnet" and done["finished"] and done["epochs_done"] == 2
    data = [a for a in TINY if a.startswith("data.")]
    ok(run("eval.py", [SEARCH_PATH, "conv=weightnet", f"checkpoint={run_dir / 'last.pt'}", *data,
                       f"output={tmp_path / 'eval.json'}"], None, tmp_path / "cache", timeout=600))
    assert (tmp_path / "eval.json").is_file()


def test_a_paper_experiment_sweeps_a_custom_family(tmp_path):
    """``experiment=odconv_resnet18 conv=weightnet``: the paper table's recipe, model and rows with the user's
    conv in place of the table's (here on the generated data, with the demo recipe's length)."""
    from cli import TINY, ok, run, summary

    run_dir = tmp_path / "run"
    ok(run("train.py", [SEARCH_PATH, "experiment=odconv_resnet18", "conv=weightnet", "data=synthetic",
                        "recipe.epochs=2", "recipe.scheduler.warmup_epochs=0", *TINY], run_dir, tmp_path / "cache",
           timeout=600))
    done = summary(run_dir)["summary"]
    assert (done["arch"], done["conv"], done["recipe"]) == ("resnet18", "weightnet", "classic_100ep")

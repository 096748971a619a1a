"""``scripts/bench.py`` in a tiny configuration: the JSON and markdown it writes (not its timings)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli import ROOT


@pytest.mark.slow
def test_bench_writes_ratios_to_static_as_json_and_markdown(tmp_path):
    args = ["--cases", "resnet18:odconv_1x,kw_1x", "--image-size", "32", "--batch", "2", "--eval-batch", "2",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert result["command"].startswith("python scripts/bench.py --cases resnet18:odconv_1x,kw_1x")
    assert result["settings"]["batch"] == 2 and result["machine"]["threads"] == 1
    rows = {r["conv"]: r for r in result["rows"]}
    assert list(rows) == ["static", "odconv_1x", "kw_1x"]  # static first, added when not asked for
    for key in ("train_step", "eval_batch", "latency", "train_memory"):
        assert rows["static"][f"{key}_ratio"] == 1.0
    for row in rows.values():
        assert row["arch"] == "resnet18" and row["train_step_s"] > 0 and row["latency_s"] > 0
        assert row["train_memory_mb"] > 0
        for key in ("train_step", "eval_batch", "latency"):
            assert row[f"{key}_ratio"] == pytest.approx(row[f"{key}_s"] / rows["static"][f"{key}_s"], rel=1e-2)
    assert rows["kw_1x"]["params_m"] > rows["static"]["params_m"] and rows["static"]["macs_ratio"] == 1.0
    table = (tmp_path / "bench_cpu.md").read_text()
    assert f"`{result['command']}`" in table
    assert table.count("\n| resnet18 |") == 3
    assert "(<= 1.5)" in table  # odconv_1x's training target is shown beside its ratio


def test_profile_step_writes_each_cases_tables(tmp_path):
    args = ["--convs", "static", "odconv_4x", "--image-size", "32", "--batch", "2", "--steps", "1",
            "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_step.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "profile_cpu_resnet18.md").read_text()
    assert "`python scripts/profile_step.py --convs static odconv_4x" in text
    static, dynamic = text.split("## static")[1].split("## odconv_4x")
    assert "aten::convolution_backward" in static and "Input Shapes" in static
    # the dynamic step's per-sample convs: at 32 px every map is small enough for the matmul path
    assert "aten::bmm" not in static and "aten::bmm" in dynamic

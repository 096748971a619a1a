"""``scripts/bench.py --tables latency`` in a tiny configuration: the JSON and markdown it writes and how a
rerun merges into them (not its timings)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli import ROOT


def _bench(tmp_path, *convs: str) -> dict:
    args = ["--tables", "latency", "--latency-archs", "resnet18", "--latency-convs", *convs, "--runtimes", "eager",
            "--image-size", "32", "--latency-repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "bench_cpu.json").read_text())


@pytest.mark.slow
def test_latency_table_rows_and_merge(tmp_path):
    result = _bench(tmp_path, "odconv_1x")
    assert "rows" not in result  # the speed table did not run
    rows = {r["conv"]: r for r in result["latency"]["rows"]}
    assert list(rows) == ["static", "odconv_1x"]
    static, odconv = rows["static"], rows["odconv_1x"]
    assert static["bound_s"] == static["eager_s"] and static["bound_ratio"] == 1.0  # the bound of static
    assert odconv["bound_s"] > static["eager_s"] and odconv["bytes_mb"] > 0
    assert odconv["eager_bound_ratio"] == pytest.approx(odconv["eager_s"] / odconv["bound_s"], rel=1e-2)
    assert set(odconv["rates"]) == {"bandwidth", "matmul_macs_per_s", "small_macs_per_s"}
    # a rerun of other variants keeps the earlier rows
    result = _bench(tmp_path, "dcd")
    assert [r["conv"] for r in result["latency"]["rows"]] == ["static", "odconv_1x", "dcd"]
    assert len(result["latency"]["commands"]) == 2
    table = (tmp_path / "bench_cpu.md").read_text()
    assert table.count("\n| resnet18 |") == 3
    assert "(<= 1.15)" in table and "(<= 1.3)" in table  # the bound target, and the 1x variants' static one


def test_compiled_models_side_by_side_all_stay_compiled():
    """The compiled column times every model compiled: models that share their ``forward``'s code object (all
    of one timm arch do) each keep a cache entry, where dynamo alone keeps 8 and runs the rest eagerly."""
    import torch
    from torch import nn
    from torch._dynamo.utils import counters

    from dynconv.benchmark import _compiled_side_by_side

    class Scaled(nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.k = k

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.k

    # a class per model, as create_model makes one per variant: the guards on the module's type differ
    models = [type(f"Scaled{k}", (Scaled,), {})(k) for k in range(12)]
    torch._dynamo.reset()
    counters.clear()
    x = torch.ones(2)
    with _compiled_side_by_side(len(models)):
        compiled = [torch.compile(m, backend="eager") for m in models]
        for _ in range(2):  # round-robin, as the benchmark times them
            for k, fn in enumerate(compiled):
                assert fn(x).tolist() == [k, k]
    assert counters["frames"]["ok"] == len(models)
    assert not any("recompile limit" in reason for reason in counters["unimplemented"])
    torch._dynamo.reset()

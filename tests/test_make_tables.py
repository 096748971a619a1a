"""``scripts/make_tables.py`` on finished tiny runs: the right rows, our numbers and the differences."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cli import ROOT, TINY, env, ok, run, summary

pytestmark = pytest.mark.slow


def _tiny_imagenet(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("n01", "n02")):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = np.full((20, 20, 3), 60 + 120 * c, np.uint8) + rng.integers(0, 20, (20, 20, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.JPEG", "JPEG")


def test_tables_from_finished_runs(tmp_path):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    _tiny_imagenet(tmp_path / "imagenet")
    # a (very) short run with the classic recipe on ImageNet-layout data matches the ResNet18 rows
    classic = ["model=resnet18", "conv=static", "recipe=classic_100ep", "recipe.epochs=1", "recipe.batch_size=4",
               "data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.image_size=16", "trainer.workers=0"]
    ok(run("train.py", classic, runs / "classic", cache))
    ok(run("train.py", TINY + ["model=resnet18", "conv=se"], runs / "proxy", cache))
    (runs / "broken").mkdir()
    (runs / "broken" / "summary.json").write_text("{not json")

    out_dir = tmp_path / "tables"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tables.py"), "--runs", str(runs),
                             "--out", str(out_dir), "--tables", "odconv_resnet18"],
                            env=env(cache), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and str(runs / "broken" / "summary.json") in result.stderr  # reported
    table = (out_dir / "odconv_resnet18.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| resnet18 |")]
    assert len(rows) == 11  # every ResNet18 row of paper.csv, run or not

    ours = summary(runs / "classic")["rows"][0]["eval_top1"]
    static = next(r for r in rows if r.startswith("| resnet18 | static |")).split(" | ")
    assert static[3] == "11.69 / 11.69 / +0.00"  # paper params / ours (computed) / difference
    assert static[4] == "1.814 / 1.814 / +0.000"  # MACs counted as the ODConv README counts them
    assert static[5] == f"70.25 / {ours:.2f} / {ours - 70.25:+.2f}"
    assert "recipe=classic_100ep" in static[8] and str(runs / "classic") in static[8]
    odconv = next(r for r in rows if r.startswith("| resnet18 | odconv_4x |") and "MCL" in r).split(" | ")
    assert odconv[3].startswith("44.90 / 44.90 / ") and "not run" in odconv[5]
    assert "Run directories that could not be read:" in table

    proxy = (out_dir / "synthetic_runs.md").read_text()
    se_run = summary(runs / "proxy")
    line = next(l for l in proxy.splitlines() if l.startswith("| resnet18 | se |"))
    assert f"| {max(r['eval_top1'] for r in se_run['rows']):.2f} | {se_run['rows'][-1]['eval_top1']:.2f} |" in line
    assert "resnet18 | static" not in proxy  # the ImageNet-layout run is not a proxy

"""``scripts/make_tables.py`` and ``dynconv.results``: runs fill the right paper rows (run directories the
tests write, and finished tiny runs), with our numbers, the differences, the sources' conflicts and the
figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import ROOT, TINY, env, ok, run, summary
from dynconv.results import Gathered, gather_runs, matches, read_paper, write_tables

PAPER = read_paper(ROOT / "results" / "paper.csv")
TABLES = {row["table"] for row in PAPER}


def _tiny_imagenet(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("n01", "n02")):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = np.full((20, 20, 3), 60 + 120 * c, np.uint8) + rng.integers(0, 20, (20, 20, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.JPEG", "JPEG")


@pytest.mark.slow
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
    assert len(rows) == 12  # every ResNet18 row of paper.csv (11 + the KW paper's KW 2x), run or not

    ours = summary(runs / "classic")["rows"][0]["eval_top1"]
    static = next(r for r in rows if r.startswith("| resnet18 | static |")).split(" | ")
    assert static[3] == "11.69 / 11.69 / +0.00"  # paper params / ours (computed) / difference
    assert static[4] == "1.814 / 1.814 / +0.000"  # MACs counted as the ODConv README counts them
    assert static[5] == f"70.25 / {ours:.2f} / {ours - 70.25:+.2f}"
    # KW 4x: the table's 74.16 and the KW paper text's 73.54, both shown, the sources listed under the table
    kw4x = next(r for r in rows if r.startswith("| resnet18 | kw_4x |")).split(" | ")
    assert kw4x[5].startswith("74.16 (or 73.54 [")
    assert "recipe=classic_100ep" in static[8] and str(runs / "classic") in static[8]
    odconv = next(r for r in rows if r.startswith("| resnet18 | odconv_4x |") and "MCL" in r).split(" | ")
    assert odconv[3].startswith("44.90 / 44.90 / ") and "not run" in odconv[5]
    assert "Run directories that could not be read:" in table

    proxy = (out_dir / "synthetic_runs.md").read_text()
    se_run = summary(runs / "proxy")
    line = next(l for l in proxy.splitlines() if l.startswith("| resnet18 | se |"))
    assert f"| {max(r['eval_top1'] for r in se_run['rows']):.2f} | {se_run['rows'][-1]['eval_top1']:.2f} |" in line
    assert "resnet18 | static" not in proxy  # the ImageNet-layout run is not a proxy


# ---------------------------------------------------------------- matching, with run directories written here

def _run_dir(root: Path, where: str, name: str, arch: str, conv: str, recipe: str, top1: float,
             data: str = "imagenet", **extra) -> Path:
    """A finished run directory as dynconv.engine writes it (``summary.json``: summary and epoch rows)."""
    path = root / where
    path.mkdir(parents=True)
    row = {"epoch": 1, "eval_top1": top1, "eval_top5": top1 + 10, "eval_bbox_AP": top1, "eval_segm_AP": top1 - 1}
    path.joinpath("summary.json").write_text(json.dumps({
        "summary": {"name": name, "arch": arch, "conv": conv, "recipe": recipe, "data": data, **extra},
        "rows": [row]}))
    return path


def _count(arch, conv):  # (params M, MACs G): the tables print them; matching does not depend on them
    return 1.0, 0.1


def _cells(md: Path, arch: str, conv: str, source: str = ""):
    lines = [l for l in md.read_text().splitlines() if l.startswith(f"| {arch} | {conv} |") and source in l]
    assert len(lines) == 1, lines
    return lines[0].split(" | ")


def test_runs_fill_only_their_experiments_table_and_recipe(tmp_path):
    runs = tmp_path / "runs"
    # experiment=kw_mobilenetv2 trains recipe kw_mobilenetv2_150ep: the KW rows, never the ODConv ones
    _run_dir(runs, "kw", "kw_mobilenetv2", "mobilenetv2_100", "static", "kw_mobilenetv2_150ep", 11.0)
    # what such a run reported before it had its own recipe name: it fills no row at all
    _run_dir(runs, "kw_old", "kw_mobilenetv2", "mobilenetv2_050", "static", "mobilenetv2_150ep", 99.0)
    # experiment=odconv_mobilenetv2: its own rows only
    _run_dir(runs, "od", "odconv_mobilenetv2", "mobilenetv2_075", "static", "mobilenetv2_150ep", 22.0)
    # no experiment (name=default), the ODConv recipe by name: the rows of every table with that recipe
    _run_dir(runs, "plain", "default", "mobilenetv2_050", "odconv_1x", "mobilenetv2_150ep", 33.0)
    # an experiment without a paper table (a name of the user's) counts as no experiment
    _run_dir(runs, "mine", "my_sweep", "resnet18", "static", "classic_100ep", 44.0)
    # a run of the KW 300-epoch table does not fill the ODConv 100-epoch rows of the same (arch, conv)
    _run_dir(runs, "kw18", "kw_resnet18", "resnet18", "kw_4x", "convnext_300ep", 55.0)
    # generated data never fills a paper row
    _run_dir(runs, "proxy", "odconv_mobilenetv2", "mobilenetv2_100", "odconv_4x", "mobilenetv2_150ep", 66.0,
             data="synthetic")
    gathered = gather_runs([runs])
    out = tmp_path / "tables"
    write_tables(PAPER, gathered, out, _count, ["kw_mobilenetv2", "odconv_mobilenetv2", "odconv_resnet18",
                                                "kw_resnet18"], figures=False)

    assert _cells(out / "kw_mobilenetv2.md", "mobilenetv2_100", "static")[5] == "72.04 / 11.00 / -61.04"
    assert "not run" in _cells(out / "odconv_mobilenetv2.md", "mobilenetv2_100", "static")[5]
    assert "not run" in _cells(out / "odconv_mobilenetv2.md", "mobilenetv2_050", "static")[5]
    assert "not run" in _cells(out / "kw_mobilenetv2.md", "mobilenetv2_050", "static")[5]
    assert _cells(out / "odconv_mobilenetv2.md", "mobilenetv2_075", "static")[5].startswith("69.18 / 22.00 /")
    assert _cells(out / "odconv_mobilenetv2.md", "mobilenetv2_050", "odconv_1x")[5].startswith("68.06 / 33.00 /")
    assert "experiment `default`" in _cells(out / "odconv_mobilenetv2.md", "mobilenetv2_050", "odconv_1x")[8]
    assert _cells(out / "odconv_resnet18.md", "resnet18", "static")[5].startswith("70.25 / 44.00 /")
    assert "not run" in _cells(out / "odconv_resnet18.md", "resnet18", "kw_4x")[5]
    assert _cells(out / "kw_resnet18.md", "resnet18", "kw_4x")[5].startswith("76.05 / 55.00 /")
    assert "not run" in _cells(out / "odconv_mobilenetv2.md", "mobilenetv2_100", "odconv_4x")[5]

    # the same rules through matches() itself, row by row
    by_path = {r.path.name: r for r in gathered.runs}
    filled = {name: {(row["table"], row["arch"], row["conv"]) for row in PAPER if matches(run, row, TABLES)}
              for name, run in by_path.items()}
    assert filled["kw"] == {("kw_mobilenetv2", "mobilenetv2_100", "static")}
    assert filled["kw_old"] == filled["proxy"] == set()
    assert filled["od"] == {("odconv_mobilenetv2", "mobilenetv2_075", "static")}
    assert filled["plain"] == {("odconv_mobilenetv2", "mobilenetv2_050", "odconv_1x")}
    assert filled["mine"] == {("odconv_resnet18", "resnet18", "static")}
    assert filled["kw18"] == {("kw_resnet18", "resnet18", "kw_4x")}


def test_detection_runs_fill_rows_of_their_detector(tmp_path):
    runs = tmp_path / "runs"
    _run_dir(runs, "mask", "odconv_coco", "resnet50", "odconv_4x", "det_1x_sgd", 41.0, data="coco",
             task="detection", detector="mask_rcnn")
    _run_dir(runs, "kw", "kw_coco", "resnet50", "odconv_4x", "det_1x_adamw", 43.0, data="coco",
             task="detection", detector="mask_rcnn")
    (mask, kw) = sorted(gather_runs([runs]).runs, key=lambda r: r.path.name, reverse=True)
    assert {(r["table"], r["detector"]) for r in PAPER if matches(mask, r, TABLES)} == {("odconv_coco", "mask_rcnn")}
    assert {(r["table"], r["detector"]) for r in PAPER if matches(kw, r, TABLES)} == {("kw_coco", "mask_rcnn")}


def test_conflicts_are_shown_with_both_sources_and_figures_are_linked(tmp_path):
    runs = tmp_path / "runs"
    _run_dir(runs, "r18", "odconv_resnet18", "resnet18", "condconv_8x", "classic_100ep", 71.0)
    out = tmp_path / "tables"
    written = write_tables(PAPER, gather_runs([runs]), out, _count, ["odconv_resnet18", "odconv_coco_paper"],
                           detection_count=lambda detector, arch, conv: 40.0)
    md = (out / "odconv_resnet18.md").read_text()
    cond = _cells(out / "odconv_resnet18.md", "resnet18", "condconv_8x")
    n = cond[5].split("[")[1].split("]")[0]
    assert cond[5] == f"71.99 (or 72.03 [{n}]) / 71.00 / -0.99"  # the difference is against the row's value
    assert (f"[{n}] resnet18 condconv_8x, top-1: 71.99 from ODConv and KW papers' ResNet18 table, via MCL; "
            "72.03 from ODConv paper text") in md
    assert "73.54" in _cells(out / "odconv_resnet18.md", "resnet18", "kw_4x")[5]
    # FDConv's FLOPs stay FLOPs: a column of their own in the COCO table
    static = _cells(out / "odconv_coco_paper.md", "resnet50", "static")
    assert static[5] == "207.10" and "FLOPs (G) paper" in (out / "odconv_coco_paper.md").read_text()

    for name in ("odconv_resnet18", "odconv_coco_paper"):
        png = written[f"{name}.png"]
        assert png == out / f"{name}.png" and f"]({name}.png)" in (out / f"{name}.md").read_text()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 300
    # drawn again from the same numbers, the figure is the same file byte for byte (it is committed)
    first = (out / "odconv_resnet18.png").read_bytes()
    write_tables(PAPER, gather_runs([runs]), out, _count, ["odconv_resnet18"])
    assert (out / "odconv_resnet18.png").read_bytes() == first
    # and a run changes it: our point is drawn
    _run_dir(runs, "r18b", "odconv_resnet18", "resnet18", "static", "classic_100ep", 60.0)
    write_tables(PAPER, gather_runs([runs]), out, _count, ["odconv_resnet18"])
    assert (out / "odconv_resnet18.png").read_bytes() != first


def test_every_table_group_gets_its_figure(tmp_path):
    written = write_tables(PAPER, Gathered(), tmp_path, _count, detection_count=lambda d, a, c: 40.0)
    assert {p.name for p in written.values() if p.suffix == ".png"} == {f"{t}.png" for t in TABLES}

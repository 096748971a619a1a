"""Results tables: the papers' numbers (``results/paper.csv``) beside ours, from finished run directories.

A run directory is anything holding a ``summary.json`` written by :mod:`dynconv.engine` (``runs/``,
``multirun/``, SLURM sweep directories). A run matches a paper row when arch and conv agree and it
ran the row's experiment (``experiment=<table>``, e.g. ``kw_resnet18``) or recipe. Parameters and MACs are computed for every
row (``count_params`` / ``count_macs`` at 224 px), accuracies filled where a run exists. Runs on the
generated data are proxies and get their own table. A directory whose summary cannot be read is
reported, never silently dropped.

Detection rows (``task=detection``) match runs of the same detector too and show box and mask AP of
the run's last epoch (the papers report the final 1x model); their parameter count is that of our
torchvision detector with COCO's 80 classes.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

Counter = Callable[[str, str], Tuple[float, float]]  # (arch, conv) -> (params in M, MACs in G)


@dataclass
class Run:
    path: Path
    summary: dict
    rows: List[dict]

    @property
    def key(self) -> Tuple[str, str]:
        return self.summary["arch"], self.summary["conv"]

    @property
    def detection(self) -> bool:
        return self.summary.get("task") == "detection"

    def best_row(self) -> dict:
        return max(self.rows, key=lambda r: r.get("eval_top1", float("-inf")))


@dataclass
class Gathered:
    runs: List[Run] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)


def gather_runs(roots: Iterable[Path]) -> Gathered:
    """Every ``summary.json`` under ``roots``; unreadable or incomplete ones go to ``problems``."""
    out = Gathered()
    for root in roots:
        for path in sorted(Path(root).rglob("summary.json")):
            try:
                data = json.loads(path.read_text())
                summary, rows = data["summary"], data["rows"]
                if not rows or not all(k in summary for k in ("arch", "conv", "recipe", "data")):
                    raise KeyError("no epoch rows, or arch / conv / recipe / data missing from its summary")
                out.runs.append(Run(path.parent, summary, rows))
            except (OSError, ValueError, KeyError, TypeError) as err:
                out.problems.append(f"{path}: {type(err).__name__}: {err}")
    return out


def read_paper(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


SYNTHETIC_DATA = ("synthetic", "synthetic_coco")


def matches(run: Run, row: dict) -> bool:
    """Same task, arch, conv (and detector), real data, and the row's experiment (table) or recipe."""
    s = run.summary
    setting = s.get("name") == row["table"] or row["recipe"] in (s["recipe"], s.get("name"))
    same_task = run.detection == (row.get("task") == "detection") and \
        (not run.detection or s.get("detector") == row.get("detector"))
    return run.key == (row["arch"], row["conv"]) and s["data"] not in SYNTHETIC_DATA and setting and same_task


def dynconv_counter(image_size: int = 224) -> Counter:
    """Parameters (M) and MACs (G) of ``create_model(arch, conv)``, computed once per pair."""
    import dynconv

    cache: Dict[Tuple[str, str], Tuple[float, float]] = {}

    def count(arch: str, conv: str) -> Tuple[float, float]:
        if (arch, conv) not in cache:
            model = dynconv.create_model(arch, conv)
            cache[arch, conv] = (dynconv.count_params(model) / 1e6,
                                 dynconv.count_macs(model, (1, 3, image_size, image_size)) / 1e9)
        return cache[arch, conv]

    return count


DetectionCounter = Callable[[str, str, str], float]  # (detector, arch, conv) -> params in M


def detection_counter(num_classes: int = 81) -> DetectionCounter:
    """Parameters (M) of ``create_detector(detector, arch, conv)`` for COCO (80 classes + background)."""
    from .detection import create_detector
    from .accounting import count_params

    cache: Dict[Tuple[str, str, str], float] = {}

    def count(detector: str, arch: str, conv: str) -> float:
        if (detector, arch, conv) not in cache:
            model = create_detector(detector, arch, conv, num_classes=num_classes)
            cache[detector, arch, conv] = count_params(model) / 1e6
        return cache[detector, arch, conv]

    return count


def _num(text: str) -> Optional[float]:
    return float(text) if text not in ("", None) else None


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _delta(ours: Optional[float], paper: Optional[float], digits: int = 2) -> str:
    if ours is None or paper is None:
        return ""
    return f"{round(ours - paper, digits) + 0.0:+.{digits}f}"  # + 0.0: no "-0.00"


def _config(run: Run) -> str:
    s = run.summary
    where = os.path.relpath(run.path)
    where = where if not where.startswith("..") else str(run.path)
    return f"experiment `{s.get('name', '-')}`: model={s['arch']} conv={s['conv']} recipe={s['recipe']} ({where})"


CLASSIFICATION_HEADER = ("| arch | conv | recipe | params (M) paper / ours / diff | MACs (G) paper / ours / diff "
                         "| top-1 paper / ours / diff | top-5 paper / ours | source | our run |")


def classification_table(rows: List[dict], runs: List[Run], count: Counter) -> List[str]:
    """Markdown lines of one classification table group."""
    lines = [CLASSIFICATION_HEADER, "|" + "---|" * 9]
    for row in rows:
        params, macs = count(row["arch"], row["conv"])
        p_params, p_macs, p_top1, p_top5 = (_num(row[k]) for k in ("params_m", "macs_g", "top1", "top5"))
        found = [r for r in runs if matches(r, row)]
        best = max(found, key=lambda r: r.best_row()["eval_top1"]) if found else None
        top1 = best.best_row()["eval_top1"] if best else None
        top5 = best.best_row().get("eval_top5") if best else None
        ours = _fmt(top1) if best else "not run"
        lines.append(
            f"| {row['arch']} | {row['conv']} | {row['recipe']} "
            f"| {_fmt(p_params)} / {params:.2f} / {_delta(params, p_params)} "
            f"| {_fmt(p_macs, 3)} / {macs:.3f} / {_delta(macs, p_macs, 3)} "
            f"| {_fmt(p_top1)} / {ours} / {_delta(top1, p_top1)} | {_fmt(p_top5)} / {_fmt(top5)} "
            f"| {row['source']} | {_config(best) if best else ''} |")
    return lines


DETECTION_HEADER = ("| arch | conv | detector | recipe | params (M) paper / ours / diff | box AP paper / ours / diff "
                    "| mask AP paper / ours / diff | source | our run |")


def detection_table(rows: List[dict], runs: List[Run], count: DetectionCounter) -> List[str]:
    """Markdown lines of one detection table group (AP of a matching run's last epoch)."""
    lines = [DETECTION_HEADER, "|" + "---|" * 9]
    for row in rows:
        params = count(row["detector"], row["arch"], row["conv"])
        p_params, p_box, p_mask = (_num(row[k]) for k in ("params_m", "box_ap", "mask_ap"))
        found = [r for r in runs if matches(r, row)]
        run = max(found, key=lambda r: r.rows[-1].get("eval_bbox_AP") or 0.0) if found else None
        last = run.rows[-1] if run else {}
        box, mask = last.get("eval_bbox_AP"), last.get("eval_segm_AP")
        ours_box = _fmt(box) if run else "not run"
        ours_mask = _fmt(mask) if run else ("not run" if p_mask is not None else "")
        lines.append(
            f"| {row['arch']} | {row['conv']} | {row['detector']} | {row['recipe']} "
            f"| {_fmt(p_params)} / {params:.2f} / {_delta(params, p_params)} "
            f"| {_fmt(p_box, 1)} / {ours_box} / {_delta(box, p_box, 1)} "
            f"| {_fmt(p_mask, 1)} / {ours_mask} / {_delta(mask, p_mask, 1)} "
            f"| {row['source']} | {_config(run) if run else ''} |")
    return lines


DETECTION_NOTE = ("Params: `dynconv.count_params` of our torchvision detector for COCO (80 classes). The "
                  "papers' mmdet counts include the backbone's unused ImageNet classifier (2.05M for "
                  "ResNet50, 1.28M for MobileNetV2), which ours leave out: expect those differences.")


def proxy_table(runs: List[Run]) -> List[str]:
    """Runs on the generated data: no paper number to compare with, our numbers only."""
    lines = ["| arch | conv | recipe | epochs | params (M) | MACs (G) at run size | best top-1 | final top-1 | run |",
             "|" + "---|" * 9]
    for run in sorted(runs, key=lambda r: (r.key, r.summary["recipe"], str(r.path))):
        s = run.summary
        lines.append(f"| {s['arch']} | {s['conv']} | {s['recipe']} | {s.get('epochs_done', len(run.rows))} "
                     f"| {s.get('params', 0) / 1e6:.2f} | {s.get('macs', 0) / 1e9:.4f} "
                     f"| {run.best_row()['eval_top1']:.2f} | {run.rows[-1]['eval_top1']:.2f} | {_config(run)} |")
    return lines


def detection_proxy_table(runs: List[Run]) -> List[str]:
    """Detection runs on the generated COCO-layout data: our AP only."""
    lines = ["| arch | conv | detector | recipe | epochs | params (M) | best box AP | final box AP | final mask AP | run |",
             "|" + "---|" * 10]
    for run in sorted(runs, key=lambda r: (r.summary.get("detector", ""), r.key, str(r.path))):
        s, last = run.summary, run.rows[-1]
        best = max((r.get("eval_bbox_AP") or 0.0) for r in run.rows)
        lines.append(f"| {s['arch']} | {s['conv']} | {s.get('detector', '')} | {s['recipe']} "
                     f"| {s.get('epochs_done', len(run.rows))} | {s.get('params', 0) / 1e6:.2f} | {best:.2f} "
                     f"| {_fmt(last.get('eval_bbox_AP'))} | {_fmt(last.get('eval_segm_AP'))} | {_config(run)} |")
    return lines


def write_tables(paper: List[dict], gathered: Gathered, out_dir: Path, count: Counter,
                 tables: Optional[List[str]] = None,
                 detection_count: Optional[DetectionCounter] = None) -> Dict[str, Path]:
    """One markdown file per table group of ``paper`` (detection groups only with ``detection_count``),
    plus ``synthetic_runs.md``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    groups: Dict[str, List[dict]] = {}
    for row in paper:
        wanted = row["task"] == "classification" or (row["task"] == "detection" and detection_count is not None)
        if wanted and (tables is None or row["table"] in tables):
            groups.setdefault(row["table"], []).append(row)
    problems = [f"- {p}" for p in gathered.problems]
    for name, rows in groups.items():
        if rows[0]["task"] == "detection":
            lines = ["Paper numbers from `results/paper.csv`; ours from the run directories (last epoch). "
                     + DETECTION_NOTE, "", *detection_table(rows, gathered.runs, detection_count)]
        else:
            lines = ["Paper numbers from `results/paper.csv`; ours from the run directories. "
                     "Params and MACs are `dynconv.count_params` / `count_macs` at 224 px.", "",
                     *classification_table(rows, gathered.runs, count)]
        body = [f"# {name}", "", *lines]
        if problems:
            body += ["", "Run directories that could not be read:", *problems]
        written[name] = out_dir / f"{name}.md"
        written[name].write_text("\n".join(body) + "\n")
    proxies = [r for r in gathered.runs if r.summary["data"] == "synthetic" and not r.detection]
    body = ["# Runs on the generated data (proxies, no paper numbers)", "", *proxy_table(proxies)]
    detection_proxies = [r for r in gathered.runs if r.summary["data"] == "synthetic_coco" and r.detection]
    if detection_proxies:
        body += ["", "## Detection on synthetic_coco", "", *detection_proxy_table(detection_proxies)]
    if problems:
        body += ["", "Run directories that could not be read:", *problems]
    written["synthetic_runs"] = out_dir / "synthetic_runs.md"
    written["synthetic_runs"].write_text("\n".join(body) + "\n")
    return written

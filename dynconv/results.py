"""Results tables: the papers' numbers (``results/paper.csv``) beside ours, from finished run directories.

A run directory is anything holding a ``summary.json`` written by :mod:`dynconv.engine` (``runs/``,
``multirun/``, SLURM sweep directories). A run matches a paper row when arch and conv agree and it
ran the row's experiment (``experiment=<table>``, e.g. ``kw_resnet18``) or recipe. Parameters and MACs are computed for every
row (``count_params`` / ``count_macs`` at 224 px), accuracies filled where a run exists. Runs on the
generated data are proxies and get their own table. A directory whose summary cannot be read is
reported, never silently dropped.
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


def matches(run: Run, row: dict) -> bool:
    """Same arch and conv, real data, and the row's experiment (table) or recipe."""
    s = run.summary
    setting = s.get("name") == row["table"] or row["recipe"] in (s["recipe"], s.get("name"))
    return run.key == (row["arch"], row["conv"]) and s["data"] != "synthetic" and setting


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


def write_tables(paper: List[dict], gathered: Gathered, out_dir: Path, count: Counter,
                 tables: Optional[List[str]] = None) -> Dict[str, Path]:
    """One markdown file per classification table group, plus ``synthetic_runs.md``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    groups: Dict[str, List[dict]] = {}
    for row in paper:
        if row["task"] == "classification" and (tables is None or row["table"] in tables):
            groups.setdefault(row["table"], []).append(row)
    problems = [f"- {p}" for p in gathered.problems]
    for name, rows in groups.items():
        body = [f"# {name}", "", "Paper numbers from `results/paper.csv`; ours from the run directories. "
                "Params and MACs are `dynconv.count_params` / `count_macs` at 224 px.", "",
                *classification_table(rows, gathered.runs, count)]
        if problems:
            body += ["", "Run directories that could not be read:", *problems]
        written[name] = out_dir / f"{name}.md"
        written[name].write_text("\n".join(body) + "\n")
    proxies = [r for r in gathered.runs if r.summary["data"] == "synthetic"]
    body = ["# Runs on the generated data (proxies, no paper numbers)", "", *proxy_table(proxies)]
    if problems:
        body += ["", "Run directories that could not be read:", *problems]
    written["synthetic_runs"] = out_dir / "synthetic_runs.md"
    written["synthetic_runs"].write_text("\n".join(body) + "\n")
    return written

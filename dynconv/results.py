"""Results tables: the papers' numbers (``results/paper.csv``) beside ours, from finished run directories.

A run directory is anything holding a ``summary.json`` written by :mod:`dynconv.engine` (``runs/``,
``multirun/``, SLURM sweep directories). Which paper rows a run fills:

- arch, conv (and for COCO rows the detector) agree, and the run trained on real data (runs on the
  generated ``synthetic`` / ``synthetic_coco`` data are proxies and get their own table);
- the run's recipe name equals the row's ``recipe``. An experiment that changes a recipe gives it its
  own ``recipe.name`` (``experiment=kw_mobilenetv2`` trains ``kw_mobilenetv2_150ep``), so its runs never
  fill the rows of another paper's recipe (the ODConv MobileNetV2 rows are ``mobilenetv2_150ep``);
- a run of an experiment that has a table (its ``name``, e.g. ``kw_resnet18``, is a ``table`` of
  ``paper.csv``) fills only that table's rows; any other run (``name=default`` or a name of the user's)
  fills the rows of every table whose recipe it ran.

Where several runs fill a row, the best one is shown, with the config and directory that produced it.
Parameters and MACs are computed for every row (``count_params`` / ``count_macs`` at 224 px). A
directory whose summary cannot be read is reported, never silently dropped.

Where the sources disagree on a value (a README against the paper text, say), ``paper.csv`` keeps the
row's value with its ``source`` and the other value with its own source in ``conflicts``
(``field=value [source]``, several joined by ``"; "``); the tables print both and list the sources.

Detection rows (``task=detection``) match runs of the same detector too and show box and mask AP of
the run's last epoch (the papers report the final 1x model); their parameter count is that of our
torchvision detector with COCO's 80 classes.

:func:`write_tables` also draws each table group's figure (``<table>.png``: top-1 or box AP against
parameters and against MACs, the papers' points and ours, one marker per method), linked from its
markdown file. Drawing needs matplotlib (the ``train`` extra).
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Dict, Iterable, List, Optional, Tuple

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


# ------------------------------------------------------------------------------------ paper.csv

@dataclass(frozen=True)
class Conflict:
    """Another source's value for one field of a paper row."""
    field: str
    value: float
    source: str


_ENTRY = r"(\w+)=([-+]?\d+(?:\.\d+)?) \[([^\]]+)\]"
_CONFLICTS = re.compile(rf"{_ENTRY}(?:; {_ENTRY})*")
VALUE_FIELDS = ("params_m", "macs_g", "flops_g", "top1", "top5", "box_ap", "mask_ap")


def conflicts(row: dict) -> List[Conflict]:
    """The ``conflicts`` column of a paper row: ``field=value [source]``, several joined by ``"; "``."""
    text = (row.get("conflicts") or "").strip()
    if not text:
        return []
    if not _CONFLICTS.fullmatch(text):
        raise ValueError(f"paper row {row.get('table')}/{row.get('arch')}/{row.get('conv')}: conflicts "
                         f"{text!r} is not 'field=value [source]; ...'")
    found = [Conflict(f, float(v), s) for f, v, s in re.findall(_ENTRY, text)]
    for c in found:
        if c.field not in VALUE_FIELDS:
            raise ValueError(f"paper row {row.get('table')}/{row.get('arch')}/{row.get('conv')}: conflicts "
                             f"name {c.field!r}, not one of {', '.join(VALUE_FIELDS)}")
    return found


def read_paper(path: Path) -> List[dict]:
    """The rows of ``paper.csv``; a malformed ``conflicts`` cell raises ValueError naming its row."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        conflicts(row)
    return rows


SYNTHETIC_DATA = ("synthetic", "synthetic_coco")


def matches(run: Run, row: dict, tables: Collection[str]) -> bool:
    """Whether ``run`` fills paper ``row`` (the rules are in the module docstring).

    ``tables``: every table name of ``paper.csv``; a run whose experiment ``name`` is one of them fills
    only that table's rows.
    """
    s = run.summary
    name = s.get("name")
    same_task = run.detection == (row.get("task") == "detection") and \
        (not run.detection or s.get("detector") == row.get("detector"))
    setting = s["recipe"] == row["recipe"] and (name not in tables or name == row["table"])
    return run.key == (row["arch"], row["conv"]) and s["data"] not in SYNTHETIC_DATA and same_task and setting


# ---------------------------------------------------------------------------------- counting

def dynconv_counter(image_size: int = 224) -> Counter:
    """Parameters (M) and MACs (G) of ``create_model(arch, conv)``, computed once per pair."""
    from .accounting import count_macs, count_params
    from .models import create_model

    cache: Dict[Tuple[str, str], Tuple[float, float]] = {}

    def count(arch: str, conv: str) -> Tuple[float, float]:
        if (arch, conv) not in cache:
            model = create_model(arch, conv)
            cache[arch, conv] = (count_params(model) / 1e6, count_macs(model, (1, 3, image_size, image_size)) / 1e9)
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


# ------------------------------------------------------------------------------------- entries

@dataclass
class Entry:
    """One paper row with our numbers: counted params / MACs and, where a run matches, its metrics."""
    row: dict
    params: float
    macs: Optional[float] = None  # classification only: our detectors' MACs are not counted
    run: Optional[Run] = None
    metrics: Dict[str, Optional[float]] = field(default_factory=dict)  # paper.csv field -> ours

    def paper(self, key: str) -> Optional[float]:
        return _num(self.row.get(key))


def classification_entries(rows: List[dict], runs: List[Run], count: Counter,
                           tables: Collection[str]) -> List[Entry]:
    """Every row with our counts and the best matching run's best epoch."""
    out = []
    for row in rows:
        params, macs = count(row["arch"], row["conv"])
        found = [r for r in runs if matches(r, row, tables)]
        best = max(found, key=lambda r: r.best_row()["eval_top1"]) if found else None
        metrics = {"top1": best.best_row()["eval_top1"], "top5": best.best_row().get("eval_top5")} if best else {}
        out.append(Entry(row, params, macs, best, metrics))
    return out


def detection_entries(rows: List[dict], runs: List[Run], count: DetectionCounter,
                      tables: Collection[str]) -> List[Entry]:
    """Every row with our detector's parameter count and the matching run's last-epoch AP."""
    out = []
    for row in rows:
        params = count(row["detector"], row["arch"], row["conv"])
        found = [r for r in runs if matches(r, row, tables)]
        run = max(found, key=lambda r: r.rows[-1].get("eval_bbox_AP") or 0.0) if found else None
        last = run.rows[-1] if run else {}
        metrics = {"box_ap": last.get("eval_bbox_AP"), "mask_ap": last.get("eval_segm_AP")} if run else {}
        out.append(Entry(row, params, None, run, metrics))
    return out


# -------------------------------------------------------------------------------------- tables

def _num(text: Optional[str]) -> Optional[float]:
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


FIELD_LABELS = {"params_m": "params (M)", "macs_g": "MACs (G)", "flops_g": "FLOPs (G)", "top1": "top-1",
                "top5": "top-5", "box_ap": "box AP", "mask_ap": "mask AP"}


class Notes:
    """The numbered list of conflicting sources under a table; cells refer to it as ``[n]``."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def cell(self, row: dict, key: str, digits: int) -> str:
        """The paper's value of ``key``, followed by every other source's value and its note number."""
        text = _fmt(_num(row.get(key)), digits)
        for c in conflicts(row):
            if c.field == key:
                self.lines.append(
                    f"[{len(self.lines) + 1}] {_row_name(row)}, {FIELD_LABELS[key]}: {text or '(none)'} from "
                    f"{row['source']}; {c.value:.{digits}f} from {c.source}.")
                text += f" (or {c.value:.{digits}f} [{len(self.lines)}])"
        return text

    def section(self) -> List[str]:
        if not self.lines:
            return []
        return ["", "Where the sources disagree (`results/paper.csv` keeps both; the differences above are "
                    "against the first value):", "", *[f"- {line}" for line in self.lines]]


def _row_name(row: dict) -> str:
    return " ".join(v for v in (row["arch"], row["conv"], row.get("detector") or "") if v)


CLASSIFICATION_HEADER = ("| arch | conv | recipe | params (M) paper / ours / diff | MACs (G) paper / ours / diff "
                         "| top-1 paper / ours / diff | top-5 paper / ours | source | our run |")


def classification_table(entries: List[Entry], notes: Notes) -> List[str]:
    """Markdown lines of one classification table group."""
    lines = [CLASSIFICATION_HEADER, "|" + "---|" * 9]
    for e in entries:
        row = e.row
        p_params, p_macs, p_top1 = e.paper("params_m"), e.paper("macs_g"), e.paper("top1")
        top1, top5 = e.metrics.get("top1"), e.metrics.get("top5")
        ours = _fmt(top1) if e.run else "not run"
        lines.append(
            f"| {row['arch']} | {row['conv']} | {row['recipe']} "
            f"| {notes.cell(row, 'params_m', 2)} / {e.params:.2f} / {_delta(e.params, p_params)} "
            f"| {notes.cell(row, 'macs_g', 3)} / {e.macs:.3f} / {_delta(e.macs, p_macs, 3)} "
            f"| {notes.cell(row, 'top1', 2)} / {ours} / {_delta(top1, p_top1)} "
            f"| {notes.cell(row, 'top5', 2)} / {_fmt(top5)} "
            f"| {row['source']} | {_config(e.run) if e.run else ''} |")
    return lines


DETECTION_HEADER = ("| arch | conv | detector | recipe | params (M) paper / ours / diff | FLOPs (G) paper "
                    "| box AP paper / ours / diff | mask AP paper / ours / diff | source | our run |")


def detection_table(entries: List[Entry], notes: Notes) -> List[str]:
    """Markdown lines of one detection table group (AP of a matching run's last epoch)."""
    lines = [DETECTION_HEADER, "|" + "---|" * 10]
    for e in entries:
        row = e.row
        p_params, p_box, p_mask = e.paper("params_m"), e.paper("box_ap"), e.paper("mask_ap")
        box, mask = e.metrics.get("box_ap"), e.metrics.get("mask_ap")
        ours_box = _fmt(box) if e.run else "not run"
        ours_mask = _fmt(mask) if e.run else ("not run" if p_mask is not None else "")
        lines.append(
            f"| {row['arch']} | {row['conv']} | {row['detector']} | {row['recipe']} "
            f"| {notes.cell(row, 'params_m', 2)} / {e.params:.2f} / {_delta(e.params, p_params)} "
            f"| {notes.cell(row, 'flops_g', 2)} "
            f"| {notes.cell(row, 'box_ap', 1)} / {ours_box} / {_delta(box, p_box, 1)} "
            f"| {notes.cell(row, 'mask_ap', 1)} / {ours_mask} / {_delta(mask, p_mask, 1)} "
            f"| {row['source']} | {_config(e.run) if e.run else ''} |")
    return lines


DETECTION_NOTE = ("Params: `dynconv.count_params` of our torchvision detector for COCO (80 classes). The "
                  "papers' mmdet counts include the backbone's unused ImageNet classifier (2.05M for "
                  "ResNet50, 1.28M for MobileNetV2), which ours leave out: expect those differences. FLOPs: "
                  "as the source labels them (the FDConv README's copy of the ODConv and KW papers' COCO "
                  "tables, input size not stated); our detectors' MACs are not counted.")


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


# ------------------------------------------------------------------------------------- figures

# Markers in the order a figure's methods first appear: the most distinct shapes first.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "p", "d", "h", "x", "+", "H", "8")
PAPER_COLOR, OURS_COLOR = "tab:blue", "tab:orange"


def _panels(entries: List[Entry], detection: bool) -> List[Tuple[str, str, str, str]]:
    """(title, metric field, paper x field, detector or "") for each panel of a table group's figure."""
    if not detection:
        return [("top-1 against parameters", "top1", "params_m", ""), ("top-1 against MACs", "top1", "macs_g", "")]
    panels = []
    for detector in dict.fromkeys(e.row["detector"] for e in entries):
        mine = [e for e in entries if e.row["detector"] == detector]
        panels.append((f"{detector}: box AP against parameters", "box_ap", "params_m", detector))
        if any(e.paper("flops_g") is not None for e in mine):
            panels.append((f"{detector}: box AP against FLOPs (paper's count)", "box_ap", "flops_g", detector))
    return panels


X_LABELS = {"params_m": "parameters (M)", "macs_g": "MACs (G) at 224 px", "flops_g": "FLOPs (G), as the source labels them"}


def draw_figure(name: str, entries: List[Entry], path: Path, detection: bool = False) -> Path:
    """The figure the papers lead with, for one table group: the metric against parameters and against
    MACs (FLOPs for COCO, where the paper gives them), the papers' points and ours, one marker per method.

    A paper point the paper gives no count for sits at our count, drawn hollow; a conflicting source's
    value is drawn faded, joined to the row's value by a dotted line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = _panels(entries, detection)
    convs = list(dict.fromkeys(e.row["conv"] for e in entries))
    markers = {c: MARKERS[i % len(MARKERS)] for i, c in enumerate(convs)}
    drawn = set()  # which kinds of point the legend must explain
    fig = Figure(figsize=(6.0 * len(panels), 4.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    archs = list(dict.fromkeys(e.row["arch"] for e in entries))
    # One backbone family in several widths / depths: each method's points form its curve, as in the
    # papers' figures. Different families (ResNet50 and MobileNetV2 on COCO): each backbone's points do.
    one_family = len({re.sub(r"\d+$", "", a.split("_")[0]) for a in archs}) == 1
    for ax, (title, metric, x_key, detector) in zip(axes, panels):
        mine = [e for e in entries if not detector or e.row["detector"] == detector]
        ours_x = (lambda e: e.params) if x_key == "params_m" else (lambda e: e.macs)
        curves: Dict[str, List[Tuple[float, float]]] = {}
        labelled = set()
        for e in mine:
            y, marker = e.paper(metric), markers[e.row["conv"]]
            x = e.paper(x_key)
            hollow = x is None
            x = ours_x(e) if hollow else x
            if y is not None and x is not None:
                ax.plot([x], [y], marker=marker, linestyle="none", markersize=8, color=PAPER_COLOR,
                        markerfacecolor="white" if hollow else PAPER_COLOR, zorder=3)
                curves.setdefault(e.row["conv"] if one_family else e.row["arch"], []).append((x, y))
                drawn.add("hollow" if hollow else "paper")
                for c in conflicts(e.row):
                    if c.field == metric:
                        ax.plot([x, x], [y, c.value], linestyle=":", color=PAPER_COLOR, linewidth=1, zorder=2)
                        ax.plot([x], [c.value], marker=marker, linestyle="none", markersize=8, color=PAPER_COLOR,
                                alpha=0.35, zorder=2)
                        drawn.add("conflict")
                if len(archs) > 1 and e.row["arch"] not in labelled:
                    labelled.add(e.row["arch"])
                    ax.annotate(e.row["arch"], (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7)
            ours, ox = e.metrics.get(metric), ours_x(e)
            if ours is not None and ox is not None:
                ax.plot([ox], [ours], marker=marker, linestyle="none", markersize=9, color=OURS_COLOR,
                        markeredgecolor="black", markeredgewidth=0.6, zorder=4)
                drawn.add("ours")
        if len(archs) > 1:
            for points in curves.values():
                points = sorted(dict.fromkeys(points))
                if len(points) > 1:
                    ax.plot(*zip(*points), color=PAPER_COLOR, linewidth=0.8, alpha=0.5, zorder=1)
        ax.set_title(f"{name}: {title}", fontsize=10)
        ax.set_xlabel(X_LABELS[x_key] if x_key != "params_m" or not detection else "detector parameters (M)")
        ax.set_ylabel({"top1": "ImageNet top-1 (%)", "box_ap": "COCO box AP"}[metric])
        ax.grid(True, linewidth=0.4, alpha=0.5)
    handles = [Line2D([], [], marker=markers[c], linestyle="none", color="dimgray", label=c) for c in convs]
    kinds = {"paper": dict(color=PAPER_COLOR, label="paper"),
             "hollow": dict(color=PAPER_COLOR, markerfacecolor="white", label="paper, at our count (paper gives none)"),
             "conflict": dict(color=PAPER_COLOR, alpha=0.35, label="another source's value for the row"),
             "ours": dict(color=OURS_COLOR, markeredgecolor="black", label="ours")}
    handles += [Line2D([], [], marker="o", linestyle="none", **kinds[k]) for k in kinds if k in drawn]
    if "ours" not in drawn:
        handles.append(Line2D([], [], linestyle="none", label="ours: no run yet"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    # no Software / date metadata: the same numbers give the same bytes, so the PNG can be committed
    fig.savefig(path, format="png", bbox_inches="tight", metadata={"Software": None})
    return path


# -------------------------------------------------------------------------------------- writing

def write_tables(paper: List[dict], gathered: Gathered, out_dir: Path, count: Counter,
                 tables: Optional[List[str]] = None,
                 detection_count: Optional[DetectionCounter] = None,
                 figures: bool = True) -> Dict[str, Path]:
    """One markdown file per table group of ``paper`` (detection groups only with ``detection_count``),
    each with its figure ``<table>.png`` (unless ``figures`` is False), plus ``synthetic_runs.md``;
    returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    all_tables = {row["table"] for row in paper}
    groups: Dict[str, List[dict]] = {}
    for row in paper:
        wanted = row["task"] == "classification" or (row["task"] == "detection" and detection_count is not None)
        if wanted and (tables is None or row["table"] in tables):
            groups.setdefault(row["table"], []).append(row)
    problems = [f"- {p}" for p in gathered.problems]
    for name, rows in groups.items():
        notes = Notes()
        detection = rows[0]["task"] == "detection"
        if detection:
            entries = detection_entries(rows, gathered.runs, detection_count, all_tables)
            intro = ("Paper numbers from `results/paper.csv`; ours from the run directories (last epoch). "
                     + DETECTION_NOTE)
            table = detection_table(entries, notes)
        else:
            entries = classification_entries(rows, gathered.runs, count, all_tables)
            intro = ("Paper numbers from `results/paper.csv`; ours from the run directories (a run fills a row "
                     "only through its experiment's table and recipe name: see `results/README.md`). Params "
                     "and MACs are `dynconv.count_params` / `count_macs` at 224 px.")
            table = classification_table(entries, notes)
        body = [f"# {name}", "", intro, ""]
        if figures:
            written[f"{name}.png"] = draw_figure(name, entries, out_dir / f"{name}.png", detection)
            body += [f"![{name}: the papers' points and ours]({name}.png)", ""]
        body += [*table, *notes.section()]
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

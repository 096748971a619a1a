"""Run logging: ``summary.csv`` / ``summary.json`` in the run directory, optional W&B, console progress.

Only the primary rank logs. On other ranks every method is a no-op and W&B is never imported.
The W&B run id is kept in ``run_dir/wandb_id.txt`` so that a requeued job resumes the same run.
"""
from __future__ import annotations

import csv
import io
import json
import math
import secrets
import string
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..checkpoint import atomic_write

PathLike = Union[str, Path]

WANDB_KEYS = ("project", "entity", "group", "name", "job_type", "tags", "mode")
# W&B summary of these keys is the best epoch, not the last one.
SUMMARY_OPS = {"eval/top1": "max", "eval/top5": "max", "eval/loss": "min"}
_ID_ALPHABET = string.ascii_lowercase + string.digits


def _plain(value: Any) -> Any:
    """Tensors / numpy scalars to Python numbers, containers recursively; JSON-safe."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _wandb_key(key: str) -> str:
    """CSV column -> W&B key: ``eval_top1`` -> ``eval/top1``, ``train_loss`` -> ``epoch/train_loss``.

    Eval runs once per epoch, so its keys are the ``eval/`` series; per-epoch training means go
    under ``epoch/`` to stay apart from the per-step ``train/`` series.
    """
    if "/" in key or key == "epoch":
        return key
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "epoch/" + key


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _parse_cell(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class RunLogger:
    """Per-epoch rows in ``summary.csv`` / ``summary.json``, per-step scalars and final values in W&B.

    Args:
        run_dir: the run's output directory (also W&B's ``dir``).
        config: the resolved config as a plain dict (W&B ``config``).
        is_primary: only the primary rank writes anything.
        wandb: ``None`` for no W&B, else ``{project, entity, group, name, job_type, tags, mode}``;
            ``mode=None`` leaves the choice to ``WANDB_MODE``.
    """

    def __init__(
        self,
        run_dir: PathLike,
        *,
        config: Mapping[str, Any],
        is_primary: bool = True,
        wandb: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.is_primary = is_primary
        self.run: Any = None
        self.wandb_id: Optional[str] = None
        self._rows: List[Dict[str, Any]] = []
        self._summary: Dict[str, Any] = {}
        if not is_primary:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._rows, self._summary = self._read_previous()
        if wandb is not None:
            self.run = self._init_wandb(dict(config), wandb)

    # ---------------------------------------------------------------------------------------------
    @property
    def csv_path(self) -> Path:
        return self.run_dir / "summary.csv"

    @property
    def json_path(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def steps_path(self) -> Path:
        return self.run_dir / "steps.jsonl"

    @property
    def id_path(self) -> Path:
        return self.run_dir / "wandb_id.txt"

    @property
    def rows(self) -> List[Dict[str, Any]]:
        return [dict(r) for r in self._rows]

    @property
    def summary(self) -> Dict[str, Any]:
        return dict(self._summary)

    # ---------------------------------------------------------------------------------------------
    def _read_previous(self) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        """Rows and summary of an earlier attempt in this run directory (resume)."""
        if self.json_path.is_file():
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
            return list(data.get("rows", [])), dict(data.get("summary", {}))
        if self.csv_path.is_file():
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                rows = [{k: _parse_cell(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
            return rows, {}
        return [], {}

    def _run_id(self) -> str:
        if self.id_path.is_file():
            stored = self.id_path.read_text(encoding="utf-8").strip()
            if stored:
                return stored
        run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
        _write_text(self.id_path, run_id + "\n")
        return run_id

    def _init_wandb(self, config: Dict[str, Any], options: Mapping[str, Any]) -> Any:
        unknown = sorted(set(options) - set(WANDB_KEYS))
        if unknown:
            raise ValueError(f"unknown W&B options {unknown}; expected some of {list(WANDB_KEYS)}")
        import wandb

        self.wandb_id = self._run_id()
        kwargs = {k: options.get(k) for k in ("project", "entity", "group", "name", "job_type")}
        if options.get("mode") is not None:  # otherwise WANDB_MODE decides
            kwargs["mode"] = options["mode"]
        run = wandb.init(
            **kwargs,
            tags=list(options.get("tags") or []),
            config=_plain(config),
            dir=str(self.run_dir),
            id=self.wandb_id,
            resume="allow",
        )
        for key, op in SUMMARY_OPS.items():
            run.define_metric(key, summary=op)
        return run

    def _write_files(self) -> None:
        columns: Dict[str, None] = {}
        for row in self._rows:
            columns.update(dict.fromkeys(row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows)
        _write_text(self.csv_path, buffer.getvalue())
        body = {"rows": self._rows, "summary": self._summary}
        _write_text(self.json_path, json.dumps(body, indent=2) + "\n")

    # ---------------------------------------------------------------------------------------------
    def log_step(self, metrics: Mapping[str, Any], step: int) -> None:
        """Per-step scalars (``train/loss``, ``train/lr``, ``train/images_per_s``) to W&B and ``steps.jsonl``.

        ``steps.jsonl`` is appended to, one JSON object per call; after a resume the steps since the
        last checkpoint appear again, and the later line of a step is the one that counts.
        """
        if not self.is_primary:
            return
        metrics = _plain(metrics)
        with open(self.steps_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        """Add (or, for an epoch already logged, replace) a row of the summary files; log it to W&B."""
        if not self.is_primary:
            return
        row = _plain(row)
        same = [i for i, r in enumerate(self._rows) if "epoch" in row and r.get("epoch") == row["epoch"]]
        if same:  # a resumed run re-doing an epoch
            self._rows[same[0]] = row
        else:
            self._rows.append(row)
        self._write_files()
        if self.run is not None:
            self.run.log({_wandb_key(k): v for k, v in row.items() if v is not None}, step=step)

    def set_summary(self, **values: Any) -> None:
        """Final values (best top-1, params, MACs, ...) into ``summary.json`` and the W&B summary."""
        if not self.is_primary:
            return
        values = _plain(values)
        self._summary.update(values)
        self._write_files()
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run; safe to call more than once."""
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=exit_code)

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


# -------------------------------------------------------------------------------------------------
# Console progress


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0 or not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _format_fields(fields: Mapping[str, Any]) -> str:
    # img_s=410 reads as "img/s 410"
    return " ".join(f"{k[:-2] + '/s' if k.endswith('_s') else k} {_format_value(v)}" for k, v in fields.items())


class Progress:
    """Progress of one epoch on the console.

    A ``rich`` bar when stdout is a terminal; otherwise one plain line every ``log_every`` steps and
    at the end (``train epoch 3 [120/500] loss 2.31 img/s 410 eta 0:03:10``), which is what batch
    logs want. ``enabled=False`` (non-primary ranks) prints nothing.
    """

    def __init__(
        self, total: int, *, description: str, enabled: bool = True, log_every: int = 50, start: int = 0
    ) -> None:
        self.total = total
        self.description = description
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.completed = start
        self._start = start
        self._printed = start
        self._fields: Dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._bar: Any = None
        self._task: Any = None
        if enabled and getattr(sys.stdout, "isatty", lambda: False)():
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(file=sys.stdout),
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed, info="")

    def eta(self) -> Optional[float]:
        """Seconds left at the rate of this session (steps since ``start``)."""
        done = self.completed - self._start
        elapsed = time.monotonic() - self._t0
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (self.total - self.completed) * elapsed / done)

    def line(self) -> str:
        """The plain-text status line."""
        eta = self.eta()
        parts = [f"{self.description} [{self.completed}/{self.total}]", _format_fields(self._fields)]
        parts.append("eta " + (str(timedelta(seconds=round(eta))) if eta is not None else "?"))
        return " ".join(p for p in parts if p)

    def update(self, completed: int, **fields: Any) -> None:
        """Set the number of completed steps and the displayed fields (``loss=``, ``img_s=``, ``lr=``)."""
        if not self.enabled:
            return
        self.completed = completed
        self._fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=_format_fields(self._fields))
        elif completed > self._printed and (
                completed >= self.total or completed // self.log_every > self._printed // self.log_every):
            self._print()

    def _print(self) -> None:
        self._printed = self.completed
        print(self.line(), file=sys.stdout, flush=True)

    def close(self) -> None:
        """Stop the bar, or print the last line if it was not printed yet."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.completed > self._printed:
            self._print()
        self.enabled = False  # closing twice prints nothing more

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()


__all__ = ["Progress", "RunLogger", "SUMMARY_OPS"]

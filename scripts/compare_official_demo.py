"""Train dynconv's ODConv MobileNetV2 and the OFFICIAL one side by side on the demo data and recipe.

The official model is OSVAI/ODConv ``models/od_mobilenetv2.py`` (with ``modules/odconv.py``), loaded
from a checkout given on the command line; nothing of it is copied here. Both runs go through the
same :class:`dynconv.engine.Trainer` (same generated data, same batches and augmentation draws, same
optimizer, learning-rate schedule and seed); only the network differs. The official network starts
from the dynconv network's initial weights (``dynconv.export_official``) and its temperature follows
the official ``utils/misc.py get_temperature`` ramp (30 -> 1 over ``--temp-epochs``), sped up by
``recipe.schedule_speed`` exactly as dynconv's layers are. Every update's loss, learning rate and
temperature are written to ``per_step.csv`` in each run directory; the per-epoch rows to
``summary.csv``. A markdown comparison is printed (and written with ``--out``).

    git --git-dir=<ODConv mirror> archive HEAD models modules | tar -x -C /tmp/odconv_official
    python scripts/compare_official_demo.py --official /tmp/odconv_official [--which both] \
        [--out results/demo_official_comparison.md] [override ...]

Extra arguments are Hydra overrides of ``configs/train.yaml`` (e.g. ``recipe.schedule_speed=3``,
``trainer.max_epochs=8``, ``data.train_per_class=100``).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_official_model_fn(path: Path) -> Any:
    """``od_mobilenetv2_100`` from an OSVAI/ODConv checkout; exits with a message when it is not there."""
    needed = [path / "models" / "od_mobilenetv2.py", path / "modules" / "odconv.py"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        sys.exit(f"error: the official ODConv code is not at {path} (missing {', '.join(missing)}).\n"
                 f"Get it with: git clone https://github.com/OSVAI/ODConv {path}")
    sys.path.insert(0, str(path))
    # the checkout's models/__init__.py imports every model file; only this one is needed
    return importlib.import_module("models.od_mobilenetv2").od_mobilenetv2_100


def compose_config(overrides: List[str], run_dir: Path) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from dynconv.engine import config as schema
    from dynconv.engine.config import apply_row

    ConfigStore.instance().store(name="train_schema", node=schema.TrainConfig)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"run_dir={run_dir}"])
    config = OmegaConf.to_object(cfg)
    apply_row(config, protected={o.split("=", 1)[0].lstrip("+~") for o in overrides})
    return config


def check_same_function(model: nn.Module, official: nn.Module, size: int) -> None:
    """Print how far the two networks' training-mode outputs and parameter gradients are apart at
    three temperatures (on copies: the BatchNorm running statistics of the runs stay untouched)."""
    import copy

    from dynconv.official import official_names

    names = official_names(model)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    for temperature in (30.0, 5.0, 1.0):
        ours, theirs = copy.deepcopy(model).train(), copy.deepcopy(official).train()
        for m in ours.modules():
            if hasattr(m, "set_schedule_value"):
                m.set_schedule_value(temperature)
        theirs.net_update_temperature(temperature)
        y_ours, y_theirs = ours(x), theirs(x)
        y_ours.square().sum().backward()
        y_theirs.square().sum().backward()
        params = dict(theirs.named_parameters())
        grad = max(float((p.grad.reshape(params[names[n]].grad.shape) - params[names[n]].grad).abs().max())
                   for n, p in ours.named_parameters())
        print(f"  same function check, training mode, T={temperature:g}: max |output difference| "
              f"{float((y_ours - y_theirs).abs().max()):.3g}, max |gradient difference| {grad:.3g}", flush=True)


def make_task(official_fn: Optional[Any], cfg: Any) -> Any:
    """The classification task; with ``official_fn``, on the official network (from dynconv's initial weights)."""
    from dynconv.engine.tasks.classification import ClassificationTask
    from dynconv.official import export_official
    from dynconv.ops.odconv import ODAttention

    class OfficialNetworkTask(ClassificationTask):
        """The demo task with the official network in place of dynconv's."""

        def build_model(self, data: Any, info: Any) -> nn.Module:
            model = super().build_model(data, info)  # called right after seeding: the dynconv initial weights
            cfg = self.cfg
            if cfg.model.name != "mobilenetv2_100" or cfg.conv.name != "odconv_1x":
                raise SystemExit("error: the official comparison covers model=mobilenetv2_100 conv=odconv_1x")
            official = official_fn(num_classes=data.num_classes, kernel_num=1, dropout=cfg.model.drop_rate)
            state = {k[len("module."):]: v for k, v in export_official(model)["state_dict"].items()}
            official.load_state_dict(state, strict=True)
            schedule = next(m.schedule for m in model.modules() if isinstance(m, ODAttention))
            # seen by dynconv.set_progress like a dynconv layer: the official net_update_temperature
            official.schedule = schedule
            official.set_schedule_value = official.net_update_temperature
            official.net_update_temperature(schedule(float("inf")))
            check_same_function(model, official, cfg.data.image_size)
            return official

        def count(self, model: nn.Module) -> Tuple[int, Optional[int]]:
            try:
                return super().count(model)
            except Exception:  # the MAC counter knows dynconv layers only
                return sum(p.numel() for p in model.parameters()), None

    return ClassificationTask(cfg) if official_fn is None else OfficialNetworkTask(cfg)


def make_trainer_class() -> type:
    from dynconv.engine import Trainer
    from dynconv.schedules import scheduled_modules

    class RecordingTrainer(Trainer):
        """The demo trainer, recording every update."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.steps: List[Dict[str, float]] = []
            super().__init__(*args, **kwargs)

        def train_step(self, group: Any, epoch: int) -> Optional[float]:
            progress = self.schedule_progress()
            loss = super().train_step(group, epoch)
            layer = scheduled_modules(self.module)[0]
            self.steps.append({"step": self.global_step, "epoch": self.global_step / self.updates_per_epoch,
                               "progress": progress, "temperature": float(layer.schedule(progress)),
                               "lr": self.optimizer.param_groups[0]["lr"],
                               "loss": float("nan") if loss is None else loss})
            return loss

        def fit(self) -> Dict[str, Any]:
            summary = super().fit()
            if self.steps:
                with open(self.run_dir / "per_step.csv", "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(self.steps[0]))
                    writer.writeheader()
                    writer.writerows(self.steps)
            return summary

    return RecordingTrainer


def run(kind: str, official_fn: Optional[Any], overrides: List[str], run_dir: Path, fresh: bool) -> Path:
    from dynconv.engine.distributed import init_distributed, shutdown
    from dynconv.engine.trainer import seed_everything
    from dynconv.malloc import reuse_freed_memory

    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = compose_config(overrides, run_dir)
    cfg.trainer.resume = "never"
    print(f"== {kind}: {run_dir}", flush=True)
    info = init_distributed(cfg.trainer.device)
    if cfg.trainer.reuse_freed_memory:
        reuse_freed_memory(info.device)
    seed_everything(cfg.seed)
    try:
        make_trainer_class()(make_task(official_fn, cfg), cfg, info).fit()
    finally:
        shutdown()
    return run_dir


def read_rows(run_dir: Path) -> List[Dict[str, str]]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def temperature_at_epoch_end(run_dir: Path) -> Dict[int, float]:
    path = run_dir / "per_step.csv"
    if not path.exists():
        return {}
    out: Dict[int, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[int(float(row["epoch"]) + 1 - 1e-9)] = float(row["temperature"])
    return out


def markdown(runs: Dict[str, Path], command: str) -> str:
    rows = {kind: read_rows(d) for kind, d in runs.items()}
    temps = temperature_at_epoch_end(next(iter(runs.values())))
    kinds = list(runs)
    head = "| epoch | T at end | lr | " + " | ".join(f"{k} train loss | {k} top-1" for k in kinds) + " |"
    lines = [f"Command: `{command}`", "", head, "|" + "---|" * (3 + 2 * len(kinds))]
    n = max(len(r) for r in rows.values())
    for i in range(n):
        cells = []
        first = next(r[i] for r in rows.values() if i < len(r))
        for kind in kinds:
            r = rows[kind][i] if i < len(rows[kind]) else None
            cells += [f"{float(r['train_loss']):.4f}", f"{float(r['eval_top1']):.2f}"] if r else ["", ""]
        lines.append(f"| {first['epoch']} | {temps.get(int(first['epoch']), float('nan')):.2f} | "
                     f"{float(first['lr']):.3g} | " + " | ".join(cells) + " |")
    for kind, r in rows.items():
        best = max(float(x["eval_top1"]) for x in r)
        lines.append(f"\n{kind}: best top-1 {best:.2f}, final {float(r[-1]['eval_top1']):.2f} ({runs[kind]})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="an OSVAI/ODConv checkout (models/, modules/)")
    parser.add_argument("--which", choices=["both", "dynconv", "official"], default="both")
    parser.add_argument("--name", default="compare_official", help="runs/<name>/{dynconv,official}")
    parser.add_argument("--resume", action="store_true", help="keep finished runs instead of starting afresh")
    parser.add_argument("--out", type=Path, help="write the markdown comparison here as well")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    args = parser.parse_args()
    official_fn = load_official_model_fn(args.official.resolve())
    base = ROOT / "runs" / args.name
    runs = {kind: base / kind for kind in ("dynconv", "official")}
    for kind in (["dynconv", "official"] if args.which == "both" else [args.which]):
        if args.resume and (runs[kind] / "summary.csv").exists():
            continue
        run(kind, official_fn if kind == "official" else None, args.overrides, runs[kind], fresh=True)
    present = {k: d for k, d in runs.items() if (d / "summary.csv").exists()}
    command = "python scripts/compare_official_demo.py " + " ".join(sys.argv[1:])
    text = markdown(present, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

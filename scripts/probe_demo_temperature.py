"""Probe how an ODConv checkpoint of the demo run depends on the attention temperature.

Two probes, both on the demo data and recipe (extra arguments are Hydra overrides of
``configs/train.yaml``):

``eval CKPT --temperatures 3.9 2 1``
    The checkpoint's weights evaluated (eval mode, no update) at each temperature: how much of the
    network's accuracy survives the sharpening of its sigmoid attentions alone.
``replay CKPT [--hold-temperature] [--lr-scale S]``
    Resume the run from ``CKPT`` (a ``last.pt`` written at the end of an epoch) for one more epoch,
    printing every update's temperature, learning rate, loss and gradient norms (all parameters,
    attention parameters). ``--hold-temperature`` keeps the temperature where the checkpoint left
    it; ``--lr-scale`` multiplies every update's learning rate.

    python scripts/probe_demo_temperature.py eval runs/.../last.pt --temperatures 3.9 2 1.5 1
    python scripts/probe_demo_temperature.py replay epoch6.pt --hold-temperature --run-dir /tmp/hold
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_official_demo import ROOT, compose_config, make_trainer_class  # noqa: E402


def use_batch_statistics(model: torch.nn.Module, which: str) -> None:
    """Training-mode BatchNorm (batch statistics, running ones left alone) in the attentions or everywhere."""
    from dynconv.ops.odconv import ODAttention

    attention = {id(m.bn) for m in model.modules() if isinstance(m, ODAttention)}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and (which == "all" or id(m) in attention):
            m.train()
            m.momentum = 0.0


@torch.no_grad()
def top1_and_loss(model: torch.nn.Module, loader: Any) -> dict:
    correct, loss, count = 0, 0.0, 0
    for images, targets in loader:
        logits = model(images)
        correct += int((logits.argmax(1) == targets).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    return {"top1": 100.0 * correct / count, "loss": loss / count}


def probe_eval(ckpt: Path, temperatures: List[float], batch_stats: str, overrides: List[str]) -> None:
    from dynconv.engine.builders import build_data, build_model
    from dynconv.ops.odconv import ODAttention

    cfg = compose_config(overrides, ROOT / "runs" / "probe_eval")
    data = build_data(cfg.data, cfg.recipe.aug)
    # shuffled (the validation set is stored class by class), so a batch's statistics mix the classes
    val = torch.utils.data.DataLoader(data.val, batch_size=100, shuffle=True,
                                      generator=torch.Generator().manual_seed(0))
    model = build_model(cfg.model, cfg.conv, data.num_classes)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    layers = [m for m in model.modules() if isinstance(m, ODAttention)]
    trained_at = layers[0].schedule(state["meta"]["schedule_progress"])
    print(f"{ckpt}: epoch {state['meta']['epoch']:g}, trained at temperature {trained_at:.3f}")
    for t in temperatures:
        for layer in layers:
            layer.set_schedule_value(t)
        model.eval()
        if batch_stats != "none":
            use_batch_statistics(model, batch_stats)
        r = top1_and_loss(model, val)  # not engine.evaluate: it would put every BatchNorm in eval mode
        print(f"temperature {t:g}: eval top-1 {r['top1']:.2f}  loss {r['loss']:.4f}"
              f"{'' if batch_stats == 'none' else f'  (batch statistics: {batch_stats} BatchNorms)'}", flush=True)


def probe_replay(ckpt: Path, hold: bool, lr_scale: float, run_dir: Path, overrides: List[str]) -> None:
    from dynconv.engine.distributed import init_distributed

    shutil.rmtree(run_dir, ignore_errors=True)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    epoch = int(round(state["meta"]["epoch"]))
    # the layer schedules as the checkpoint's run had them, whatever configs/recipe/demo.yaml says now
    speed = f"recipe.schedule_speed={state['config']['recipe']['schedule_speed']}"
    cfg = compose_config(["trainer.progress=false", f"trainer.max_epochs={epoch + 1}", speed, *overrides], run_dir)
    cfg.trainer.resume = str(ckpt)
    base = make_trainer_class(None)
    held = state["meta"]["schedule_progress"]

    class Replay(base):  # type: ignore[misc, valid-type]
        def schedule_progress(self) -> float:
            progress = super().schedule_progress()
            return min(progress, held) if hold else progress

        def _optimizer_step(self) -> None:
            grads = [(n, p.grad) for n, p in self.module.named_parameters() if p.grad is not None]
            self.norms = (math.sqrt(sum(float(g.square().sum()) for _, g in grads)),
                          math.sqrt(sum(float(g.square().sum()) for n, g in grads if ".attention." in n)))
            for group in self.optimizer.param_groups:
                group["lr"] *= lr_scale
            super()._optimizer_step()

        def train_step(self, group: Any, epoch: int) -> Optional[float]:
            loss = super().train_step(group, epoch)
            s = self.steps[-1]
            print(f"step {s['step']} T {s['temperature']:.3f} lr {s['lr']:.4g} loss {s['loss']:.4f} "
                  f"grad norm {self.norms[0]:.2f} attention grad norm {self.norms[1]:.2f}", flush=True)
            return loss

    Replay(cfg, init_distributed(cfg.trainer.device)).fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    e = sub.add_parser("eval")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--temperatures", type=float, nargs="+", required=True)
    e.add_argument("--batch-stats", choices=["none", "attention", "all"], default="none",
                   help="normalise with each batch's statistics (100 images) in these BatchNorms")
    r = sub.add_parser("replay")
    r.add_argument("checkpoint", type=Path)
    r.add_argument("--hold-temperature", action="store_true")
    r.add_argument("--lr-scale", type=float, default=1.0)
    r.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "probe_replay")
    args, overrides = parser.parse_known_args()
    if args.probe == "eval":
        probe_eval(args.checkpoint, args.temperatures, args.batch_stats, overrides)
    else:
        probe_replay(args.checkpoint, args.hold_temperature, args.lr_scale, args.run_dir, overrides)


if __name__ == "__main__":
    main()

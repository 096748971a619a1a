"""What a training run tells: its W&B name and tags, the console lines of an epoch, and its summary.

Pure functions of the config and the numbers the loop hands over; the task supplies the parts that differ
(its title, name parts, score text and summary values), :class:`~dynconv.engine.run_logging.RunLogger`
writes the results.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from .config import TrainConfig


def wandb_options(cfg: TrainConfig, name_parts: Sequence[str]) -> Optional[Dict[str, Any]]:
    """``RunLogger``'s W&B options (None without ``logger=wandb``): the run is named by ``name_parts`` and
    the seed, tagged by them and ``logger.tags``, and grouped by experiment."""
    lc = cfg.logger
    if lc.name != "wandb":
        return None
    tags = [*name_parts, *lc.tags]
    name = "-".join(name_parts) + f"-s{cfg.seed}"
    return {"project": lc.project, "entity": lc.entity, "group": lc.group or cfg.name, "name": name,
            "job_type": lc.job_type, "tags": list(dict.fromkeys(tags)), "mode": lc.mode}


def epoch_line(row: Mapping[str, Any], epochs: int, scores: str) -> str:
    """The console line of a trained epoch; ``scores`` is the task's part (:meth:`Task.scores`)."""
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}  {scores}  "
            f"lr {row['lr']:.3g}  {row['epoch_time_s']:.0f}s")


def before_training_line(row: Mapping[str, Any], epochs: int) -> str:
    """The console line of the epoch-0 row (``trainer.eval_before_train``): every ``eval_*`` value."""
    scores = "  ".join(f"{k[5:]} {v:.4f}" if k.endswith("loss") else f"{k[5:]} {v:.2f}"
                       for k, v in row.items() if k.startswith("eval_") and k != "eval_count")
    return f"epoch 0/{epochs} (before training): {scores}"


def run_summary(cfg: TrainConfig, epochs_done: int, task_values: Mapping[str, Any], params: int,
                macs: Optional[int], checkpoint: str) -> Dict[str, Any]:
    """The run's summary (``summary.json``, W&B, the last console line): what ran, how far, the task's values
    (its best score first), the model's size and the checkpoint to continue from."""
    return {"name": cfg.name, "arch": cfg.model.name, "conv": cfg.conv.name, "recipe": cfg.recipe.name,
            "data": cfg.data.name, "image_size": cfg.data.image_size, "seed": cfg.seed,
            "epochs": cfg.recipe.epochs, "epochs_done": epochs_done, "finished": epochs_done >= cfg.recipe.epochs,
            **task_values, "params": params, "macs": macs, "checkpoint": checkpoint}


__all__ = ["before_training_line", "epoch_line", "run_summary", "wandb_options"]

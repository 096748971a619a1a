"""The training loop of every task: one process, one GPU, or many through ``torchrun``.

The loop knows batches, updates, devices, checkpoints and logs; what is trained on what, with which loss
and metric, is the :class:`~dynconv.engine.tasks.Task`'s (:mod:`dynconv.engine.run` picks it). Every
update pushes the training progress into the dynamic layers (:func:`dynconv.set_progress`) and adds what
they contribute to the loss (:func:`dynconv.auxiliary_loss`). A checkpoint holds everything an exact
resume needs (model, EMA, optimizer, scheduler, scaler, every rank's RNG states, the position
in the epoch), so re-running the same command in the same run directory continues the same loss
trajectory; the learning rate and the layer schedules are pure functions of that position.
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._version import __version__
from ..auxiliary import auxiliary_loss
from ..checkpoint import (CheckpointError, CheckpointManager, first_non_finite, load_checkpoint, load_weights,
                          unwrap_model)
from ..rng import rng_state, set_rng_state
from ..schedules import set_progress
from .builders import loader_workers
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, barrier
from .errors import NonFiniteLossError
from .optim import apply_schedule, build_optimizer, build_scheduler, current_lr, scaled_lr
from .reporting import before_training_line, epoch_line, run_summary, wandb_options
from .run_guard import check_resume, lock_run_dir
from .run_logging import Progress, RunLogger
from .runtime import autocast, to_channels_last
from .tasks.protocol import Task

CHECKPOINT_FORMAT = 1


def plain_config(cfg: Any) -> Dict[str, Any]:
    """The config as plain dicts and lists (what checkpoints and W&B store)."""
    if is_dataclass(cfg):
        return asdict(cfg)
    from omegaconf import OmegaConf  # a DictConfig handed in by a caller that uses Hydra

    return OmegaConf.to_container(cfg, resolve=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (timm's mixup draws from NumPy's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _gather_rng() -> List[Dict[str, Any]]:
    """Every rank's RNG states, in rank order (dropout and mixup draw differently on each rank)."""
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


class Trainer:
    """Builds a ``task``'s run from its config and trains (or resumes) it; see :func:`dynconv.engine.train`.

    The task supplies the data and loaders, the network, the loss of a micro-batch, the metric and what is
    reported; the trainer runs the same loop for every task.
    """

    def __init__(self, task: Task, cfg: TrainConfig, info: DistInfo) -> None:
        self.task, self.cfg, self.info, self.device = task, cfg, info, info.device
        t = cfg.trainer
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        self.run_dir = Path(cfg.run_dir)
        self.lock = lock_run_dir(self.run_dir, info.is_primary)
        self._setup_batches()
        self._setup_data()
        self._setup_model()
        seed_everything(cfg.seed + info.rank)  # then each rank its own dropout, mixup, ... draws
        recipe = cfg.recipe
        self.optimizer = build_optimizer(self.model, recipe.optimizer, self.global_batch)
        self.scheduler = build_scheduler(self.optimizer, recipe.scheduler, recipe.epochs, self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if t.amp == "fp16" else None
        task.build_loss(self.data)
        self.checkpoints = CheckpointManager(self.run_dir, is_primary=info.is_primary)
        self.global_step, self.best_score, self.nan_skips = 0, -math.inf, 0
        self.epoch_loss = [0.0, 0]  # sum and count of this epoch's step losses (kept across a resume)

    def close(self) -> None:
        """Release the run directory."""
        if self.lock is not None:
            self.lock.release()

    # ---------------------------------------------------------------------------------------- setup
    def _setup_batches(self) -> None:
        cfg, world = self.cfg, self.info.world_size
        self.global_batch = cfg.recipe.batch_size
        self.batch_size = cfg.trainer.batch_size or self.global_batch // world
        per_step = self.batch_size * world
        if self.batch_size < 1 or self.global_batch % per_step:
            raise ValueError(f"recipe.batch_size={self.global_batch} (the global batch) must be a multiple of "
                             f"trainer.batch_size={self.batch_size} x {world} process(es)")
        self.accum_steps = self.global_batch // per_step

    def _setup_data(self) -> None:
        t, info = self.cfg.trainer, self.info
        if not info.is_primary:
            barrier()  # rank 0 checks (or generates) the dataset first
        self.data = self.task.build_data()
        if info.is_primary:
            barrier()
        self.train_loader, self.val_loader = self.task.build_loaders(self.data, self.batch_size,
                                                                     loader_workers(t.workers), info)
        self.updates_per_epoch = len(self.train_loader) // self.accum_steps
        if t.limit_train_batches:
            self.updates_per_epoch = min(self.updates_per_epoch, t.limit_train_batches)
        if self.updates_per_epoch < 1:
            raise ValueError(f"the training set ({len(self.data.train)} images) gives no full update of "
                             f"{self.global_batch} images; lower recipe.batch_size")

    def _setup_model(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        seed_everything(cfg.seed)  # the same initial weights (and EMA copy) on every rank
        model = self.task.build_model(self.data, self.info)
        if t.init_checkpoint:
            print(load_weights(model, t.init_checkpoint, expect=self.task.identity()))
        self.params, self.macs = self.task.count(model)
        if t.sync_bn and self.device.type == "cpu":
            raise ValueError("trainer.sync_bn=true needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
        if t.sync_bn and self.info.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if t.channels_last:
            to_channels_last(model)
        self.ema = ModelEmaV3(model, decay=cfg.recipe.ema.decay) if cfg.recipe.ema.enabled else None
        if t.compile:
            model = torch.compile(model)
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids, **self.task.ddp_options())
        self.model = model
        self.module = unwrap_model(model)

    # ----------------------------------------------------------------------------------- checkpoints
    def state(self) -> Dict[str, Any]:
        """Everything to resume from (collective: every rank contributes its RNG state)."""
        task = self.task
        meta = {**task.identity(), **task.meta(self.data), "dynconv_version": __version__,
                "format": CHECKPOINT_FORMAT, "global_batch": self.global_batch,
                "updates_per_epoch": self.updates_per_epoch, "world_size": self.info.world_size,
                "epoch": self.global_step / self.updates_per_epoch, "schedule_progress": self.layer_progress()}
        return {
            "meta": meta, "config": plain_config(self.cfg), "global_step": self.global_step,
            "best_score": self.best_score, "score_key": task.score_key, "model": self.module.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None, "rng": _gather_rng(),
            "epoch_loss": list(self.epoch_loss), **task.state(),
        }

    def save(self, name: str) -> None:
        """Write ``<name>.pt``; never a checkpoint with a NaN or infinity in its weights or statistics."""
        self._sync_buffers()
        bad = first_non_finite(self.module, self.ema.module if self.ema else None)
        if bad is not None:
            raise NonFiniteLossError(f"non-finite values in {bad} at step {self.global_step}: {name}.pt not "
                                     f"written ({self._kept()}). {self._advice()}")
        state = self.state()
        self.checkpoints.save(name, state)
        barrier()

    def _sync_buffers(self) -> None:
        """Every rank takes rank 0's buffers (BatchNorm statistics, in the EMA copy too): each rank updated
        them on its own batches since DDP's last broadcast, and the checkpoint holds rank 0's."""
        if not self.info.distributed:
            return
        for module in (self.module, self.ema.module if self.ema else None):
            for buffer in (module.buffers() if module is not None else ()):
                torch.distributed.broadcast(buffer, 0)

    def _kept(self) -> str:
        last = self.checkpoints.path("last")
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"

    def _advice(self) -> str:
        lr = self.cfg.recipe.optimizer.lr
        return (f"Lower the learning rate or clip the gradients, e.g. recipe.optimizer.lr={lr / 10:g} or "
                f"recipe.grad_clip=1.0, and run again: resuming needs trainer.resume_changes=[recipe.optimizer.lr] "
                f"or [recipe.grad_clip]; if the last checkpoint has diverged already, start a new run directory "
                f"(or trainer.resume=never after removing it); or use trainer.nan_policy=skip")

    def resume(self) -> Optional[Path]:
        """Load the run's ``last.pt`` (or ``trainer.resume``'s path); None when starting fresh."""
        mode = self.cfg.trainer.resume
        last = self.checkpoints.path("last")
        if mode == "never":
            if last.exists():
                raise CheckpointError(f"{last} exists and trainer.resume=never: choose another run_dir, "
                                      f"or resume it with trainer.resume=auto")
            return None
        path = last if mode == "auto" else Path(mode)
        if mode == "auto" and not path.exists():
            return None
        self.load_state(load_checkpoint(path), path)
        return path

    def load_state(self, state: Dict[str, Any], path: Path) -> None:
        """Continue from ``state`` (read from ``path``), refused when it is another run's."""
        meta = state.get("meta", {})
        mine = self.task.identity()
        if {k: meta.get(k) for k in mine} != mine:
            theirs = " ".join(f"{k}={meta.get(k)}" for k in mine)
            raise CheckpointError(f"{path} was trained for {theirs}, but this run is "
                                  f"{' '.join(f'{k}={v}' for k, v in mine.items())}: use another run_dir")
        for key, now in (("global_batch", self.global_batch), ("updates_per_epoch", self.updates_per_epoch)):
            if meta.get(key) != now:
                raise CheckpointError(f"{path} was written with {key}={meta.get(key)}, this run has {now}: "
                                      f"resume with the same recipe.batch_size and data, or use another run_dir")
        changed = []
        if isinstance(state.get("config"), dict):
            changed = check_resume(state["config"], plain_config(self.cfg), self.cfg.trainer.resume_changes, path)
        if changed and self.info.is_primary:
            print(f"  resuming with changed {', '.join(changed)} (trainer.resume_changes)", flush=True)
        self.module.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if not {"recipe.epochs", "recipe.optimizer.lr"} & set(changed):
            self.scheduler.load_state_dict(state["scheduler"])
        # else the schedule is rebuilt for the new length or rate: it is a pure function of the position
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        self.best_score = float(state.get("best_score", state.get("best_top1", -math.inf)))
        loss_sum, count = state.get("epoch_loss") or (0.0, 0)
        self.epoch_loss = [float(loss_sum), int(count)]
        rngs = state["rng"]
        set_rng_state(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])
        self.task.load_state(state)

    # ---------------------------------------------------------------------------------------- steps
    def schedule_progress(self) -> float:
        """The run's clock for the layer schedules: epochs done, sped up by ``recipe.schedule_speed``."""
        return self.global_step / self.updates_per_epoch * self.cfg.recipe.schedule_speed

    def layer_progress(self) -> float:
        """What :func:`dynconv.set_progress` receives: the run's clock, unless the task holds the schedules
        elsewhere (detection keeps their end values by default)."""
        return self.task.layer_progress(self.schedule_progress())

    def _micro_batches(self, epoch: int, start_update: int) -> Iterator[List[Tuple[Any, Any]]]:
        """The epoch's remaining updates, each a list of ``accum_steps`` micro-batches."""
        self.train_loader.set_epoch(epoch, start_batch=start_update * self.accum_steps)
        group: List[Tuple[Any, Any]] = []
        update = start_update
        for batch in self.train_loader:
            if update >= self.updates_per_epoch:
                break
            group.append(batch)
            if len(group) == self.accum_steps:
                yield group
                group, update = [], update + 1

    def _forward_backward(self, inputs: Any, targets: Any, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (under autocast), the layers' auxiliary terms included;
        DDP's gradient all-reduce waits for the last micro-batch of the update (``sync``)."""
        t = self.cfg.trainer
        context = nullcontext() if sync or not self.info.distributed else self.model.no_sync()
        with context:
            with autocast(self.device, t.amp):
                loss = self.task.loss(self.model, inputs, targets, self.device) + auxiliary_loss(self.module)
            scaled = loss / self.accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach().float()

    def _check_finite(self, loss: float, epoch: int) -> bool:
        """True to take the step; False to skip it (``nan_policy=skip``); raises under ``raise``."""
        if math.isfinite(loss):
            self.nan_skips = 0
            return True
        t = self.cfg.trainer
        self.nan_skips += 1
        where = (f"non-finite training loss ({loss}) at step {self.global_step} (epoch {epoch}), "
                 f"lr {current_lr(self.optimizer):.3g}")
        if t.nan_policy == "skip" and self.nan_skips <= t.max_nan_skips:
            if self.info.is_primary:
                print(f"warning: {where}; step skipped ({self.nan_skips}/{t.max_nan_skips} in a row)", flush=True)
            return False
        raise NonFiniteLossError(f"{where}: stopping ({self._kept()}). {self._advice()}")

    def train_step(self, group: List[Tuple[Any, Any]], epoch: int) -> Optional[float]:
        """One optimizer update over ``group``; returns the loss averaged over ranks (None if skipped)."""
        set_progress(self.module, self.layer_progress())
        apply_schedule(self.scheduler, epoch, self.global_step)
        self.model.train()
        # a skipped step must leave the BatchNorm statistics too as they were: its forward updated them
        before = [b.clone() for b in self.module.buffers()] if self.cfg.trainer.nan_policy == "skip" else None
        total = torch.zeros(1, device=self.device)
        for i, (inputs, targets) in enumerate(group):
            total += self._forward_backward(inputs, targets, sync=i == len(group) - 1)
        loss = (all_reduce_sum(total) / (len(group) * self.info.world_size)).item()
        take = self._check_finite(loss, epoch)
        if take:
            self._optimizer_step()
        elif before is not None:
            with torch.no_grad():
                for buffer, kept in zip(self.module.buffers(), before):
                    buffer.copy_(kept)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return loss if take else None

    def _optimizer_step(self) -> None:
        clip = self.cfg.recipe.grad_clip
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.module, step=self.global_step)

    # ---------------------------------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int, logger: RunLogger) -> float:
        t = self.cfg.trainer
        start = self.global_step - epoch * self.updates_per_epoch
        images_per_update = self.batch_size * self.accum_steps * self.info.world_size
        if start == 0:
            self.epoch_loss = [0.0, 0]
        bar = Progress(self.updates_per_epoch, description=f"epoch {epoch + 1}/{self.cfg.recipe.epochs}",
                       enabled=self.info.is_primary and t.progress, log_every=t.log_interval, start=start)
        with bar:
            tick = time.perf_counter()
            for group in self._micro_batches(epoch, start):
                loss = self.train_step(group, epoch)
                now = time.perf_counter()
                speed, tick = images_per_update / (now - tick), now
                if loss is not None:
                    self.epoch_loss = [self.epoch_loss[0] + loss, self.epoch_loss[1] + 1]
                done = self.global_step - epoch * self.updates_per_epoch
                bar.update(done, loss=loss if loss is not None else float("nan"), img_s=speed,
                           lr=current_lr(self.optimizer))
                if done % t.log_interval == 0 or done == self.updates_per_epoch:
                    logger.log_step({"train/loss": loss, "train/lr": current_lr(self.optimizer),
                                     "train/images_per_s": speed, "train/epoch": self.global_step / self.updates_per_epoch},
                                    step=self.global_step)
                if t.checkpoint_interval and self.global_step % t.checkpoint_interval == 0 \
                        and done < self.updates_per_epoch:
                    self.save("last")
        return self.epoch_loss[0] / max(self.epoch_loss[1], 1)

    def validate(self) -> Dict[str, Any]:
        """The task's metrics of the model (and its EMA copy) as an ``eval_*`` row; a metric's printable
        ``summary`` goes to the console (``trainer.progress``), not into the row."""
        self._sync_buffers()  # every rank scores, and the checkpoint holds, the same statistics
        progress = self.layer_progress()  # the schedules where the checkpoint leaves them
        set_progress(self.module, progress)
        # the bare module: a DDP forward could wait on a collective while ranks hold different shard sizes
        metrics = self.task.evaluate(self.module, self.val_loader, self.data, self.device)
        if "summary" in metrics and self.info.is_primary and self.cfg.trainer.progress:
            print(metrics["summary"], flush=True)
        row = {f"eval_{k}": v for k, v in metrics.items() if k != "summary"}
        if self.ema is not None:
            set_progress(self.ema.module, progress)  # EMA's buffers would lag the schedule
            ema = self.task.evaluate(self.ema.module, self.val_loader, self.data, self.device)
            row.update({f"eval_ema_{k}": v for k, v in ema.items() if k not in ("summary", "count")})
        self.task.validated(row)
        return row

    def fit(self) -> Dict[str, Any]:
        """Train to the end (or ``trainer.max_epochs``); returns the run's summary."""
        cfg, t = self.cfg, self.cfg.trainer
        resumed = self.resume()
        end_epoch = min(cfg.recipe.epochs, t.max_epochs or cfg.recipe.epochs)
        logger = RunLogger(self.run_dir, config=plain_config(cfg), is_primary=self.info.is_primary,
                           wandb=wandb_options(cfg, self.task.name_parts()))
        with logger:
            self._announce(resumed, end_epoch)
            if t.eval_before_train and self.global_step == 0:
                self._eval_before_train(logger)
            for epoch in range(self.global_step // self.updates_per_epoch, end_epoch):
                tick = time.perf_counter()
                train_loss = self.train_epoch(epoch, logger)
                row = {"epoch": epoch + 1, "train_loss": train_loss, **self.validate(),
                       "lr": current_lr(self.optimizer), "epoch_time_s": time.perf_counter() - tick}
                if not math.isfinite(row.get("eval_loss", 0.0)):
                    raise NonFiniteLossError(f"non-finite evaluation loss ({row['eval_loss']}) after epoch {epoch + 1}: "
                                             f"no checkpoint written for it ({self._kept()}). {self._advice()}")
                score = row[self.task.score_key]
                improved = score > self.best_score
                self.best_score = max(self.best_score, score)
                # best.pt and the epoch's row before last.pt moves on: a kill in between repeats the epoch
                # (exactly) on resume instead of losing its row or its best checkpoint
                if improved:
                    self.save("best")
                logger.log_epoch(row, step=self.global_step)
                self.save("last")
                if self.info.is_primary:
                    print(epoch_line(row, cfg.recipe.epochs, self.task.scores(row)), flush=True)
            summary = self._summary()
            logger.set_summary(**summary)
        return summary

    def _eval_before_train(self, logger: RunLogger) -> None:
        """Score the starting weights (schedules at progress 0) as an epoch-0 row; no checkpoint is written.

        It changes nothing the run computes afterwards: the loaders draw from their own seeded generators.
        """
        row = {"epoch": 0, **self.validate(), "lr": current_lr(self.optimizer)}
        logger.log_epoch(row, step=0)
        if self.info.is_primary:
            print(before_training_line(row, self.cfg.recipe.epochs), flush=True)

    # -------------------------------------------------------------------------------------- reporting
    def _announce(self, resumed: Optional[Path], end_epoch: int) -> None:
        """The run's first console lines: what trains on what, the model's size, the batch arithmetic."""
        if not self.info.is_primary:
            return
        cfg = self.cfg
        print(f"dynconv: {self.task.title()} recipe={cfg.recipe.name} data={cfg.data.name} "
              f"({len(self.data.train)} train / {len(self.data.val)} val images, {self.data.num_classes} classes)")
        macs = f", {self.macs / 1e9:.3f}G MACs at {cfg.data.image_size}px" if self.macs is not None else ""
        print(f"  {self.params / 1e6:.2f}M params{macs}; "
              f"{self.info.world_size} process(es) on {self.device.type}, global batch {self.global_batch} = "
              f"{self.batch_size} x {self.info.world_size} x {self.accum_steps} accumulation, "
              f"lr {scaled_lr(cfg.recipe.optimizer, self.global_batch):.4g}, {self.updates_per_epoch} updates/epoch")
        print(f"  run dir {self.run_dir}" + (f" (resumed from {resumed.name} at step {self.global_step})"
                                             if resumed else ""), flush=True)
        if self.global_step >= end_epoch * self.updates_per_epoch:
            print(f"  nothing to do: the run already finished epoch {end_epoch}", flush=True)

    def _summary(self) -> Dict[str, Any]:
        """The run's summary (printed on the primary rank), the task's values in it."""
        summary = run_summary(self.cfg, self.global_step // self.updates_per_epoch,
                              self.task.summary(self.best_score), self.params, self.macs,
                              str(self.checkpoints.path("last")))
        if self.info.is_primary:
            print("summary: " + json.dumps(summary), flush=True)
        return summary


__all__ = ["CHECKPOINT_FORMAT", "NonFiniteLossError", "Trainer", "plain_config", "seed_everything"]

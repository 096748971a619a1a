"""From a config to a run: ``cfg.task`` chooses the :class:`~dynconv.engine.tasks.Task`, here and nowhere
else, and the same two entries serve every task: :func:`train` hands it to the one training loop
(:class:`~dynconv.engine.trainer.Trainer`), :func:`run_eval` to the one evaluation (:func:`evaluate_checkpoint`).
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, Union

import torch

from ..checkpoint import atomic_write, load_checkpoint
from ..malloc import reuse_freed_memory
from .config import TASKS, EvalConfig, TrainConfig, validate
from .distributed import init_distributed, resolve_device, shutdown
from .tasks.protocol import Task
from .trainer import Trainer


def task_for(cfg: Union[TrainConfig, EvalConfig]) -> Task:
    """The task ``cfg.task`` names, built on ``cfg``. Each task's module is imported only when chosen
    (detection needs pycocotools); a new task adds its file under ``engine/tasks/`` and a line here."""
    if cfg.task == "classification":
        from .tasks.classification import ClassificationTask

        return ClassificationTask(cfg)
    if cfg.task == "detection":
        from .tasks.detection import DetectionTask

        return DetectionTask(cfg)
    raise ValueError(f"task={cfg.task!r} is not valid; choose one of: {', '.join(TASKS)}")


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns its summary."""
    validate(cfg)
    task = task_for(cfg)
    info = init_distributed(cfg.trainer.device)
    if cfg.trainer.reuse_freed_memory:
        reuse_freed_memory(info.device)
    trainer = None
    try:
        trainer = Trainer(task, cfg, info)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        shutdown()


def evaluate_checkpoint(task: Task, cfg: EvalConfig) -> Dict[str, Any]:
    """Score ``cfg.checkpoint`` (dynconv or official layout; None: a fresh model) on the validation split of
    ``cfg.data`` with ``task``'s metric; returns the task's result and writes it as JSON to ``cfg.output``.

    Single process on purpose: a padded distributed split would count some images twice.
    """
    if cfg.deploy and not task.deployable:
        raise ValueError("deploy=true scores classification models only (task=classification)")
    validate(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.reuse_freed_memory:
        reuse_freed_memory(device)
    state = load_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
    subject = task.prepare_eval(state, device)
    start = time.perf_counter()
    metrics = task.evaluate(subject.model, subject.loader, subject.data, device)
    result = task.eval_result(subject, metrics, time.perf_counter() - start, device)
    if cfg.output:
        atomic_write(cfg.output, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    return result


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    """``eval.py``'s job: score ``cfg.checkpoint`` with the task ``cfg.task`` names."""
    return evaluate_checkpoint(task_for(cfg), cfg)


__all__ = ["evaluate_checkpoint", "run_eval", "task_for", "train"]

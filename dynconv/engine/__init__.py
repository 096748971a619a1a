"""Training and evaluation engine: the loop, its configuration schema, checkpoints of a run, logging.

Nothing here imports Hydra: :func:`train` and :func:`run_eval` take the dataclasses of
:mod:`dynconv.engine.config` (or anything with the same attributes).
"""
from .cli import run_main
from .config import EvalConfig, TrainConfig, validate
from .eval_checkpoint import run_eval
from .evaluate import evaluate
from .trainer import NonFiniteLossError, Trainer, train

__all__ = ["EvalConfig", "NonFiniteLossError", "TrainConfig", "Trainer", "evaluate", "run_eval", "run_main",
           "train", "validate"]

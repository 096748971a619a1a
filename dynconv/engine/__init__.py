"""Training and evaluation engine: one loop and one evaluation entry for every task, the configuration
schema, checkpoints of a run, logging.

Nothing here imports Hydra: :func:`train` and :func:`run_eval` take the dataclasses of
:mod:`dynconv.engine.config` (or anything with the same attributes). :mod:`dynconv.engine.run` picks the
task (:mod:`dynconv.engine.tasks`) a config names.
"""
from .cli import run_main
from .config import EvalConfig, TrainConfig, validate
from .errors import NonFiniteLossError
from .evaluate import evaluate
from .run import run_eval, train
from .trainer import Trainer

__all__ = ["EvalConfig", "NonFiniteLossError", "TrainConfig", "Trainer", "evaluate", "run_eval", "run_main",
           "train", "validate"]

"""What the engine asks of a task: its data, network, loss, metric, identity and how its numbers read.

The training loop (:class:`~dynconv.engine.trainer.Trainer`) and the evaluation entry
(:func:`~dynconv.engine.run.evaluate_checkpoint`) know batches, updates, devices, checkpoints,
resumes and logs, and nothing about images, boxes or labels; a :class:`Task` knows those and nothing about
the loop. A new task (segmentation, pose) is one file beside :mod:`.classification` and :mod:`.detection`
that implements this protocol, plus its line in :func:`dynconv.engine.run.task_for`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from ..distributed import DistInfo


class TaskData(Protocol):
    """A task's datasets: what the loop counts and announces, whatever the samples are."""

    train: Sequence[Any]
    val: Sequence[Any]
    num_classes: int
    classes: Sequence[str]


@dataclass
class EvalSubject:
    """What :func:`~dynconv.engine.run.evaluate_checkpoint` scores: the model, loaded and on its
    device, its validation data and loader, what was loaded, and the task's own facts for the result."""

    model: nn.Module
    data: TaskData
    loader: Any
    loaded: str
    facts: Dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """One problem the engine trains and scores. A task holds its config (``cfg``, a
    :class:`~dynconv.engine.config.TrainConfig` or :class:`~dynconv.engine.config.EvalConfig`) and what its
    loss needs; the loop hands it the data, model and device it works on."""

    name: str  # the ``task=`` value
    score_key: str  # the validation row's key whose best value picks ``best.pt``
    deployable: bool  # whether ``eval.py deploy=true`` applies (dynconv.deploy folds classifiers)

    # ------------------------------------------------------------------------- what the run is
    def identity(self) -> Dict[str, str]:
        """Checkpoint meta that a resume, ``trainer.init_checkpoint`` and ``eval.py`` must match."""

    def meta(self, data: TaskData) -> Dict[str, Any]:
        """Checkpoint meta describing the data the weights were trained on (class names, sizes)."""

    def title(self) -> str:
        """The run in the first console line, e.g. ``resnet18 conv=odconv_4x``."""

    def name_parts(self) -> List[str]:
        """What names the run on W&B (joined with ``-``, plus the seed) and tags it."""

    # -------------------------------------------------------------------------------- training
    def build_data(self) -> TaskData:
        """Train and val datasets with the recipe's training augmentation."""

    def build_loaders(self, data: TaskData, batch_size: int, workers: int, info: DistInfo) -> Tuple[Any, Any]:
        """The resumable, sharded training loader and the validation loader of this rank."""

    def build_model(self, data: TaskData, info: DistInfo) -> nn.Module:
        """The network to train, on the CPU (called right after seeding: the same weights on every rank)."""

    def count(self, model: nn.Module) -> Tuple[int, Optional[int]]:
        """Parameters and MACs (None where the MAC counter does not apply)."""

    def ddp_options(self) -> Dict[str, Any]:
        """Extra ``DistributedDataParallel`` arguments."""

    def build_loss(self, data: TaskData) -> None:
        """Make what :meth:`loss` needs beyond the model (a criterion, mixup), once the data are known."""

    def loss(self, model: nn.Module, inputs: Any, targets: Any, device: torch.device) -> torch.Tensor:
        """The task's loss of one micro-batch (the loop adds the layers' auxiliary terms)."""

    def layer_progress(self, progress: float) -> float:
        """What :func:`dynconv.set_progress` receives, given the run's schedule progress in epochs."""

    # --------------------------------------------------------------------------------- scoring
    def evaluate(self, model: nn.Module, loader: Any, data: TaskData, device: torch.device) -> Dict[str, Any]:
        """The metrics over ``loader`` on every rank: numbers, ``count`` (images), and optionally a printable
        ``summary`` text that stays out of the logged row."""

    def validated(self, row: Dict[str, Any]) -> None:
        """The ``eval_*`` row of the validation just run (a task whose summary reports it keeps it)."""

    def scores(self, row: Mapping[str, Any]) -> str:
        """An epoch row's scores as the console line shows them."""

    def summary(self, best_score: float) -> Dict[str, Any]:
        """The task's values in the run's summary (the best score under its own name)."""

    def state(self) -> Dict[str, Any]:
        """Entries the task adds to a checkpoint."""

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Take back what :meth:`state` wrote."""

    # --------------------------------------------------------------------------------- eval.py
    def prepare_eval(self, state: Optional[Mapping[str, Any]], device: torch.device) -> EvalSubject:
        """Data, model and validation loader for ``eval.py``, the checkpoint's ``state`` loaded (None: none)."""

    def eval_result(self, subject: EvalSubject, metrics: Dict[str, Any], seconds: float,
                    device: torch.device) -> Dict[str, Any]:
        """``eval.py``'s result from the metrics and the seconds the scoring loop took."""


__all__ = ["EvalSubject", "Task", "TaskData"]

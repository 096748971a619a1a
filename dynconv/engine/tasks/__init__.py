"""The problems the engine trains and scores, one file each: :mod:`.classification`, :mod:`.detection`.

Each implements :class:`~.protocol.Task`; :func:`dynconv.engine.run.task_for` picks one from ``cfg.task``.
The implementations are not imported here: detection needs pycocotools, and a run loads only its own task.
"""
from .protocol import EvalSubject, Task, TaskData

__all__ = ["EvalSubject", "Task", "TaskData"]

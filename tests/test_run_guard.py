"""One writer per run directory, and a resume only with the run's own settings."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dynconv.engine.run_guard import (ConfigChanged, RunDirectoryBusy, RunLock, check_resume, config_changes,
                                      remove_orphan_temp_files)

HOLD = """
import sys, time
from dynconv.engine.run_guard import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_stopped_naming_the_holder_and_a_killed_holder_frees_the_directory(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirectoryBusy, match=rf"is in use by PID {holder.pid} on host "):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path) as lock:  # the kernel dropped the dead process's lock: no stale lock file to clear
        assert f"PID {os.getpid()}" in lock.path.read_text()
        with pytest.raises(RunDirectoryBusy):
            RunLock(tmp_path).acquire()  # also within one process: another open file description
    RunLock(tmp_path).acquire().release()


def test_orphan_temp_files_are_removed(tmp_path):
    orphan = tmp_path / ".last.pt.4242.deadbeef.tmp"
    orphan.write_bytes(b"half a checkpoint")
    (tmp_path / "last.pt").write_bytes(b"x")
    assert remove_orphan_temp_files(tmp_path) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


STORED = {"name": "default", "recipe": {"epochs": 1, "optimizer": {"lr": 0.2, "weight_decay": 1e-4}},
          "trainer": {"workers": 4, "batch_size": None}, "data": {"root": "/a", "image_size": 64},
          "logger": {"name": "none"}}


def _with(**changes):
    import copy

    cfg = copy.deepcopy(STORED)
    for dotted, value in changes.items():
        *path, leaf = dotted.split("__")
        node = cfg
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


def test_only_values_that_change_the_result_count():
    same = _with(trainer__workers=0, data__root="/b", logger__name="wandb", name="other")
    assert config_changes(STORED, same) == []
    changed = _with(recipe__optimizer__lr=0.8, data__image_size=32)
    assert config_changes(STORED, changed) == [("data.image_size", 64, 32), ("recipe.optimizer.lr", 0.2, 0.8)]
    assert config_changes({"model": {"name": "r"}}, {"model": {"name": "r", "drop_path_mode": "linear"}}) == []


def test_a_changed_value_stops_the_resume_with_the_two_ways_on(tmp_path):
    with pytest.raises(ConfigChanged) as err:
        check_resume(STORED, _with(recipe__optimizer__lr=0.8), [], tmp_path / "last.pt")
    message = str(err.value)
    assert "recipe.optimizer.lr: 0.2 in the run, 0.8 now" in message
    assert "start a new run directory" in message and "trainer.resume_changes=[recipe.optimizer.lr]" in message
    # weight decay cannot be changed in a resumed run: only the new directory is offered
    with pytest.raises(ConfigChanged) as err:
        check_resume(STORED, _with(recipe__optimizer__weight_decay=0.0), [], tmp_path / "last.pt")
    assert "resume_changes" not in str(err.value)
    with pytest.raises(ConfigChanged, match="recipe.optimizer.weight_decay cannot change in a resumed run"):
        check_resume(STORED, STORED, ["recipe.optimizer.weight_decay"], tmp_path / "last.pt")


def test_an_allowed_change_is_returned():
    assert check_resume(STORED, _with(recipe__epochs=2), ["recipe.epochs"], "last.pt") == ["recipe.epochs"]
    assert check_resume(STORED, STORED, ["recipe.epochs"], "last.pt") == []

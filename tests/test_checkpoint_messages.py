"""Checkpoint errors that tell the truth: a full disk, foreign or malicious files, a directory, a flipped byte."""
from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from dynconv.checkpoint import CHECKSUM_KEY, CheckpointError, CheckpointManager, load_checkpoint, load_weights


@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KiB file system (tmpfs), so that writes fail with ENOSPC as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(small_disk):
    manager = CheckpointManager(small_disk)
    manager.save("last", {"step": 1, "w": torch.ones(1000)})
    with pytest.raises(CheckpointError) as err:
        manager.save("last", {"step": 2, "w": torch.ones(400_000)})  # 1.6 MB on a 512 KiB disk
    assert str(err.value) == f"no space left on device writing {small_disk / 'last.pt'}; the previous last.pt is intact"
    assert manager.load("last")["step"] == 1
    assert sorted(os.listdir(small_disk)) == ["last.pt"]  # no temp file left behind
    with pytest.raises(CheckpointError, match=r"best.pt; nothing was written there$"):
        manager.save("best", {"w": torch.ones(400_000)})


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_malicious_pickle_is_not_a_checkpoint_and_no_unsafe_advice_is_given(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} is not a dynconv or official checkpoint")
    assert "system" in message and "weights_only" not in message and "was not loaded" in message


@pytest.mark.parametrize("content", [os.urandom(4096), pickle.dumps({"a": 1})[:-1], b"PK\x03\x04" + os.urandom(500)])
def test_random_bytes_are_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "random.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"checkpoint {path} is not a dynconv or official checkpoint")
    assert "weights_only" not in str(err.value)


def test_a_directory_is_not_reported_missing(tmp_path):
    (tmp_path / "last.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"last.pt is a directory, not a checkpoint file$"):
        load_checkpoint(tmp_path / "last.pt")


def _flip_a_tensor_byte(path: Path, needle: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(needle)
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_dynconv_checkpoint_is_caught(tmp_path):
    manager = CheckpointManager(tmp_path)
    weights = torch.arange(4096, dtype=torch.float32) + 0.5
    path = manager.save("last", {"model": {"w": weights}, "meta": {"arch": "x"}, "step": 3})
    assert load_checkpoint(path)[CHECKSUM_KEY]["sha256"]  # stored, and verified on a clean load
    _flip_a_tensor_byte(path, (torch.tensor([1000.5]).numpy().tobytes()))
    with pytest.raises(CheckpointError, match=r"is corrupt: its contents no longer match the checksum"):
        load_checkpoint(path)
    # without the check torch loads it silently, with one changed value: that is what the checksum is for
    loaded = torch.load(path, weights_only=True)["model"]["w"]
    assert (loaded != weights).sum() == 1


def test_an_official_file_has_no_checksum_and_loads(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_another_models_checkpoint_is_named_by_its_file(tmp_path):
    state = {"model": {"w": torch.ones(1)}, "meta": {"arch": "resnet18", "conv": "static"}}
    with pytest.raises(CheckpointError, match=r"^checkpoint /runs/x/best.pt was trained for arch=resnet18"):
        load_weights(torch.nn.Linear(1, 1), state, expect={"arch": "resnet50", "conv": "static"},
                     source_name="/runs/x/best.pt")

"""dynconv.checkpoint: atomic writes, safe loading, RNG round trip, weight loading, run checkpoints."""
import argparse
import random

import numpy as np
import pytest
import torch
from torch import nn

import dynconv
from dynconv.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_save,
    clean_state_dict,
    load_checkpoint,
    load_weights,
    unwrap_model,
)
from dynconv.rng import rng_state, set_rng_state


class _Custom:  # module level so that pickle can name it
    pass


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("serializer died half-way")


def _model(arch="resnet18", conv="static"):
    return dynconv.create_model(arch, conv, num_classes=10).eval()


def _out(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


# --------------------------------------------------------------------------------------------------
# atomic_save / load_checkpoint


def _half_write_then_raise(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a zip, then the "process" dies
    raise KeyboardInterrupt


@pytest.mark.parametrize("failure", ["pickling", "killed"])
def test_atomic_save_interrupted_keeps_previous(tmp_path, monkeypatch, failure):
    path = tmp_path / "last.pt"
    old = {"step": 5, "w": torch.arange(10.0)}
    atomic_save(old, path)
    if failure == "pickling":
        with pytest.raises(RuntimeError, match="half-way"):
            atomic_save({"step": 6, "w": torch.zeros(100_000), "bad": _Unpicklable()}, path)
    else:
        monkeypatch.setattr(torch, "save", _half_write_then_raise)
        with pytest.raises(KeyboardInterrupt):
            atomic_save({"step": 6}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 5 and torch.equal(loaded["w"], old["w"])


def test_atomic_save_replaces(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    atomic_save({"step": 1}, path)
    atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_load_missing_truncated_and_foreign(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(50_000)}, good)
    data = good.read_bytes()
    for name, content in [("torn.pt", data[: len(data) // 2]), ("empty.pt", b""), ("text.pt", b"not a checkpoint")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match="incomplete or corrupt") as err:
            load_checkpoint(bad)
        assert str(bad) in str(err.value)


@pytest.mark.parametrize("zip_format", [True, False])
def test_load_refuses_custom_class(tmp_path, zip_format):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": _Custom()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and f"{__name__}._Custom" in message
    # issue 17: torch's advice to retry with weights_only=False would run the file's code: never passed on
    assert "is not a dynconv or official checkpoint" in message and "was not loaded" in message
    assert "weights_only" not in message


def test_load_allows_namespace(tmp_path):
    path = tmp_path / "kw.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    assert load_checkpoint(path)["args"].lr == 0.1


def test_safetensors(tmp_path, x):
    from safetensors.torch import save_file

    src, dst = _model(), _model()
    path = tmp_path / "weights.safetensors"
    save_file(src.state_dict(), path)
    load_weights(dst, path)
    assert torch.equal(_out(src, x), _out(dst, x))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------------------
# RNG state


def _draw():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + np.random.randn(3).tolist(),
        torch.rand(3),
        torch.randn(3),
    )


def test_rng_round_trip_through_file(tmp_path):
    random.gauss(0, 1)  # leave a cached Gaussian in both python and numpy
    np.random.randn(1)
    path = atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    first = _draw()
    set_rng_state(load_checkpoint(path)["rng"])
    again = _draw()
    assert first[0] == again[0] and first[1] == again[1]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    raw = torch.load(path, weights_only=True)["rng"]  # plain weights_only load, no allowlist
    assert isinstance(raw["numpy"][1], list) and isinstance(raw["python"]["state"], list)


# --------------------------------------------------------------------------------------------------
# Model weights


def test_unwrap_and_clean():
    net = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(net)) is net
    assert unwrap_model(torch.compile(net)) is net
    state = clean_state_dict({"module._orig_mod.a": 1, "module.b": 2, "c.module.d": 3})
    assert state == {"a": 1, "b": 2, "c.module.d": 3}


def test_dynconv_checkpoint_round_trip(tmp_path, x):
    src, dst, ema = _model(), _model(), _model()
    assert not torch.equal(_out(src, x), _out(dst, x))
    meta = {"arch": "resnet18", "conv": "static", "config": {"lr": 0.1}}
    checkpoint = {"model": src.state_dict(), "ema": ema.state_dict(), "meta": meta, "epoch": 3}
    path = atomic_save(checkpoint, tmp_path / "a.pt")
    text = load_weights(dst, path, expect={"arch": "resnet18", "conv": "static"})
    assert str(path) in text and "resnet18" in text
    assert torch.equal(_out(src, x), _out(dst, x))
    load_weights(dst, path, use_ema=True)
    assert torch.equal(_out(ema, x), _out(dst, x))


def test_prefixed_state_dict(x):
    src, dst = _model(), _model()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    load_weights(nn.DataParallel(dst), wrapped)
    assert torch.equal(_out(src, x), _out(dst, x))


def test_expect_mismatch_names_both(tmp_path):
    src, dst = _model(), _model()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    meta = {"arch": "resnet50", "conv": "static"}
    path = atomic_save({"model": src.state_dict(), "meta": meta}, tmp_path / "r50.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(dst, path, expect={"arch": "resnet18", "conv": "odconv_4x"})
    assert str(err.value) == (
        f"checkpoint {path} was trained for arch=resnet50 conv=static, "
        "but the model is arch=resnet18 conv=odconv_4x"
    )
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_other_architecture_lists_keys(tmp_path):
    foreign = _model("mobilenetv2_050").state_dict()
    path = atomic_save(foreign, tmp_path / "mbv2.pt")
    dst = _model()
    with pytest.raises(CheckpointError) as err:
        load_weights(dst, path)
    message = str(err.value)
    missing = [k for k in dst.state_dict() if k not in foreign]
    unexpected = [k for k in foreign if k not in dst.state_dict()]
    assert str(path) in message
    assert f"missing ({len(missing)}): {', '.join(missing[:5])}" in message
    assert f"unexpected ({len(unexpected)}): {', '.join(unexpected[:5])}" in message
    assert missing[5] not in message


def test_shape_mismatch_strict_and_partial(x):
    src = dynconv.create_model("resnet18", "static", num_classes=7).eval()
    dst = _model()
    expected = r"shape mismatch \(2\): fc.weight: checkpoint \[7, 512\] vs model \[10, 512\]"
    with pytest.raises(CheckpointError, match=expected):
        load_weights(dst, src.state_dict())
    fc = dst.fc.weight.clone()
    text = load_weights(dst, src.state_dict(), strict=False)
    assert "2 shape-mismatched" in text
    assert torch.equal(dst.fc.weight, fc) and torch.equal(dst.conv1.weight, src.conv1.weight)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_050"])
def test_official_layout(tmp_path, x, arch):
    src = _model(arch, "odconv_1x")
    dynconv.set_progress(src, float("inf"))  # import_official evaluates at the final temperature
    path = atomic_save(dynconv.export_official(src), tmp_path / "odconv.pth")
    dst = _model(arch, "odconv_1x")
    text = load_weights(dst, path)
    assert str(path) in text
    assert torch.equal(_out(src, x), _out(dst, x))


# --------------------------------------------------------------------------------------------------
# CheckpointManager


def test_manager(tmp_path):
    run = tmp_path / "run"
    primary, other = CheckpointManager(run), CheckpointManager(run, is_primary=False)
    assert primary.load("last") is None and not primary.exists("last")
    assert other.save("last", {"step": 1}) is None and not run.exists()
    path = primary.save("last", {"step": 3, "w": torch.ones(2), "config": {"lr": 0.1}})
    assert path == run / "last.pt" == primary.path("last") and primary.exists("last")
    assert other.load("last")["step"] == 3  # every rank reads
    assert torch.load(path, weights_only=True)["config"] == {"lr": 0.1}
    with pytest.raises(ValueError):
        primary.path("../escape")

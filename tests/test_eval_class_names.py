"""``eval.py`` refuses data whose class names differ from those the checkpoint was trained on, unless told
``ignore_class_names=true``: label i of other data is not the class output i learnt, and top-1 would be
measured against the wrong labels without any error."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cli import TINY, ok, run
from dynconv.checkpoint import CheckpointError, load_checkpoint
from dynconv.data import SYNTHETIC_CLASSES
from dynconv.engine.tasks.classification import check_class_names

RUN = ["a", "b", "c"]


def test_the_same_names_pass_and_other_names_or_order_are_refused():
    state = {"meta": {"arch": "resnet18", "classes": RUN}}
    assert check_class_names(state, ["a", "b", "c"], "ck.pt") is None
    with pytest.raises(CheckpointError) as info:
        check_class_names(state, ["a", "c", "b"], "ck.pt")  # the same names, other labels
    message = str(info.value)
    assert message.startswith("ck.pt was trained on 3 classes, the data has 3, and they differ first at label 1: "
                              "'b' in the checkpoint, 'c' in the data")
    assert "ignore_class_names=true" in message
    with pytest.raises(CheckpointError, match=r"differ first at label 2: 'c' in the checkpoint, 'x' in the data "
                                              r"\(only in the checkpoint: \['c'\], only in the data: \['x'\]\)"):
        check_class_names(state, ["a", "b", "x"], "ck.pt")
    with pytest.raises(CheckpointError, match="on 3 classes, the data has 2, .* label 2: 'c' in the checkpoint, "
                                              "nothing in the data"):
        check_class_names(state, ["a", "b"], "ck.pt")
    warning = check_class_names(state, ["a", "b", "x"], "ck.pt", ignore=True)
    assert warning.startswith("warning: ck.pt was trained on 3 classes") and "scoring anyway" in warning


def test_files_without_names():
    # official files (no dynconv meta) carry no class names: nothing to say
    assert check_class_names({"state_dict": {}}, RUN, "official.pth") is None
    assert check_class_names({"model": {}}, RUN, "official.pth") is None
    assert check_class_names(None, RUN, None) is None
    # a dynconv checkpoint written before the names were stored: said, not refused
    warning = check_class_names({"meta": {"arch": "resnet18", "num_classes": 3}}, RUN, "old.pt")
    assert warning == "warning: old.pt stores no class names (written by an older dynconv), so they cannot be " \
                      "checked against the data's 3 classes"


@pytest.mark.slow
def test_eval_py_stops_on_other_classes_and_scores_with_the_override(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    model = ["model=resnet18", "conv=static"]
    ok(run("train.py", TINY + model + ["recipe.epochs=1", "recipe.scheduler.warmup_epochs=0"], run_dir, cache))
    checkpoint = run_dir / "last.pt"
    stored = load_checkpoint(checkpoint)["meta"]["classes"]
    assert stored == sorted(SYNTHETIC_CLASSES[:4])  # what the trainer stores (dynconv/engine/tasks/classification.py meta)
    # an ImageFolder set with as many classes, named otherwise: the weights fit, the labels do not
    other = [f"n0{i}" for i in range(4)]
    for name in other:
        for split in ("train", "val"):
            path = tmp_path / "inet" / split / name / "0.png"
            path.parent.mkdir(parents=True)
            Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(path)
    args = ["data=imagenet", f"data.root={tmp_path / 'inet'}", "data.image_size=16", f"checkpoint={checkpoint}",
            "bench_batches=0", *model]
    refused = run("eval.py", args, tmp_path / "eval", cache)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"error: {checkpoint} was trained on 4 classes, the data has 4, and they differ first at label 0: "
        f"{stored[0]!r} in the checkpoint, 'n00' in the data (only in the checkpoint: {stored}, only in the data: "
        f"{other}): the scores would count the wrong labels. Evaluate on the run's classes (data.root, "
        f"data.classes / data.num_classes), or set ignore_class_names=true to score anyway")
    scored = ok(run("eval.py", args + ["ignore_class_names=true"], tmp_path / "eval2", cache))
    assert '"num_images": 4' in scored.stdout
    assert scored.stderr.startswith(f"warning: {checkpoint} was trained on 4 classes")
    # the run's own data: no warning
    same = ok(run("eval.py", TINY[:4] + model + [f"checkpoint={checkpoint}", "bench_batches=0"], tmp_path / "eval3",
                  cache))
    assert "warning" not in same.stderr and '"num_images": 16' in same.stdout

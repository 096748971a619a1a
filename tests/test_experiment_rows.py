"""Each paper table's experiment: its runs carry the recipe name of its rows in ``results/paper.csv`` (that is
how the results tables match runs to rows), and the KernelWarehouse MobileNetV2 rows train with the label
smoothing of their official configs."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dynconv.engine.config import apply_row

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# train.py registers its schema with Hydra when imported
_spec = importlib.util.spec_from_file_location("dynconv_entry_train_rows", ROOT / "train.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))


def _config(experiment: str, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=/tmp/unused", f"experiment={experiment}", "data.root=/d",
                                          *overrides])
    cfg = OmegaConf.to_object(cfg)
    apply_row(cfg)
    return cfg


def _paper_tables():
    tables = {}
    with open(ROOT / "results" / "paper.csv", newline="") as f:
        for row in csv.DictReader(f):
            tables.setdefault(row["table"], set()).add(row["recipe"])
    return tables


@pytest.mark.parametrize("table", sorted(_paper_tables()))
def test_each_tables_experiment_trains_its_rows_recipe(table):
    """A run of ``experiment=<table>`` fills that table's rows only if it reports their recipe name."""
    (recipe,) = _paper_tables()[table]  # one recipe per table
    assert _config(table).recipe.name == recipe


def test_kw_mobilenetv2_has_its_own_recipe_name():
    """Its recipe differs from the ODConv one it starts from (Nesterov SGD, per-iteration cosine to 1e-6, no
    weight decay on 1-d parameters: OSVAI/KernelWarehouse main.py, optim_factory.py), so its runs must not
    fill the ODConv MobileNetV2 rows (recipe mobilenetv2_150ep)."""
    kw, od = _config("kw_mobilenetv2"), _config("odconv_mobilenetv2")
    assert (kw.recipe.name, od.recipe.name) == ("kw_mobilenetv2_150ep", "mobilenetv2_150ep")
    assert (kw.recipe.scheduler.per_iteration, od.recipe.scheduler.per_iteration) == (True, False)


# OSVAI/KernelWarehouse configs/mobilenetv2_{100,050}/*.json: "smoothing": 0 at line 11 where the key is
# present; where it is absent main.py's --smoothing default (0.1, main.py:98) applies.
KW_MOBILENETV2_SMOOTHING = [
    ("mobilenetv2_100", "static", 0.0),  # configs/mobilenetv2_100/mobilenetv2_100.json:11
    ("mobilenetv2_100", "kw_1d2x", 0.0),  # configs/mobilenetv2_100/kw1d2x_mobilenetv2_100.json:11
    ("mobilenetv2_100", "kw_1x", 0.1),  # configs/mobilenetv2_100/kw1x_mobilenetv2_100.json: no key
    ("mobilenetv2_100", "kw_4x", 0.1),  # configs/mobilenetv2_100/kw4x_mobilenetv2_100.json: no key
    ("mobilenetv2_050", "static", 0.0),  # configs/mobilenetv2_050/mobilenetv2_050.json:11
    ("mobilenetv2_050", "kw_1d2x", 0.0),  # configs/mobilenetv2_050/kw1d2x_mobilenetv2_050.json:11
    ("mobilenetv2_050", "kw_1x", 0.0),  # configs/mobilenetv2_050/kw1x_mobilenetv2_050.json:11
    ("mobilenetv2_050", "kw_4x", 0.1),  # configs/mobilenetv2_050/kw4x_mobilenetv2_050.json: no key
]


@pytest.mark.parametrize("model,conv,smoothing", KW_MOBILENETV2_SMOOTHING)
def test_kw_mobilenetv2_label_smoothing_follows_each_official_config(model, conv, smoothing):
    cfg = _config("kw_mobilenetv2", f"model={model}", f"conv={conv}")
    assert cfg.recipe.aug.smoothing == smoothing
    assert cfg.recipe.name == "kw_mobilenetv2_150ep"

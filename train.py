"""Train a classifier: ``python train.py [model=resnet18] [conv=odconv_4x] [recipe=classic_100ep] ...``.

The configuration is composed by Hydra from ``configs/`` and checked against the schema in
``dynconv.engine.config``; the work is done by :func:`dynconv.engine.train`. Under ``torchrun`` every
rank composes the same configuration and joins the process group from the environment.
"""
import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynconv.engine import config as schema

ConfigStore.instance().store(name="train_schema", node=schema.TrainConfig)


def job(cfg: DictConfig) -> dict:
    from dynconv.engine import train
    from dynconv.engine.config import apply_row

    config = OmegaConf.to_object(cfg)
    given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    apply_row(config, protected=given)  # an experiment's per-row settings, unless given on the command line
    return train(config)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from dynconv.engine import run_main

    run_main(job, cfg, user_errors=(OmegaConfBaseException,))


if __name__ == "__main__":
    sys.exit(main())

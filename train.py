"""Train a classifier: ``python train.py [model=resnet18] [conv=odconv_4x] [recipe=classic_100ep] ...``.

The configuration is composed by Hydra from ``configs/`` and checked against the schema in
``dynconv.engine.config``; the work is done by :func:`dynconv.engine.train`. Under ``torchrun`` every
rank composes the same configuration and joins the process group from the environment.
"""
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynconv.engine import config as schema

ConfigStore.instance().store(name="train_schema", node=schema.TrainConfig)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from dynconv.engine import run_main, train

    run_main(lambda: train(OmegaConf.to_object(cfg)), user_errors=(OmegaConfBaseException,))


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a checkpoint: ``python eval.py checkpoint=PATH [model=...] [conv=...] [data=...]``.

Prints top-1, top-5, parameters, MACs and images/s and writes them as JSON (``output=``). Takes dynconv
checkpoints and the official ODConv / KernelWarehouse / DCD / DGC / IC-Conv files.
"""
import json
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynconv.engine import config as schema

ConfigStore.instance().store(name="eval_schema", node=schema.EvalConfig)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from dynconv.engine import run_eval, run_main

    result = run_main(lambda: run_eval(OmegaConf.to_object(cfg)), user_errors=(OmegaConfBaseException,))
    print(json.dumps(result, indent=2))
    if cfg.output:
        print(f"written to {cfg.output}")


if __name__ == "__main__":
    sys.exit(main())

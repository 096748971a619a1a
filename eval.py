"""Evaluation entry point (not implemented yet)."""

import sys

MESSAGE = (
    "eval.py: the evaluation entry point (Hydra configs, dynconv and official checkpoints) lands "
    "with the training issue and does not exist yet; this script evaluates nothing. To see the "
    "dynamic convolution layers working today, run `make demo`."
)

if __name__ == "__main__":
    print(MESSAGE, file=sys.stderr)
    sys.exit(2)

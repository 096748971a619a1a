"""Training entry point (not implemented yet)."""

import sys

MESSAGE = (
    "train.py: the training entry point (Hydra configs, recipes, DDP, SLURM, W&B) lands with the "
    "training issue and does not exist yet; this script trains nothing. To see the dynamic "
    "convolution layers working today, run `make demo`."
)

if __name__ == "__main__":
    print(MESSAGE, file=sys.stderr)
    sys.exit(2)

"""Shared pytest set-up: one torch thread per xdist worker, and a fixed seed for every test."""

import os
import random

import numpy as np
import pytest
import torch

# Under pytest-xdist each worker is its own process; one intra-op thread each keeps
# 2 workers on 2 cores from oversubscribing the CPU.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch, random and numpy with 0 before every test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0

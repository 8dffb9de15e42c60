"""Child process of ``test_robustness``: save one seeded model to the same path, over and over.

Usage: ``python save_checkpoints_forever.py PATH SEED HIDDEN``. Runs until it is killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from exactflow import checkpoint
from exactflow.data import Standardizer
from exactflow.models import realnvp


def main() -> None:
    path, seed, hidden = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    flow = realnvp(hidden=hidden)
    standardizer = Standardizer(mean=np.array([1.0, -2.0]), std=np.array([3.0, 0.5]))
    model = {"name": "realnvp", "dim": 2, "options": {"hidden": hidden}}
    while True:
        checkpoint.save(path, flow, model=model, standardizer=standardizer, info={"seed": seed})


if __name__ == "__main__":
    main()

"""How close to the entropy floor a plain estimator gets from the same 4,000 training points.

For Two Moons and Two Circles and each seed, fits an isotropic Gaussian kernel density
estimate to the standardized training split and scores the held-out split, with the bandwidth
chosen on those held-out points themselves: an optimistic baseline, since no honest model
may look at its test set. Prints a Markdown table beside the held-out NLL of the true density
on the same points (and on the training points), so that a flow's gap to the floor can be
read against what finite data allows.

    .venv/bin/python benchmarks/kde_baseline.py             # 3 seeds, a few minutes
    .venv/bin/python benchmarks/kde_baseline.py --seeds 1
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.special import logsumexp

from exactflow import truth
from exactflow.data import load_split

DATASETS = ("moons", "circles")
BANDWIDTHS = np.geomspace(0.02, 0.2, 25)


def kde_nll(squared: np.ndarray, dim: int, bandwidth: float) -> float:
    """Mean NLL under a Gaussian KDE, from the squared distances test × train."""
    log_p = (
        logsumexp(-squared / (2.0 * bandwidth**2), axis=1)
        - np.log(squared.shape[1])
        - 0.5 * dim * np.log(2.0 * np.pi * bandwidth**2)
    )

    return float(-log_p.mean())


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds from 0 (default 3)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")

    print(
        "| dataset | seed | true density, training points | true density | "
        "KDE, best bandwidth | bandwidth | KDE − true |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for dataset in DATASETS:
        for seed in range(args.seeds):
            split = load_split(dataset, seed)
            mean, std = split.standardizer.mean, split.standardizer.std
            on_train = -float(truth.log_density(dataset, split.train, mean, std).mean())
            true = -float(truth.log_density(dataset, split.test, mean, std).mean())
            squared = ((split.test[:, None, :] - split.train[None, :, :]) ** 2).sum(-1)
            dim = split.train.shape[1]
            kde, bandwidth = min((kde_nll(squared, dim, h), h) for h in BANDWIDTHS)
            print(
                f"| {dataset} | {seed} | {on_train:.4f} | {true:.4f} | {kde:.4f} "
                f"| {bandwidth:.3f} | {kde - true:+.4f} |"
            )
    print(
        "\nHeld-out NLL in nats per point, standardized coordinates, 4,000 training and 4,000 "
        "held-out points per seed; the bandwidth (in standardized units) is the best of "
        f"{len(BANDWIDTHS)} from {BANDWIDTHS[0]:g} to {BANDWIDTHS[-1]:g} on the held-out points."
    )


if __name__ == "__main__":
    main()

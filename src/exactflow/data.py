"""Built-in datasets and the per-coordinate standardization fitted on training data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.datasets import make_circles, make_moons

NOISE = 0.06
CIRCLES_FACTOR = 0.4


def generate(name: str, n: int, seed: int) -> np.ndarray:
    """Draw ``n`` raw points of shape ``(n, 2)`` from the built-in dataset ``name``.

    ``moons`` is scikit-learn's ``make_moons`` and ``circles`` its ``make_circles`` with radius
    ratio 0.4, both with Gaussian noise of standard deviation 0.06.
    """
    if name == "moons":
        x, _ = make_moons(n_samples=n, noise=NOISE, random_state=seed)
    elif name == "circles":
        x, _ = make_circles(n_samples=n, noise=NOISE, factor=CIRCLES_FACTOR, random_state=seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")

    return x


DATASETS = ("moons", "circles")


@dataclass(frozen=True)
class Standardizer:
    """The affine map ``(x - mean) / std`` fitted on training data, per coordinate."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """Fit to the rows of ``x`` of shape ``(n, d)``."""
        return cls(mean=x.mean(0), std=x.std(0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Map raw rows to standardized ones."""
        return (x - self.mean) / self.std

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Map standardized rows back to raw units."""
        return y * self.std + self.mean

    @property
    def log_det(self) -> float:
        """Log-abs-det of ``transform``: add it to a standardized log-density for raw units."""
        return float(-np.log(self.std).sum())


@dataclass(frozen=True)
class Split:
    """A training set and a held-out set, both standardized with the training statistics."""

    train: np.ndarray
    test: np.ndarray
    standardizer: Standardizer


def load_split(name: str, seed: int, n: int = 4000) -> Split:
    """Draw a training and a held-out set of ``n`` points each, with different seeds."""
    train = generate(name, n, seed)
    test = generate(name, n, seed + 100_003)
    standardizer = Standardizer.fit(train)

    return Split(standardizer.transform(train), standardizer.transform(test), standardizer)

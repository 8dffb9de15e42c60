"""Held-out scores and density grids for trained flows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from exactflow.flow import Flow, standard_normal_log_prob
from exactflow.train import evaluate_nll

OUTLIER_NATS = 10.0


@dataclass(frozen=True)
class Grid:
    """A regular ``n × n`` grid over a rectangle of the plane."""

    low: tuple[float, float]
    high: tuple[float, float]
    n: int

    @classmethod
    def covering(cls, x: np.ndarray, n: int = 300, margin: float = 0.5) -> Grid:
        """Return a grid covering the rows of ``x`` (shape ``(m, 2)``) with a margin."""
        low = x.min(0) - margin
        high = x.max(0) + margin

        return cls((float(low[0]), float(low[1])), (float(high[0]), float(high[1])), n)

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """The cell centres along each axis."""
        xs = np.linspace(self.low[0], self.high[0], self.n)
        ys = np.linspace(self.low[1], self.high[1], self.n)

        return xs, ys

    @property
    def points(self) -> np.ndarray:
        """All grid points, shape ``(n * n, 2)``, row-major in y."""
        xs, ys = self.axes
        xx, yy = np.meshgrid(xs, ys)

        return np.stack([xx.ravel(), yy.ravel()], axis=1)

    @property
    def cell_area(self) -> float:
        """The area each grid point stands for."""
        dx = (self.high[0] - self.low[0]) / (self.n - 1)
        dy = (self.high[1] - self.low[1]) / (self.n - 1)

        return dx * dy

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)``, as image plots expect."""
        return (self.low[0], self.high[0], self.low[1], self.high[1])


def grid_log_prob(flow: Flow, grid: Grid) -> np.ndarray:
    """Return the model's log-density on ``grid`` as an ``(n, n)`` array (rows are y)."""
    points = torch.as_tensor(grid.points, dtype=torch.get_default_dtype())
    log_p = -evaluate_nll(flow, points).double().numpy()

    return log_p.reshape(grid.n, grid.n)


def grid_mass(log_p: np.ndarray, grid: Grid) -> float:
    """Return the Riemann sum of ``exp(log_p)`` over the grid: about 1 for a normalised density."""
    with np.errstate(over="ignore"):
        return float(np.exp(log_p).sum() * grid.cell_area)


def gaussian_baseline_nll(x: np.ndarray) -> float:
    """Return the mean NLL of standardized rows ``x`` under the standard Gaussian ``N(0, I)``."""
    return float(-standard_normal_log_prob(torch.as_tensor(x, dtype=torch.float64)).mean())


@dataclass(frozen=True)
class Scores:
    """Summaries of per-point negative log-likelihoods."""

    mean: float
    median: float
    standard_error: float
    outlier_share: float

    @classmethod
    def of(cls, nll: np.ndarray, floor: float = math.nan) -> Scores:
        """Summarise ``nll``; ``outlier_share`` counts points more than 10 nats above ``floor``."""
        outliers = float(np.mean(nll > floor + OUTLIER_NATS)) if math.isfinite(floor) else math.nan

        return cls(
            mean=float(np.mean(nll)),
            median=float(np.median(nll)),
            standard_error=float(np.std(nll, ddof=1) / math.sqrt(len(nll))),
            outlier_share=outliers,
        )

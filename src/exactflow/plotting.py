"""Figures: log-likelihood heatmaps, layer-by-layer transformations, samples against data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from exactflow.evaluation import Grid
from exactflow.flow import Flow

FLOOR = -12.0


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def heatmaps(
    rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]],
    grids: Sequence[Grid],
    path: Path,
    difference: bool = False,
) -> None:
    """Draw log-density heatmaps on one colour scale, one row per label, one column per panel.

    Args:
        rows: ``(row label, [(column title, log-density of shape (n, n)), ...])`` per row.
        grids: the grid of each column.
        path: the PNG file to write.
        difference: if true, the last column of every row is a pointwise difference and gets a
            diverging colour scale of its own.
    """
    columns = len(rows[0][1])
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(3.2 * columns, 3.0 * len(rows)), squeeze=False
    )
    density_columns = columns - 1 if difference else columns

    # One colour scale for every density panel, clipped far below the peak.
    values = np.stack([panels[c][1] for _, panels in rows for c in range(density_columns)])
    finite = values[np.isfinite(values)]
    high = float(finite.max()) if finite.size else 0.0
    for c in range(columns):
        for r, (label, panels) in enumerate(rows):
            title, log_p = panels[c]
            ax = axes[r, c]
            if c < density_columns:
                image = ax.imshow(
                    np.clip(log_p, FLOOR, None),
                    origin="lower",
                    extent=grids[c].extent,
                    cmap="viridis",
                    vmin=max(FLOOR, high - 14.0),
                    vmax=high,
                    aspect="auto",
                )
            else:
                # Symmetric scale from the bulk of the differences, at most 10 nats.
                bound = float(np.clip(np.nanpercentile(np.abs(log_p), 95), 1.0, 10.0))
                image = ax.imshow(
                    log_p,
                    origin="lower",
                    extent=grids[c].extent,
                    cmap="RdBu_r",
                    vmin=-bound,
                    vmax=bound,
                    aspect="auto",
                )
            figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label)

    _save(figure, path)


@torch.no_grad()
def transformation(flow: Flow, path: Path, title: str, n: int = 1000, seed: int = 0) -> None:
    """Push base-Gaussian draws through the inverse map stage by stage, one panel per stage.

    Each point keeps the colour of its angle in base space, so the panels show how the
    Gaussian is stretched, bent and folded into the data.
    """
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, flow.dim, generator=generator)
    was_training = flow.training
    flow.eval()
    try:
        stages = [stage.numpy() for stage in flow.inverse_stages(z)]
    finally:
        flow.train(was_training)
    colour = np.arctan2(z[:, 1].numpy(), z[:, 0].numpy())
    names = ["base"] + [type(layer).__name__ for layer in reversed(flow.layers)]

    columns = min(len(stages), 6)
    rows = math.ceil(len(stages) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= len(stages):
            ax.axis("off")
            continue
        points = stages[index]
        ax.scatter(points[:, 0], points[:, 1], c=colour, cmap="hsv", s=2, linewidths=0)
        ax.set_title(f"{index}: {names[index]}", fontsize=7)
    figure.suptitle(title)

    _save(figure, path)


def samples(panels: Sequence[tuple[str, np.ndarray]], columns: int, path: Path) -> None:
    """Scatter each ``(title, points of shape (n, 2))`` panel, ``columns`` panels per row."""
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, points) in zip(axes.flat, panels, strict=False):
        ax.scatter(points[:, 0], points[:, 1], s=1.5, alpha=0.5, linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")

    _save(figure, path)


def loss_curve(epochs: np.ndarray, curves: dict[str, np.ndarray], path: Path) -> None:
    """Plot NLL curves (``{label: values per epoch}``) against the epoch number."""
    figure, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in curves.items():
        if np.isfinite(values).any():
            ax.plot(epochs, values, label=label, linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("NLL (nats per point, standardized)")
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)

    _save(figure, path)


def pairwise(samples: np.ndarray, data: np.ndarray | None, path: Path, limit: int = 6) -> None:
    """Pairwise scatter plots of model samples against data for the first ``limit`` columns."""
    d = min(samples.shape[1], limit)
    figure, axes = plt.subplots(d, d, figsize=(2.0 * d, 2.0 * d), squeeze=False)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == j:
                bins = 30
                if data is not None:
                    ax.hist(data[:, i], bins=bins, density=True, alpha=0.5, label="data")
                ax.hist(samples[:, i], bins=bins, density=True, alpha=0.5, label="samples")
            else:
                # Samples first, data on top, so that a small data set stays visible.
                ax.scatter(samples[:, j], samples[:, i], s=1, alpha=0.3, linewidths=0, c="C1")
                if data is not None:
                    ax.scatter(data[:, j], data[:, i], s=3, alpha=0.8, linewidths=0, c="C0")
            if i == d - 1:
                ax.set_xlabel(f"column {j + 1}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"column {i + 1}", fontsize=7)
    figure.suptitle("data (blue) and model samples (orange)" if data is not None else "samples")

    _save(figure, path)


def panel_table(
    columns: Sequence[str],
    rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]],
    grids: Sequence[Grid],
    path: Path,
) -> None:
    """Draw a table of panels, one column per title in ``columns`` and one row per label.

    Each panel is ``("log_p", values of shape (n, n))``, a log-density heatmap on its column's
    grid, or ``("points", rows of shape (m, 2))``, a scatter over the same extent. The heatmaps
    of a column share one colour scale, from 14 nats below the column's highest value up to it.

    Args:
        columns: the title of each column.
        rows: ``(row label, [panel per column])`` per row.
        grids: the grid of each column.
        path: the PNG file to write.
    """
    figure, axes = plt.subplots(
        len(rows), len(columns), figsize=(2.4 * len(columns), 2.3 * len(rows)), squeeze=False
    )
    for c, (title, grid) in enumerate(zip(columns, grids, strict=True)):
        heat = [panels[c][1] for _, panels in rows if panels[c][0] == "log_p"]
        finite = np.concatenate([v[np.isfinite(v)] for v in heat]) if heat else np.zeros(0)
        high = float(finite.max()) if finite.size else 0.0
        image = None
        for r, (label, panels) in enumerate(rows):
            kind, values = panels[c]
            ax = axes[r, c]
            if kind == "log_p":
                image = ax.imshow(
                    np.clip(values, FLOOR, None),
                    origin="lower",
                    extent=grid.extent,
                    cmap="viridis",
                    vmin=max(FLOOR, high - 14.0),
                    vmax=high,
                    aspect="auto",
                )
            else:
                ax.scatter(values[:, 0], values[:, 1], s=1.0, alpha=0.5, linewidths=0)
                ax.set_xlim(grid.low[0], grid.high[0])
                ax.set_ylim(grid.low[1], grid.high[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(label)
        if image is not None:
            bar = figure.colorbar(
                image, ax=axes[:, c].tolist(), orientation="horizontal", fraction=0.02, pad=0.01
            )
            bar.ax.tick_params(labelsize=7)

    _save(figure, path)

"""The zoo: every chosen model trained on every chosen dataset, in one table and one figure."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exactflow import checkpoint, plotting, truth
from exactflow.data import DATASETS, load_split
from exactflow.evaluation import Grid, grid_log_prob
from exactflow.experiments import MASS_TOLERANCE, json_safe, run_grid, summarise, train_runs
from exactflow.models import MODELS
from exactflow.train import Recipe

JSON_FILE = "zoo.json"
TABLE_FILE = "zoo.md"
FIGURE_FILE = "zoo.png"
GRID_POINTS = 200
SCATTER_POINTS = 2000


def _check(kind: str, names: Sequence[str], valid: Sequence[str]) -> list[str]:
    """Return ``names`` without repeats; raise ``ValueError`` naming the valid ones otherwise."""
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(
            f"unknown {kind} {', '.join(map(repr, unknown))}; valid {kind}s: {', '.join(valid)}"
        )
    if not names:
        raise ValueError(f"choose at least one {kind}; valid {kind}s: {', '.join(valid)}")

    return list(dict.fromkeys(names))


def _value(mean: float, std: float, seeds: int, sign: str = "") -> str:
    return f"{mean:{sign}.4f} ± {std:.4f}" if seeds > 1 else f"{mean:{sign}.4f}"


def table(summary: Sequence[dict[str, Any]], recipe_name: str, recipe: Recipe) -> str:
    """Render the summary as a Markdown table: models down, datasets across, units below."""
    models = list(dict.fromkeys(row["model"] for row in summary))
    datasets = list(dict.fromkeys(row["dataset"] for row in summary))
    cells = {(row["model"], row["dataset"]): row for row in summary}
    seeds = summary[0]["seeds"]

    floors = []
    for dataset in datasets:
        entropy = [cells[m, dataset]["entropy_mean"] for m in models if (m, dataset) in cells]
        floors.append(f"{statistics.fmean(entropy):.4f}" if math.isfinite(entropy[0]) else "—")
    lines = [
        "| model | params | " + " | ".join(datasets) + " |",
        "|" + "---|" * (2 + len(datasets)),
        "| entropy floor H | | " + " | ".join(floors) + " |",
    ]
    flagged = False
    for model in models:
        row_cells = []
        params = ""
        for dataset in datasets:
            row = cells.get((model, dataset))
            if row is None:
                row_cells.append("")
                continue
            params = f"{row['params']:,}"
            text = _value(row["test_nll_mean"], row["test_nll_std"], seeds)
            if not math.isnan(row["entropy_mean"]):
                text += f" (gap {_value(row['gap_mean'], row['gap_std'], seeds, '+')})"
            mass_ok = all(
                abs(row[key] - 1.0) <= MASS_TOLERANCE for key in ("grid_mass_min", "grid_mass_max")
            )
            flagged |= not mass_ok
            row_cells.append(text + ("" if mass_ok else " ⚠"))
        lines.append(f"| {model} | {params} | " + " | ".join(row_cells) + " |")

    spread = f"{seeds} seeds, mean ± standard deviation over seeds" if seeds > 1 else "one seed"
    notes = [
        "",
        f"Held-out NLL in nats per point, in standardized coordinates (each seed standardizes "
        f"with its own training set of 4,000 points and is scored on 4,000 fresh ones); "
        f"{spread}; evaluation mode.",
        "Entropy floor H: the entropy of the true data density, the lowest expected held-out NLL "
        "any model can reach; gap = held-out NLL − H estimates KL(p_true ‖ p_model). "
        "—: no exact density is implemented for the dataset, so no floor and no gap.",
        f"Recipe: {recipe_name} ({recipe.describe()}).",
    ]
    if flagged:
        notes.append(
            f"⚠: the model's density summed over a grid covering the data differs from 1 by "
            f"more than {MASS_TOLERANCE} for some seed."
        )

    return "\n".join([*lines, *notes]) + "\n"


def figure(
    records: Sequence[dict[str, Any]],
    models: Sequence[str],
    datasets: Sequence[str],
    out: Path,
) -> Path:
    """Draw the zoo's grid figure from the first seed's checkpoints; return its path.

    Columns are datasets. The first row is the true log-density where one exists, else a
    scatter of held-out data; then one row of learned log-density per model.
    """
    seed = min(r["seed"] for r in records)
    first = {(r["model"], r["dataset"]): r for r in records if r["seed"] == seed}
    grids = []
    rows: list[tuple[str, list[tuple[str, np.ndarray]]]] = [("truth / data", [])]
    rows += [(model, []) for model in models]
    for dataset in datasets:
        split = load_split(dataset, seed)
        grid = Grid.covering(split.train, GRID_POINTS)
        grids.append(grid)
        if dataset in truth.DATASETS:
            mean, std = split.standardizer.mean, split.standardizer.std
            true = truth.log_density(dataset, grid.points, mean, std)
            rows[0][1].append(("log_p", true.reshape(grid.n, grid.n)))
        else:
            rows[0][1].append(("points", split.test[:SCATTER_POINTS]))
        for r, model in enumerate(models, 1):
            flow, _, _ = checkpoint.load(out / first[model, dataset]["checkpoint"])
            rows[r][1].append(("log_p", grid_log_prob(flow, grid)))

    path = out / FIGURE_FILE
    plotting.panel_table(list(datasets), rows, grids, path)

    return path


def run_zoo(
    out: Path,
    models: Sequence[str],
    datasets: Sequence[str],
    recipe: Recipe,
    seeds: int = 1,
    jobs: int | None = None,
    first_seed: int = 0,
    recipe_name: str = "short",
) -> dict[str, Any]:
    """Train every model on every dataset with ``seeds`` seeds; write the table and figure.

    Runs train in parallel processes, one thread each, through
    :func:`exactflow.experiments.train_runs`, and each writes its checkpoint under
    ``out / "checkpoints"``. Then ``zoo.json`` (every run and the summary), ``zoo.md`` (the
    table) and ``zoo.png`` (the figure) are written into ``out``.

    Args:
        out: the output folder.
        models: names from :data:`exactflow.models.MODELS`.
        datasets: names from :data:`exactflow.data.DATASETS`.
        recipe: the training recipe of every run.
        seeds: seeds per model and dataset; each draws its own data, initialization and order.
        jobs: runs trained at once (default: the number of runs or CPU cores, the smaller).
        first_seed: the first seed.
        recipe_name: the recipe's name, for the table and ``zoo.json``.

    Returns:
        The contents written to ``zoo.json``.

    Raises:
        ValueError: for an unknown or empty choice of models or datasets, or ``seeds < 1``.
    """
    models = _check("model", models, tuple(MODELS))
    datasets = _check("dataset", datasets, DATASETS)
    records = train_runs(run_grid(models, datasets, seeds, first_seed), recipe, out, jobs)

    summary = summarise(records, models, datasets)
    results = {
        "units": "nats per point, standardized coordinates",
        "recipe_name": recipe_name,
        "recipe": recipe.as_dict(),
        "seeds": seeds,
        "first_seed": first_seed,
        "models": models,
        "datasets": datasets,
        "runs": records,
        "summary": summary,
    }
    (out / JSON_FILE).write_text(json.dumps(json_safe(results), indent=2) + "\n")
    (out / TABLE_FILE).write_text(table(summary, recipe_name, recipe))
    figure(records, models, datasets, out)

    return results

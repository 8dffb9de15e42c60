"""The reference experiments: RealNVP and planar flows on Two Moons and Two Circles."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from exactflow import checkpoint, plotting, truth
from exactflow.data import load_split
from exactflow.evaluation import Grid, Scores, gaussian_baseline_nll, grid_log_prob, grid_mass
from exactflow.models import build, count_parameters
from exactflow.train import Recipe, evaluate_nll, fit

#: The published "best NLL" of each reference run, nats per point in standardized coordinates.
PUBLISHED = {
    ("realnvp", "moons"): 1.3375,
    ("realnvp", "circles"): 2.0891,
    ("planar", "moons"): 2.9236,
    ("planar", "circles"): 2.8546,
}
MODELS = ("realnvp", "planar")
DATASETS = ("moons", "circles")
GRID_POINTS = 300
MASS_GRID_POINTS = 400
MASS_GRID_MARGIN = 1.5
MASS_TOLERANCE = 0.01


@dataclass(frozen=True)
class Run:
    """One training run of the experiment grid."""

    model: str
    dataset: str
    seed: int

    @property
    def name(self) -> str:
        """A file-friendly name, such as ``realnvp_moons_seed0``."""
        return f"{self.model}_{self.dataset}_seed{self.seed}"


def run_grid(
    models: Sequence[str], datasets: Sequence[str], seeds: int, first_seed: int = 0
) -> list[Run]:
    """Return every model on every dataset for ``seeds`` consecutive seeds, seed by seed."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")

    return [
        Run(model, dataset, first_seed + k)
        for k in range(seeds)
        for model in models
        for dataset in datasets
    ]


def _init_worker(slots: Any, lock: Any) -> None:
    """Give each worker process one thread and a fixed progress-bar line."""
    global _SLOT
    torch.set_num_threads(1)
    with lock:
        _SLOT = slots.value
        slots.value += 1


_SLOT = 0


def train_run(run: Run, recipe: Recipe, out: Path) -> dict[str, Any]:
    """Train one run, save its checkpoint, and return its results as plain data."""
    split = load_split(run.dataset, run.seed)
    torch.manual_seed(run.seed)
    flow = build(run.model)

    bar = tqdm(
        total=recipe.epochs,
        desc=f"{run.model:>7} {run.dataset:<7} seed {run.seed}",
        position=_SLOT,
        leave=False,
        disable=None,
        dynamic_ncols=True,
    )
    with bar:
        result = fit(flow, split.train, recipe, seed=run.seed, progress=bar)

    # Everything below is in evaluation mode, on the best epoch's weights.
    dtype = torch.get_default_dtype()
    train_nll = evaluate_nll(flow, torch.as_tensor(split.train, dtype=dtype)).double().numpy()
    test_nll = evaluate_nll(flow, torch.as_tensor(split.test, dtype=dtype)).double().numpy()
    mean, std = split.standardizer.mean, split.standardizer.std
    entropy, entropy_se = math.nan, math.nan
    if run.dataset in truth.DATASETS:
        entropy, entropy_se = truth.entropy(run.dataset, mean, std)
    scores = Scores.of(test_nll, floor=entropy)
    mass_grid = Grid.covering(split.train, MASS_GRID_POINTS, margin=MASS_GRID_MARGIN)

    record = {
        "model": run.model,
        "dataset": run.dataset,
        "seed": run.seed,
        "params": count_parameters(flow),
        "train_nll": float(train_nll.mean()),
        "test_nll": scores.mean,
        "test_nll_median": scores.median,
        "test_nll_se": scores.standard_error,
        "outlier_share": scores.outlier_share,
        "entropy": entropy,
        "entropy_se": entropy_se,
        "gap": scores.mean - entropy,
        "gaussian_nll": gaussian_baseline_nll(split.test),
        "grid_mass": grid_mass(grid_log_prob(flow, mass_grid), mass_grid),
        "best_epoch": result.best_epoch,
        "epochs": recipe.epochs,
        "seconds": result.seconds,
        "published_nll": PUBLISHED.get((run.model, run.dataset), math.nan),
        "checkpoint": f"checkpoints/{run.name}.pt",
    }
    checkpoint.save(
        out / record["checkpoint"],
        flow,
        model={"name": run.model, "dim": 2, "options": {}},
        standardizer=split.standardizer,
        info={"dataset": run.dataset, "seed": run.seed, "recipe": recipe.as_dict()},
    )

    return record


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds; the deviation is nan if a value is not finite."""
    if not all(math.isfinite(v) for v in values):
        return statistics.fmean(values), math.nan

    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(
    records: Sequence[dict[str, Any]],
    models: Sequence[str] = MODELS,
    datasets: Sequence[str] = DATASETS,
) -> list[dict[str, Any]]:
    """Return, per model and dataset, the mean and standard deviation over seeds.

    Gap and entropy are ``nan`` for a dataset without an exact density.
    """
    summary = []
    for model in models:
        for dataset in datasets:
            group = [r for r in records if r["model"] == model and r["dataset"] == dataset]
            if not group:
                continue
            row: dict[str, Any] = {"model": model, "dataset": dataset, "seeds": len(group)}
            for key in ("train_nll", "test_nll", "gap", "entropy", "test_nll_median"):
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in group])
            row["outlier_share_max"] = max(r["outlier_share"] for r in group)
            row["gaussian_nll_mean"] = statistics.fmean(r["gaussian_nll"] for r in group)
            row["grid_mass_min"] = min(r["grid_mass"] for r in group)
            row["grid_mass_max"] = max(r["grid_mass"] for r in group)
            row["params"] = group[0]["params"]
            row["published_nll"] = group[0]["published_nll"]
            row["best_epoch_mean"] = statistics.fmean(r["best_epoch"] for r in group)
            row["seconds_mean"] = statistics.fmean(r["seconds"] for r in group)
            summary.append(row)

    return summary


def _pm(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def table(summary: Sequence[dict[str, Any]], recipe_name: str, recipe: Recipe) -> str:
    """Render the summary as a Markdown table, with its units, recipe and flags."""
    header = (
        "| model | dataset | params | train NLL | held-out NLL | median | entropy floor H "
        "| gap (≈ KL) | outliers | N(0,I) | grid mass | best epoch | seconds | published |"
    )
    lines = [header, "|" + "---|" * 14]
    flagged = False
    for row in summary:
        seeds = row["seeds"]
        mass_ok = (
            abs(row["grid_mass_min"] - 1) <= MASS_TOLERANCE
            and abs(row["grid_mass_max"] - 1) <= MASS_TOLERANCE
        )
        flagged |= not mass_ok
        mass = f"{row['grid_mass_min']:.4f}" + ("" if mass_ok else " ⚠")
        lines.append(
            f"| {row['model']} | {row['dataset']} | {row['params']:,} "
            f"| {_pm(row['train_nll_mean'], row['train_nll_std'], seeds)} "
            f"| {_pm(row['test_nll_mean'], row['test_nll_std'], seeds)} "
            f"| {row['test_nll_median_mean']:.4f} "
            f"| {row['entropy_mean']:.4f} "
            f"| {_pm(row['gap_mean'], row['gap_std'], seeds)} "
            f"| {100 * row['outlier_share_max']:.2f}% "
            f"| {row['gaussian_nll_mean']:.4f} "
            f"| {mass} "
            f"| {row['best_epoch_mean']:.0f} "
            f"| {row['seconds_mean']:.0f} "
            f"| {row['published_nll']:.4f} |"
        )

    notes = [
        "",
        "NLL in nats per point, standardized coordinates; "
        + (
            "1 seed."
            if summary[0]["seeds"] == 1
            else f"{summary[0]['seeds']} seeds, mean ± standard deviation over seeds."
        )
        + " Train and held-out NLL are in evaluation mode.",
        "Median: the median per-point held-out NLL. Best epoch and seconds (of training): "
        "means over seeds.",
        "Entropy floor H: the entropy of the true data density, the lowest expected held-out NLL "
        "any model can reach (a Monte Carlo estimate; its standard error, about 0.002, is "
        "entropy_se in results.json); gap = held-out NLL − H estimates KL(p_true ‖ p_model).",
        "Outliers: the largest share, over seeds, of held-out points whose NLL exceeds H by more "
        "than 10 nats. N(0,I): held-out NLL of the standard Gaussian. Grid mass: the smallest, "
        f"over seeds, sum of the model density over a {MASS_GRID_POINTS} × {MASS_GRID_POINTS} "
        f"grid covering the data with a margin of {MASS_GRID_MARGIN} "
        "(1 for a normalised density).",
        f"Recipe: {recipe_name} ({recipe.describe()}).",
    ]
    if flagged:
        notes.append(f"⚠: grid mass differs from 1 by more than {MASS_TOLERANCE}.")

    return "\n".join([*lines, *notes]) + "\n"


def figures(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Draw the report's figures from the first seed's checkpoints; return their paths."""
    seed = min(r["seed"] for r in records)
    first = {(r["model"], r["dataset"]): r for r in records if r["seed"] == seed}
    paths = []
    sample_panels = []
    for dataset in DATASETS:
        runs = [(m, first[(m, dataset)]) for m in MODELS if (m, dataset) in first]
        if not runs:
            continue
        split = load_split(dataset, seed)
        grid = Grid.covering(split.train, GRID_POINTS)
        true = truth.log_density(
            dataset, grid.points, split.standardizer.mean, split.standardizer.std
        ).reshape(grid.n, grid.n)
        rows = []
        sample_panels.append((f"{dataset}: data", split.test[:2000]))
        for model, record in runs:
            flow, _, _ = checkpoint.load(out / record["checkpoint"])
            learned = grid_log_prob(flow, grid)
            rows.append(
                (
                    model,
                    [
                        (f"{model} log p (learned)", learned),
                        ("log p (true)", true),
                        ("learned − true", learned - true),
                    ],
                )
            )
            path = out / f"transform_{model}_{dataset}.png"
            plotting.transformation(flow, path, f"{model} on {dataset}: base → data", seed=seed)
            paths.append(path)
            generator = torch.Generator().manual_seed(seed)
            sample_panels.append((f"{dataset}: {model} samples", flow.sample(2000, generator)))
        path = out / f"heatmap_{dataset}.png"
        plotting.heatmaps(rows, [grid] * 3, path, difference=True)
        paths.append(path)

    path = out / "samples.png"
    plotting.samples(
        [(title, np.asarray(points)) for title, points in sample_panels], 1 + len(MODELS), path
    )
    paths.append(path)

    return paths


def train_runs(
    runs: Sequence[Run], recipe: Recipe, out: Path, jobs: int | None = None
) -> list[dict[str, Any]]:
    """Train ``runs`` in parallel processes, one thread each; return their records in order.

    ``jobs`` defaults to the number of runs or of CPU cores, whichever is smaller. Each run
    writes its checkpoint under ``out``; a line is printed as each one finishes.
    """
    jobs = jobs or min(len(runs), os.cpu_count() or 1)
    out.mkdir(parents=True, exist_ok=True)

    context = multiprocessing.get_context("spawn")
    slots, lock = context.Value("i", 0), context.Lock()
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(slots, lock)
    ) as pool:
        futures = [pool.submit(train_run, run, recipe, out) for run in runs]
        for future in as_completed(futures):
            r = future.result()
            floor = f" (floor {r['entropy']:.4f})" if math.isfinite(r["entropy"]) else ""
            tqdm.write(
                f"done {r['model']:>7} {r['dataset']:<7} seed {r['seed']}: held-out NLL "
                f"{r['test_nll']:.4f}{floor}, {r['seconds']:.0f} s"
            )

    return [future.result() for future in futures]


def reproduce(
    out: Path,
    recipe: Recipe,
    seeds: int = 3,
    first_seed: int = 0,
    jobs: int | None = None,
    models: Sequence[str] = MODELS,
    datasets: Sequence[str] = DATASETS,
    recipe_name: str = "reference",
) -> dict[str, Any]:
    """Train every model on every dataset with ``seeds`` seeds; write results and figures.

    Runs are independent and train in parallel processes, one thread each. ``recipe_name``
    labels the recipe in the results (see :data:`exactflow.train.RECIPES`).

    Returns:
        The contents written to ``out / "results.json"``.
    """
    records = sorted(
        train_runs(run_grid(models, datasets, seeds, first_seed), recipe, out, jobs),
        key=lambda r: (r["seed"], MODELS.index(r["model"]), DATASETS.index(r["dataset"])),
    )

    summary = summarise(records)
    results = {
        "recipe_name": recipe_name,
        "recipe": recipe.as_dict(),
        "seeds": seeds,
        "runs": records,
        "summary": summary,
    }
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=2) + "\n")
    (out / "results.md").write_text(table(summary, recipe_name, recipe))
    figures(records, out)

    return results


def json_safe(value: Any) -> Any:
    """Replace non-finite floats by ``None`` so the JSON is standard."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None

    return value

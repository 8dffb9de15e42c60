"""Held-out NLL of exactflow against the plain reference, both trained by the full recipe.

For each reference run (RealNVP and the planar stack on Two Moons and Two Circles) and each
seed, trains the plain eager reference of ``reference.py`` and exactflow's model as
``exactflow reproduce`` does: the same data split, ``torch.manual_seed(seed)`` before building,
the same recipe and batch order. Prints a Markdown table of the held-out NLL of each (mean over
the test rows, evaluation mode, best epoch's weights), per seed and averaged over seeds, and
their difference. Runs train in parallel processes, one thread each.

    .venv/bin/python benchmarks/agreement.py                          # 1000 epochs, 3 seeds
    .venv/bin/python benchmarks/agreement.py --epochs 2 --seeds 1     # a smoke run
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import reference
import torch

from exactflow.data import load_split
from exactflow.experiments import DATASETS, MODELS, Run, run_grid
from exactflow.models import build
from exactflow.train import Recipe, TrainingDiverged, evaluate_nll, fit

IMPLEMENTATIONS = ("reference", "exactflow")


@dataclass(frozen=True)
class Result:
    """The held-out NLL of one implementation trained on one run."""

    implementation: str
    run: Run
    nll: float
    seconds: float


def reference_nll(run: Run, epochs: int) -> float:
    """Train the plain reference on ``run``; return its mean held-out NLL."""
    split = load_split(run.dataset, run.seed)
    torch.manual_seed(run.seed)
    model = reference.train(reference.build(run.model), split.train, epochs, run.seed)

    return reference.mean_nll(model, split.test)


def exactflow_nll(run: Run, epochs: int) -> float:
    """Train exactflow's model on ``run`` as ``exactflow reproduce`` does; return its NLL.

    ``fit`` leaves the model on its best epoch's weights even when training diverges.
    """
    split = load_split(run.dataset, run.seed)
    torch.manual_seed(run.seed)
    flow = build(run.model)
    try:
        fit(flow, split.train, Recipe(epochs=epochs), seed=run.seed)
    except TrainingDiverged as error:
        # The reference keeps its best epoch through a divergence; score exactflow's likewise.
        print(f"{run.name}: exactflow {error}; scoring its best epoch", file=sys.stderr)
    test = torch.as_tensor(split.test, dtype=torch.get_default_dtype())

    return evaluate_nll(flow, test).double().mean().item()


TRAINERS: dict[str, Callable[[Run, int], float]] = {
    "reference": reference_nll,
    "exactflow": exactflow_nll,
}


def train(implementation: str, run: Run, epochs: int) -> Result:
    """Train one implementation on one run and time it."""
    start = time.perf_counter()
    nll = TRAINERS[implementation](run, epochs)

    return Result(implementation, run, nll, time.perf_counter() - start)


def train_all(runs: Sequence[Run], epochs: int, jobs: int) -> list[Result]:
    """Train both implementations on every run in ``jobs`` processes; report each as done."""
    tasks = [(implementation, run, epochs) for run in runs for implementation in IMPLEMENTATIONS]

    return reference.train_in_processes(
        train,
        tasks,
        jobs,
        lambda r: (
            f"{r.implementation:>9} {r.run.name}: held-out NLL {r.nll:.4f}, {r.seconds:.0f} s"
        ),
    )


def table_row(model: str, dataset: str, seed: str, ref: float, ours: float) -> str:
    """One line of the table."""
    return f"| {model} | {dataset} | {seed} | {ref:.4f} | {ours:.4f} | {ours - ref:+.4f} |"


def table(runs: Sequence[Run], results: Sequence[Result], epochs: int) -> str:
    """Render the held-out NLLs per seed and averaged over seeds as a Markdown table."""
    nll = {(r.implementation, r.run): r.nll for r in results}
    lines = [
        "| model | dataset | seed | reference NLL | exactflow NLL | exactflow − reference |",
        "|---|---|---|---:|---:|---:|",
    ]
    for model in MODELS:
        for dataset in DATASETS:
            group = [run for run in runs if (run.model, run.dataset) == (model, dataset)]
            ref = [nll[("reference", run)] for run in group]
            ours = [nll[("exactflow", run)] for run in group]
            for run, a, b in zip(group, ref, ours, strict=True):
                lines.append(table_row(model, dataset, str(run.seed), a, b))
            if len(group) > 1:
                mean_ref, mean_ours = statistics.fmean(ref), statistics.fmean(ours)
                lines.append(table_row(model, dataset, "mean", mean_ref, mean_ours))

    note = (
        "Held-out NLL in nats per point, standardized coordinates: the mean over the test rows "
        f"in evaluation mode, on the best epoch's weights; {epochs} epoch(s)."
    )

    return "\n".join([*lines, "", note])


def main() -> None:
    """Train every run both ways and print the table."""
    args = reference.training_options(__doc__.splitlines()[0])
    runs = run_grid(MODELS, DATASETS, args.seeds)
    results = train_all(runs, args.epochs, args.jobs)
    print(table(runs, results, args.epochs))


if __name__ == "__main__":
    main()

"""Held-out NLL of NSF variants on Two Circles: what moves the gap to the entropy floor.

Trains exactflow's NSF on Two Circles, by the zoo's short recipe and by variants of its model or
recipe, on seeds of their own (100 and 101 by default, apart from the seeds 0-2 that the zoo
and the README report), and scores the held-out rows after every epoch. Prints, per variant and
seed, the held-out NLL of the epoch the recipe keeps (the lowest training NLL), the lowest
held-out NLL of any epoch (which no honest selection can reach, since it looks at the test
rows), the training NLL and the entropy floor. The ``average`` variant also keeps an
exponential moving average of the weights (decay 0.999 per step) and is scored on it.

    .venv/bin/python benchmarks/nsf_variants.py                  # ~8 min on 2 cores
    .venv/bin/python benchmarks/nsf_variants.py --epochs 2 --seeds 100 --jobs 1   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import reference
import torch

from exactflow import truth
from exactflow.data import load_split
from exactflow.models import build
from exactflow.train import RECIPES, Trainer, evaluate_nll

AVERAGE_DECAY = 0.999

#: Each variant: builder options of ``nsf`` and changes to the short recipe.
VARIANTS: dict[str, tuple[dict[str, int], dict[str, Any]]] = {
    "short recipe": ({}, {}),
    "average": ({}, {}),
    "16 bins": ({"bins": 16}, {}),
    "10 blocks": ({"blocks": 10}, {}),
    "hidden 128": ({"hidden": 128}, {}),
    "lr 5e-4": ({}, {"lr": 5e-4}),
    "batch 128": ({}, {"batch_size": 128}),
}


@dataclass(frozen=True)
class Result:
    """One variant on one seed."""

    variant: str
    seed: int
    kept_epoch: int
    kept_nll: float
    lowest_epoch: int
    lowest_nll: float
    train_nll: float
    entropy: float


class AveragingTrainer(Trainer):
    """A trainer that also keeps an exponential moving average of the weights."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.average = self.flat.detach().clone()

    def step(self, batch: torch.Tensor) -> float:
        """Take the step, then move the average towards the new weights."""
        loss = super().step(batch)
        self.average.lerp_(self.flat.detach(), 1.0 - AVERAGE_DECAY)

        return loss

    def swap(self) -> None:
        """Exchange the weights and their average."""
        with torch.no_grad():
            current = self.flat.detach().clone()
            self.flat.copy_(self.average)
            self.average.copy_(current)


def train(variant: str, seed: int, epochs: int) -> Result:
    """Train one variant on one seed, scoring the held-out rows after every epoch."""
    options, changes = VARIANTS[variant]
    recipe = dataclasses.replace(RECIPES["short"], epochs=epochs, **changes)
    split = load_split("circles", seed)
    torch.manual_seed(seed)
    flow = build("nsf", 2, **options)
    kind = AveragingTrainer if variant == "average" else Trainer
    trainer = kind(flow, split.train, recipe, seed=seed)
    test = torch.as_tensor(split.test, dtype=torch.float32)

    kept, lowest, train_nll = (0, math.inf), (0, math.inf), math.inf
    for epoch in range(1, epochs + 1):
        record = trainer.run_epoch()
        if isinstance(trainer, AveragingTrainer):
            trainer.swap()
            record.train_nll = evaluate_nll(flow, trainer.data).mean().item()
        held_out = evaluate_nll(flow, test).mean().item()
        if isinstance(trainer, AveragingTrainer):
            trainer.swap()
        if record.train_nll < train_nll:
            train_nll, kept = record.train_nll, (epoch, held_out)
        lowest = min(lowest, (epoch, held_out), key=lambda pair: pair[1])

    entropy, _ = truth.entropy("circles", split.standardizer.mean, split.standardizer.std)

    return Result(variant, seed, *kept, *lowest, train_nll, entropy)


def table(results: Sequence[Result], epochs: int) -> str:
    """Render the results, one line per variant and seed, and the mean over seeds."""
    lines = [
        "| variant | seed | held-out NLL, kept epoch | lowest held-out NLL (epoch) "
        "| training NLL | entropy floor H |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        group = [r for r in results if r.variant == variant]
        for r in group:
            lines.append(
                f"| {variant} | {r.seed} | {r.kept_nll:.4f} | {r.lowest_nll:.4f} "
                f"({r.lowest_epoch}) | {r.train_nll:.4f} | {r.entropy:.4f} |"
            )
        if len(group) > 1:
            kept = sum(r.kept_nll for r in group) / len(group)
            gap = kept - sum(r.entropy for r in group) / len(group)
            lines.append(f"| {variant} | mean | {kept:.4f} (gap {gap:+.4f}) | | | |")
    note = (
        f"Two Circles, nats per point, standardized coordinates; {epochs} epochs of the short "
        "recipe unless the variant changes it. The kept epoch is the one with the lowest "
        "training NLL, as the recipe keeps it."
    )

    return "\n".join([*lines, "", note])


def main() -> None:
    """Train every variant on every seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=RECIPES["short"].epochs)
    parser.add_argument("--seeds", default="100,101", help="comma-separated (default 100,101)")
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be whole numbers separated by commas, got {args.seeds!r}")
    if args.epochs < 1 or args.jobs < 1 or min(seeds) < 0:
        parser.error("--epochs and --jobs must be at least 1, and seeds at least 0")

    tasks = [(variant, seed, args.epochs) for variant in VARIANTS for seed in seeds]
    results = reference.train_in_processes(
        train, tasks, args.jobs, lambda r: f"{r.variant} seed {r.seed}: {r.kept_nll:.4f}"
    )
    print(table(results, args.epochs))


if __name__ == "__main__":
    main()

"""Held-out NLL of NSF variants on Two Circles: what moves the gap to the entropy floor.

Trains exactflow's NSF on Two Circles, by the zoo's short recipe and by variants of its model or
recipe, on seeds of their own (100 and 101 by default, apart from the seeds 0-2 that the zoo
and the README report), and scores the held-out rows after every epoch. Prints, per variant and
seed, the held-out NLL of the epoch the recipe keeps (the lowest training NLL), the lowest
held-out NLL of any epoch (which no honest selection can reach, since it looks at the test
rows), the training NLL and the entropy floor. The ``average`` variant also keeps an
exponential moving average of the weights (decay 0.999 per step) and is scored on it; the
``noise`` variant adds fresh Gaussian noise to every training batch (noise regularization);
the ``mixture`` variants train five NSFs from different initializations and orders on the same
rows, 1,000 epochs in all (the reference recipe's length), and are scored as their equal
mixture, the mean of their densities. The ``dropout`` variant drops hidden units of every
coupling network while training; the ``GELU`` variant puts GELU where the networks have
leaky ReLU. The ``40,000 rows`` variants are no recipe for the zoo but a measure of what more
data would give: ten times the training rows (and ten times the held-out rows), with the
epochs cut so that the number of steps stays that of the short recipe, or comes to that of the
reference one.

    .venv/bin/python benchmarks/nsf_variants.py                  # ~45 min on 2 cores
    .venv/bin/python benchmarks/nsf_variants.py --variant "lr 4e-3" --variant GELU  # some
    .venv/bin/python benchmarks/nsf_variants.py --epochs 2 --seeds 100 --jobs 1   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import reference
import torch
from torch import nn

from exactflow import truth
from exactflow.data import load_split
from exactflow.flow import Flow
from exactflow.models import build
from exactflow.train import RECIPES, Trainer, evaluate_nll

AVERAGE_DECAY = 0.999
ROWS = 4000


@dataclass(frozen=True)
class Variant:
    """Builder options of ``nsf``, changes to the short recipe, and how training differs."""

    options: dict[str, int] = field(default_factory=dict)
    changes: dict[str, Any] = field(default_factory=dict)
    average: bool = False
    noise: float = 0.0
    members: int = 1
    dropout: float = 0.0
    activation: type[nn.Module] | None = None
    scale: int = 1
    epoch_factor: float = 1.0


VARIANTS: dict[str, Variant] = {
    "short recipe": Variant(),
    "average": Variant(average=True),
    "16 bins": Variant(options={"bins": 16}),
    "4 bins": Variant(options={"bins": 4}),
    "10 blocks": Variant(options={"blocks": 10}),
    "4 blocks": Variant(options={"blocks": 4}),
    "hidden 128": Variant(options={"hidden": 128}),
    "lr 5e-4": Variant(changes={"lr": 5e-4}),
    "lr 4e-3": Variant(changes={"lr": 4e-3}),
    "batch 128": Variant(changes={"batch_size": 128}),
    "weight decay 0.1": Variant(changes={"weight_decay": 0.1}),
    "noise 0.03": Variant(noise=0.03),
    "dropout 0.1": Variant(dropout=0.1),
    "GELU": Variant(activation=nn.GELU),
    "mixture of 5": Variant(members=5),
    "mixture of 5, lr 4e-3": Variant(members=5, changes={"lr": 4e-3}),
    "40,000 rows, 1/10 the epochs": Variant(scale=10, epoch_factor=0.1),
    "40,000 rows, 16 bins, 1/2 the epochs": Variant(
        scale=10, epoch_factor=0.5, options={"bins": 16}
    ),
}


@dataclass(frozen=True)
class Result:
    """One variant on one seed; a mixture's member ``member`` until the members are joined."""

    variant: str
    seed: int
    kept_epoch: int
    kept_nll: float
    lowest_epoch: int
    lowest_nll: float
    train_nll: float
    entropy: float
    member: int = 0
    held_out: torch.Tensor | None = None
    training: torch.Tensor | None = None


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


class NoisyTrainer(Trainer):
    """A trainer that adds fresh Gaussian noise of standard deviation ``noise`` to each batch."""

    noise = 0.0

    def step(self, batch: torch.Tensor) -> float:
        """Take the step on the batch plus noise."""
        return super().step(batch + self.noise * torch.randn_like(batch))


def change_networks(flow: Flow, variant: Variant) -> None:
    """Give every coupling network of ``flow`` the variant's dropout and activation."""
    for layer in flow.layers:
        if not hasattr(layer, "net"):
            continue
        changed: list[nn.Module] = []
        for module in layer.net:
            if isinstance(module, nn.LeakyReLU):
                changed.append(variant.activation() if variant.activation else module)
                if variant.dropout:
                    changed.append(nn.Dropout(variant.dropout))
            else:
                changed.append(module)
        layer.net = nn.Sequential(*changed)


def train(name: str, seed: int, epochs: int, member: int = 0) -> Result:
    """Train one variant (or one member of a mixture) on one seed, scoring every epoch."""
    variant = VARIANTS[name]
    epochs = max(1, round(epochs * variant.epoch_factor))
    recipe = dataclasses.replace(RECIPES["short"], epochs=epochs, **variant.changes)
    split = load_split("circles", seed, ROWS * variant.scale)
    run_seed = seed + 1000 * member
    torch.manual_seed(run_seed)
    flow = build("nsf", 2, **variant.options)
    change_networks(flow, variant)
    kind = AveragingTrainer if variant.average else NoisyTrainer if variant.noise else Trainer
    trainer = kind(flow, split.train, recipe, seed=run_seed)
    if isinstance(trainer, NoisyTrainer):
        trainer.noise = variant.noise
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
    if variant.members == 1:
        return Result(name, seed, *kept, *lowest, train_nll, entropy)
    trainer.best_flow()

    return Result(
        name,
        seed,
        *kept,
        *lowest,
        train_nll,
        entropy,
        member,
        held_out=-evaluate_nll(flow, test).double(),
        training=-evaluate_nll(flow, trainer.data).double(),
    )


def join_members(members: Sequence[Result]) -> Result:
    """Score the equal mixture of the members' densities on the held-out and training rows."""

    def nll(log_densities: list[torch.Tensor]) -> float:
        stacked = torch.stack(log_densities)
        mixture = torch.logsumexp(stacked, 0) - math.log(len(log_densities))

        return -mixture.mean().item()

    first = members[0]
    held_out = nll([m.held_out for m in members if m.held_out is not None])
    training = nll([m.training for m in members if m.training is not None])

    return Result(first.variant, first.seed, 0, held_out, 0, math.nan, training, first.entropy)


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
            lowest = "—" if math.isnan(r.lowest_nll) else f"{r.lowest_nll:.4f} ({r.lowest_epoch})"
            lines.append(
                f"| {variant} | {r.seed} | {r.kept_nll:.4f} | {lowest} "
                f"| {r.train_nll:.4f} | {r.entropy:.4f} |"
            )
        if len(group) > 1:
            kept = sum(r.kept_nll for r in group) / len(group)
            gap = kept - sum(r.entropy for r in group) / len(group)
            lines.append(f"| {variant} | mean | {kept:.4f} (gap {gap:+.4f}) | | | |")
    note = (
        f"Two Circles, nats per point, standardized coordinates; {epochs} epoch(s) of the short "
        "recipe unless the variant changes it. The kept epoch is the one with the lowest "
        "training NLL, as the recipe keeps it; a mixture keeps each member's and has no "
        f"single epoch. {ROWS:,} training and {ROWS:,} held-out rows unless the variant "
        "names more."
    )

    return "\n".join([*lines, "", note])


def main() -> None:
    """Train every variant on every seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=RECIPES["short"].epochs)
    parser.add_argument("--seeds", default="100,101", help="comma-separated (default 100,101)")
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--variant", action="append", help="one variant; repeat for more")
    args = parser.parse_args()
    chosen = args.variant or list(VARIANTS)
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; variants: {'; '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be whole numbers separated by commas, got {args.seeds!r}")
    if args.epochs < 1 or args.jobs < 1 or min(seeds) < 0:
        parser.error("--epochs and --jobs must be at least 1, and seeds at least 0")

    tasks = [
        (name, seed, args.epochs, member)
        for name in chosen
        for seed in seeds
        for member in range(VARIANTS[name].members)
    ]
    trained = reference.train_in_processes(
        train, tasks, args.jobs, lambda r: f"{r.variant} seed {r.seed}: {r.kept_nll:.4f}"
    )
    results = []
    for name in chosen:
        for seed in seeds:
            group = [r for r in trained if (r.variant, r.seed) == (name, seed)]
            results.append(group[0] if VARIANTS[name].members == 1 else join_members(group))
    print(table(results, args.epochs))


if __name__ == "__main__":
    main()

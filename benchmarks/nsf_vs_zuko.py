"""Held-out NLL of exactflow's neural spline flow against zuko's, trained side by side.

For each dataset and seed, trains exactflow's ``nsf`` as ``exactflow zoo`` does and zuko's
``NSF`` through the plain loop of ``reference.py``: the same data split, the same recipe (Adam
at 1e-3 cosine-annealed to 1e-5, batches of 256 in the same order, gradients clipped to norm 5,
the best epoch by training NLL). Prints a Markdown table of the held-out NLL of each, per seed
and averaged over seeds. Runs train in parallel processes, one thread each. Needs zuko
(``pip install --no-deps zuko``); it is not a dependency of exactflow.

    .venv/bin/python benchmarks/nsf_vs_zuko.py                        # 1000 epochs, 3 seeds
    .venv/bin/python benchmarks/nsf_vs_zuko.py --epochs 2 --seeds 1   # a smoke run
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import reference
import torch
from torch import Tensor, nn

from exactflow.data import load_split
from exactflow.models import build, count_parameters
from exactflow.train import Recipe, evaluate_nll, fit

try:
    import zuko
except ImportError:
    zuko = None

DATASETS = ("moons", "circles")
IMPLEMENTATIONS = ("zuko", "exactflow")
# zuko's NSF is autoregressive: in two dimensions each transform splines both coordinates,
# the second conditioned on the first, and the order flips between transforms.
ZUKO_OPTIONS = {"transforms": 6, "bins": 8, "hidden_features": (64, 64)}


class ZukoNSF(nn.Module):
    """zuko's NSF behind the ``log_prob`` that the plain loop of ``reference.py`` trains."""

    def __init__(self) -> None:
        super().__init__()
        self.flow = zuko.flows.NSF(features=2, **ZUKO_OPTIONS)

    def log_prob(self, x: Tensor) -> Tensor:
        """Return the log-density of each row of ``x`` of shape ``(n, 2)``."""
        return self.flow().log_prob(x)


@dataclass(frozen=True)
class Result:
    """The held-out NLL of one implementation trained on one dataset with one seed."""

    implementation: str
    dataset: str
    seed: int
    parameters: int
    nll: float
    seconds: float


def train(implementation: str, dataset: str, seed: int, epochs: int) -> Result:
    """Train one implementation on one dataset and seed; score and time it."""
    start = time.perf_counter()
    split = load_split(dataset, seed)
    torch.manual_seed(seed)
    if implementation == "zuko":
        model = reference.train(ZukoNSF(), split.train, epochs, seed)
        parameters = reference.parameter_count(model)
        nll = reference.mean_nll(model, split.test)
    else:
        flow = build("nsf")
        parameters = count_parameters(flow)
        fit(flow, split.train, Recipe(epochs=epochs), seed=seed)
        test = torch.as_tensor(split.test, dtype=torch.get_default_dtype())
        nll = evaluate_nll(flow, test).double().mean().item()

    return Result(implementation, dataset, seed, parameters, nll, time.perf_counter() - start)


def train_all(seeds: int, epochs: int, jobs: int) -> list[Result]:
    """Train both implementations on every dataset and seed in ``jobs`` processes."""
    tasks = [
        (implementation, dataset, seed, epochs)
        for dataset in DATASETS
        for seed in range(seeds)
        for implementation in IMPLEMENTATIONS
    ]

    return reference.train_in_processes(
        train,
        tasks,
        jobs,
        lambda r: (
            f"{r.implementation:>9} {r.dataset} seed {r.seed}: held-out NLL {r.nll:.4f}, "
            f"{r.seconds:.0f} s"
        ),
    )


def table(results: list[Result], epochs: int) -> str:
    """Render the held-out NLLs per seed and averaged over seeds as a Markdown table."""
    nll = {(r.implementation, r.dataset, r.seed): r.nll for r in results}
    params = {r.implementation: r.parameters for r in results}
    seeds = sorted({r.seed for r in results})
    lines = [
        f"| dataset | seed | zuko NSF ({params['zuko']:,} params) "
        f"| exactflow nsf ({params['exactflow']:,} params) | exactflow − zuko |",
        "|---|---|---:|---:|---:|",
    ]

    def row(dataset: str, seed: str, theirs: float, ours: float) -> str:
        return f"| {dataset} | {seed} | {theirs:.4f} | {ours:.4f} | {ours - theirs:+.4f} |"

    for dataset in DATASETS:
        theirs = [nll["zuko", dataset, seed] for seed in seeds]
        ours = [nll["exactflow", dataset, seed] for seed in seeds]
        lines += [row(dataset, str(s), a, b) for s, a, b in zip(seeds, theirs, ours, strict=True)]
        if len(seeds) > 1:
            lines.append(row(dataset, "mean", statistics.fmean(theirs), statistics.fmean(ours)))

    note = (
        "Held-out NLL in nats per point, standardized coordinates: the mean over 4,000 test "
        f"rows in evaluation mode, on the best epoch's weights; {epochs} epoch(s)."
    )

    return "\n".join([*lines, "", note])


def main() -> None:
    """Train both flows on every dataset and seed and print the table."""
    args = reference.training_options(__doc__.splitlines()[0])
    if zuko is None:
        sys.exit("nsf_vs_zuko.py: zuko is not installed: pip install --no-deps zuko")
    print(table(train_all(args.seeds, args.epochs, args.jobs), args.epochs))


if __name__ == "__main__":
    main()

"""Milliseconds per training step of the reference models: plain PyTorch, exactflow and zuko.

One step is a forward pass, the mean NLL, a backward pass, gradient clipping to norm 5 and an
Adam update, on a batch of 256 Two Moons training rows. It is timed for RealNVP and the planar
stack in the plain eager reference (``reference.py``) and in exactflow (``Trainer.step``): by
its compiled passes (``exactflow.native``, what trains on the CPU) and by its PyTorch passes
(``exactflow.fused``, what trains elsewhere); and for zuko's RealNVP when zuko is installed,
with the same plain loop as the reference. The table gives the median over the timed steps,
which follow a few warm-up steps, and the speed-up over the plain reference; on zuko's row, also
the speed-up of exactflow's compiled passes over zuko. The grid of log-densities is timed on one
thread and on all of the machine's cores.

    .venv/bin/python benchmarks/train_speed.py                  # 400 timed steps, one thread
    .venv/bin/python benchmarks/train_speed.py --quick          # a smoke run of a few seconds
    .venv/bin/python benchmarks/train_speed.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import reference
import torch
from torch import Tensor, nn

from exactflow.data import load_split
from exactflow.evaluation import Grid
from exactflow.fused import fuse
from exactflow.models import build, count_parameters
from exactflow.train import Recipe, Trainer, evaluate_nll

try:
    import zuko
except ImportError:
    zuko = None

BATCH_SIZE = 256
STEPS = 400
WARMUP = 20
ROUNDS = 10
QUICK_STEPS = 20
QUICK_WARMUP = 5
GRID_POINTS = 500
GRID_REPEATS = 5
COMPILED = "exactflow"
ZUKO_OPTIONS = {"transforms": reference.BLOCKS, "hidden_features": (reference.HIDDEN,) * 2}

Step = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Row:
    """One timed implementation of one model."""

    model: str
    implementation: str
    parameters: int
    ms: float


class ZukoDensity(nn.Module):
    """zuko's RealNVP behind the ``log_prob`` of the reference models, for the same loop.

    Its couplings use LeakyReLU(0.2), as ours do; zuko's RealNVP has no batch-norm layers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flow = zuko.flows.RealNVP(
            features=reference.DIM, activation=partial(nn.LeakyReLU, 0.2), **ZUKO_OPTIONS
        )

    def log_prob(self, x: Tensor) -> Tensor:
        """Return the log-density of each row of ``x`` of shape ``(n, 2)``."""
        return self.flow().log_prob(x)


def plain_step(model: nn.Module) -> Step:
    """Return the plain eager training step of ``model``, with its own Adam optimizer."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=reference.LR)

    return partial(reference.step, model, optimizer)


def reference_step(name: str, device: torch.device) -> tuple[Step, int]:
    """Build the plain reference model ``name``; return its step and parameter count."""
    torch.manual_seed(0)
    model = reference.build(name).to(device)

    return plain_step(model), reference.parameter_count(model)


def exactflow_step(name: str, x_train: Tensor, compiled: bool) -> tuple[Step, int] | None:
    """Build exactflow's model ``name`` and its trainer; return its step and parameter count.

    ``compiled`` chooses the compiled passes, else the PyTorch passes; ``None`` when the
    compiled ones do not apply (another device, or the extension was not built).
    """
    torch.manual_seed(0)
    flow = build(name, reference.DIM).to(x_train.device)
    parameters = count_parameters(flow)
    trainer = Trainer(flow, x_train, Recipe(), seed=0)
    if compiled and trainer.native is None:
        return None
    if not compiled:
        trainer.native, trainer.fused = None, fuse(flow)
    flow.train()

    return trainer.step, parameters


def zuko_step(device: torch.device) -> tuple[Step, int]:
    """Build zuko's RealNVP; return its plain eager step and parameter count."""
    torch.manual_seed(0)
    model = ZukoDensity().to(device)

    return plain_step(model), reference.parameter_count(model)


def training_batches(x_train: Tensor) -> list[Tensor]:
    """Return the full batches of 256 rows of one shuffled pass over ``x_train``."""
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    parts = order.split(BATCH_SIZE)

    return [x_train[index.to(x_train.device)] for index in parts if len(index) == BATCH_SIZE]


def synchronize(device: torch.device) -> None:
    """Wait for the queued work of ``device``, so that the clock reads finished steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(step: Step, batches: list[Tensor], count: int, start: int) -> list[float]:
    """Run ``count`` steps on ``batches`` from index ``start``; return each one's seconds."""
    device = batches[0].device
    times = []
    for i in range(start, start + count):
        synchronize(device)
        begin = time.perf_counter()
        step(batches[i % len(batches)])
        synchronize(device)
        times.append(time.perf_counter() - begin)

    return times


def measure(x_train: Tensor, warmup: int, steps: int) -> list[Row]:
    """Time every implementation of both models on the rows ``x_train``.

    The timed steps run in rounds, each implementation in turn, so that a slow spell of the
    machine falls on all of them alike.
    """
    batches = training_batches(x_train)
    device = x_train.device
    candidates = []
    for name in ("realnvp", "planar"):
        candidates.append((name, "reference", *reference_step(name, device)))
        for compiled, label in ((True, COMPILED), (False, "exactflow, PyTorch passes")):
            built = exactflow_step(name, x_train, compiled)
            if built is not None:
                candidates.append((name, label, *built))
        if name == "realnvp" and zuko is not None:
            candidates.append((name, f"zuko {zuko.__version__}", *zuko_step(device)))

    times: list[list[float]] = [[] for _ in candidates]
    for _, _, step, _ in candidates:
        step_seconds(step, batches, warmup, 0)
    per_round = max(1, steps // ROUNDS)
    for done in range(0, steps, per_round):
        for seconds, (_, _, step, _) in zip(times, candidates, strict=True):
            seconds.extend(step_seconds(step, batches, min(per_round, steps - done), done))

    return [
        Row(name, implementation, parameters, 1000.0 * statistics.median(seconds))
        for (name, implementation, _, parameters), seconds in zip(candidates, times, strict=True)
    ]


def grid_seconds(x_train: Tensor, repeats: int, threads: int) -> dict[str, float]:
    """Median seconds to evaluate RealNVP's log-density on a 500 × 500 grid, both ways."""
    grid = Grid.covering(x_train.cpu().numpy(), n=GRID_POINTS)
    points = torch.as_tensor(grid.points, dtype=x_train.dtype, device=x_train.device)
    torch.manual_seed(0)
    flow = build("realnvp", reference.DIM).to(x_train.device).eval()
    torch.manual_seed(0)
    model = reference.build("realnvp").to(x_train.device).eval()

    def plain() -> None:
        with torch.no_grad():
            model.log_prob(points)

    def ours() -> None:
        evaluate_nll(flow, points)

    timings: dict[str, list[float]] = {"reference": [], "exactflow": []}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    for _ in range(repeats):
        for key, evaluate in (("reference", plain), ("exactflow", ours)):
            synchronize(x_train.device)
            begin = time.perf_counter()
            evaluate()
            synchronize(x_train.device)
            timings[key].append(time.perf_counter() - begin)
    torch.set_num_threads(previous)

    return {key: statistics.median(values) for key, values in timings.items()}


def table(rows: list[Row]) -> str:
    """Render the timings as a Markdown table with speed-ups."""
    times = {(row.model, row.implementation): row.ms for row in rows}
    lines = [
        "| model | implementation | parameters | ms/step (median) | speed-up over reference "
        "| compiled exactflow's speed-up over it |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        speed_up = times[(row.model, "reference")] / row.ms
        over = "—"
        if row.implementation.startswith("zuko") and (row.model, COMPILED) in times:
            over = f"{row.ms / times[(row.model, COMPILED)]:.2f}×"
        lines.append(
            f"| {row.model} | {row.implementation} | {row.parameters:,} | {row.ms:.3f} "
            f"| {speed_up:.2f}× | {over} |"
        )

    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, for a smoke run")
    parser.add_argument("--steps", type=int, help=f"timed steps per row (default {STEPS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")

    return args


def main() -> None:
    """Time the steps and print the table."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warmup = QUICK_WARMUP if args.quick else WARMUP
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    split = load_split("moons", 0)
    x_train = torch.as_tensor(split.train, dtype=torch.get_default_dtype(), device=device)

    rows = measure(x_train, warmup, steps)
    repeats = 1 if args.quick else GRID_REPEATS
    cores = os.cpu_count() or 1
    grids = {threads: grid_seconds(x_train, repeats, threads) for threads in sorted({1, cores})}

    print(
        f"Training step, batch {BATCH_SIZE} of Two Moons: median of {steps} steps after "
        f"{warmup} warm-up steps, timed in rounds; torch {torch.__version__}, {device}, "
        f"{torch.get_num_threads()} thread(s)."
    )
    print()
    print(table(rows))
    print(f"\nRealNVP log-density on a {GRID_POINTS} × {GRID_POINTS} grid (median seconds):")
    for threads, grid in grids.items():
        print(
            f"{threads} thread(s): reference {grid['reference']:.3f} s, "
            f"exactflow {grid['exactflow']:.3f} s."
        )
    if not any(row.implementation == COMPILED for row in rows):
        print("\nThe compiled passes do not apply here: no compiled row.")
    if zuko is None:
        print("\nzuko is not installed: no zuko row.")
    else:
        options = ", ".join(f"{key}={value}" for key, value in ZUKO_OPTIONS.items())
        print(f"\nzuko: RealNVP({options}), LeakyReLU(0.2), no batch norm.")


if __name__ == "__main__":
    main()

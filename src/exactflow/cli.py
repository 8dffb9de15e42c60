"""The ``exactflow`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from exactflow import __version__
from exactflow.checkpoint import CheckpointError
from exactflow.train import Recipe, TrainingDiverged


class UsageError(Exception):
    """A mistake in how the command was called; reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")

    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _parser() -> _Parser:
    parser = _Parser(
        prog="exactflow",
        description="Normalizing flows with exact likelihoods and the experiments that test them.",
    )
    parser.add_argument("--version", action="version", version=f"exactflow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    recipe = Recipe()
    reproduce = commands.add_parser(
        "reproduce",
        help="train the four reference experiments and write their results and figures",
        description=(
            "Train RealNVP (8 coupling + batch-norm blocks, 71,744 parameters) and a stack of 32 "
            "planar flows (160 parameters) on Two Moons and Two Circles with the reference "
            f"recipe ({recipe.epochs} epochs, Adam at {recipe.lr:g} cosine-annealed to "
            f"{recipe.lr_min:g}, batch {recipe.batch_size}, gradient norm clipped at "
            f"{recipe.clip:g}, best epoch kept), then report held-out NLL against the published "
            "figures and the entropy of the true density, with figures."
        ),
    )
    reproduce.add_argument(
        "--out",
        type=Path,
        default=Path("runs/reproduce"),
        help="output folder for results.json, results.md, checkpoints and figures "
        "(default: %(default)s)",
    )
    reproduce.add_argument(
        "--epochs",
        type=_positive_int,
        default=recipe.epochs,
        help="epochs per run (default: %(default)s, the reference recipe)",
    )
    reproduce.add_argument(
        "--seed", type=_int, default=0, help="the first seed (default: %(default)s)"
    )
    reproduce.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="seeds per run: each seed draws its own data, initialization and batch order "
        "(default: 3, or 1 with --quick)",
    )
    reproduce.add_argument(
        "--quick", action="store_true", help="one seed per run instead of three"
    )
    reproduce.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="runs trained in parallel, one thread each (default: the number of CPU cores)",
    )

    return parser


def _reproduce(args: argparse.Namespace) -> int:
    from exactflow.experiments import reproduce

    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    start = time.perf_counter()
    results = reproduce(
        args.out, Recipe(epochs=args.epochs), seeds=seeds, first_seed=args.seed, jobs=args.jobs
    )
    print((args.out / "results.md").read_text(), end="")
    print(
        f"\n{len(results['runs'])} runs in {time.perf_counter() - start:.0f} s; "
        f"results, checkpoints and figures in {args.out}/"
    )

    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (2 for a usage mistake)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2

        return {"reproduce": _reproduce}[args.command](args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except (ValueError, CheckpointError, OSError) as error:
        print(f"exactflow: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"exactflow: training stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("exactflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``exactflow`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from exactflow import __version__, checkpoint, report
from exactflow.data import DATASETS
from exactflow.models import MODELS
from exactflow.train import RECIPES, Recipe, TrainingDiverged, TrainingInterrupted

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class UsageError(Exception):
    """A mistake in how the command was called; reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**32 - 1, got {value}")

    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")

    return value


def _float(text: str) -> float:
    try:
        if "_" in text:  # Python reads 1_000 as 1000; a command line should not
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")

    return value


def _columns(text: str) -> list[str]:
    columns = [c.strip() for c in text.split(",")]
    if not all(columns):
        raise argparse.ArgumentTypeError(
            f"expected names or numbers separated by commas, got {text!r}"
        )

    return columns


def _int(text: str) -> int:
    try:
        if "_" in text:
            raise ValueError(text)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _add_row_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose which columns and rows of a data file a trained model reads."""
    parser.add_argument(
        "--columns", type=_columns, help="columns to use: a,b (default: the model's, by name)"
    )
    parser.add_argument("--drop-invalid", action="store_true", help="drop NaN/inf rows")


def _add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that read a data file with a trained model."""
    parser.add_argument("checkpoint", type=Path, help="a model.pt written by train")
    parser.add_argument("--data", required=True, help="a CSV, .npy or .npz file of rows")
    _add_row_options(parser)


def _add_run_options(parser: argparse.ArgumentParser, recipe: str) -> None:
    """The options of the commands that train a grid of runs: recipe, epochs, seed, jobs."""
    parser.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default=recipe,
        help="the named training recipe (default: %(default)s; see exactflow.train.RECIPES)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"epochs per run (default: the recipe's; {RECIPES[recipe].epochs} for {recipe})",
    )
    parser.add_argument(
        "--seed", type=_seed, default=0, help="the first seed (default: %(default)s)"
    )
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="runs trained in parallel, one thread each (default: the number of CPU cores)",
    )


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
            f"{recipe.clip:g}, best epoch kept) or a named variant (--recipe long: twice the "
            "epochs; short: a fifth), then report held-out NLL against the published figures "
            "and the entropy of the true density, with figures."
        ),
    )
    reproduce.add_argument(
        "--out",
        type=Path,
        default=Path("runs/reproduce"),
        help="output folder for results.json, results.md, report.html, checkpoints and "
        "figures (default: %(default)s)",
    )
    _add_run_options(reproduce, "reference")
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
        "--models",
        type=_columns,
        default=None,
        help="only these reference models, a,b (default: realnvp,planar)",
    )

    train = commands.add_parser(
        "train",
        help="train a model on a data file or a built-in dataset",
        description=(
            "Train a flow on the rows of a CSV, .npy or .npz file (or a built-in dataset) and "
            "write model.pt, resume.pt, metrics.csv, settings.json, summary.json, the figures "
            "and report.html into --out. Options may also come from --config FILE.toml (keys "
            "as the long options, with hyphens or underscores, plus lr-min and clip); flags "
            "given here win. Ctrl-C stops after the current epoch and writes a resume.pt that "
            "--resume continues."
        ),
    )
    source = train.add_mutually_exclusive_group()
    source.add_argument("--data", help="a CSV (header optional), .npy or .npz file of rows")
    source.add_argument("--dataset", help=f"a built-in dataset: {', '.join(DATASETS)}")
    train.add_argument("--model", help=f"the model: {', '.join(MODELS)} (default: realnvp)")
    train.add_argument("--out", help="the run folder (default: runs/train)")
    train.add_argument(
        "--force", action="store_true", help="replace an earlier run in --out (its files only)"
    )
    train.add_argument("--columns", type=_columns, help="columns to use, by name or number: a,b")
    train.add_argument(
        "--drop-invalid",
        action="store_true",
        default=None,
        help="drop rows holding NaN or infinity instead of refusing the file",
    )
    train.add_argument("--epochs", type=_positive_int, help=f"epochs (default: {recipe.epochs})")
    train.add_argument(
        "--batch-size",
        type=_int,
        help=f"rows per batch, at least 2 (default: {recipe.batch_size})",
    )
    train.add_argument(
        "--lr",
        type=_float,
        help=f"Adam's initial learning rate, in (0, 1] (default: {recipe.lr:g})",
    )
    train.add_argument(
        "--weight-decay",
        type=_float,
        help="decoupled weight decay in [0, 1), as in AdamW (default: 0, none)",
    )
    train.add_argument(
        "--seed", type=_seed, help="seeds the split, initialization and batch order (default: 0)"
    )
    train.add_argument(
        "--val-fraction",
        type=_float,
        help="share of rows held out for validation, which picks the best epoch (default: 0.1)",
    )
    train.add_argument(
        "--patience", type=_positive_int, help="stop after this many epochs without a new best"
    )
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu)")
    train.add_argument(
        "--dequantize",
        action="store_true",
        default=None,
        help="add uniform noise on [0, 1) to columns of whole numbers (counts, pixel values)",
    )
    train.add_argument("--config", type=Path, help="a TOML file of the same options")
    train.add_argument("--resume", type=Path, help="continue the run of this resume.pt")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    evaluate = commands.add_parser(
        "evaluate",
        help="NLL of a data file under a trained model",
        description="Print the NLL (mean, median, standard error) of the rows of a data file, "
        "in nats per row in the data's own units and in bits per dimension.",
    )
    _add_scoring_options(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of text")

    sample = commands.add_parser(
        "sample",
        help="draw samples from a trained model",
        description="Draw samples in the data's own units and write them as CSV (or .npy).",
    )
    sample.add_argument("checkpoint", type=Path, help="a model.pt written by train")
    sample.add_argument("-n", type=_positive_int, required=True, help="how many samples")
    sample.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the .csv or .npy file to write (- for standard output)",
    )
    sample.add_argument(
        "--temperature",
        type=_float,
        default=1.0,
        help="scale of the base Gaussian, at least 0 (default: %(default)s)",
    )
    sample.add_argument("--seed", type=_seed, default=0, help="(default: %(default)s)")
    sample.add_argument("--force", action="store_true", help="replace an existing --out file")

    score = commands.add_parser(
        "score",
        help="log-density and outlier flag of every row of a data file",
        description="Write, for every row, its number among the file's data rows, its "
        "log-density (in the data's own units) and an is_outlier column: 1 where the "
        "log-density is below the --quantile of the training rows' log-densities.",
    )
    _add_scoring_options(score)
    score.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the .csv or .npy file to write (- for standard output)",
    )
    score.add_argument(
        "--quantile", type=_float, default=0.01, help="outlier threshold (default: %(default)s)"
    )
    score.add_argument("--force", action="store_true", help="replace an existing --out file")

    plot = commands.add_parser(
        "plot",
        help="figures of a trained model",
        description="2-D models: heatmap, layer-by-layer transformation and samples beside the "
        "data. Higher dimensions: pairwise plots of samples against data. Plus the loss curve.",
    )
    plot.add_argument("checkpoint", type=Path, help="a model.pt written by train")
    plot.add_argument("--out", type=Path, help="folder for the figures (default: beside it)")
    plot.add_argument("--data", help="data to draw beside the samples (default: training rows)")
    _add_row_options(plot)
    plot.add_argument("--force", action="store_true", help="replace figures in --out")

    report = commands.add_parser(
        "report",
        help="a self-contained HTML page of a run folder",
        description="Write report.html into a run folder of train or reproduce, with its "
        "table, figures (embedded) and settings.",
    )
    report.add_argument("folder", type=Path, help="the run folder")

    zoo = commands.add_parser(
        "zoo",
        help="train every chosen model on every chosen dataset; one table and one figure",
        description=(
            "Train each chosen model on each chosen built-in dataset with the short recipe "
            f"(the reference one over {RECIPES['short'].epochs} epochs; or --recipe, --epochs), "
            "then write zoo.json, zoo.md (held-out NLL per model and "
            "dataset against the entropy floor where one exists) and zoo.png (true density or "
            "data, then each model's learned density) into --out."
        ),
    )
    zoo.add_argument(
        "--models", type=_columns, help=f"models a,b,... (default: all: {', '.join(MODELS)})"
    )
    zoo.add_argument(
        "--datasets",
        type=_columns,
        help=f"datasets a,b,... (default: all: {', '.join(DATASETS)})",
    )
    zoo.add_argument(
        "--seeds", type=_positive_int, default=1, help="seeds per run (default: %(default)s)"
    )
    _add_run_options(zoo, "short")
    zoo.add_argument(
        "--out",
        type=Path,
        default=Path("runs/zoo"),
        help="output folder (default: %(default)s)",
    )

    return parser


def _recipe_name(args: argparse.Namespace) -> str:
    """The recipe's name for the results, saying when --epochs changed it."""
    if args.epochs is None or args.epochs == RECIPES[args.recipe].epochs:
        return args.recipe

    return f"{args.recipe} with --epochs {args.epochs}"


def _run_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe named by ``--recipe``, with ``--epochs`` when given."""
    recipe = RECIPES[args.recipe]

    return recipe if args.epochs is None else dataclasses.replace(recipe, epochs=args.epochs)


def _reproduce(args: argparse.Namespace) -> int:
    from exactflow.experiments import MODELS as REFERENCE_MODELS
    from exactflow.experiments import reproduce

    if args.quick and args.seeds is not None and args.seeds != 1:
        raise UsageError(
            f"exactflow reproduce: --quick runs one seed, --seeds asks for {args.seeds}; drop one"
        )
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    start = time.perf_counter()
    models = list(dict.fromkeys(args.models or REFERENCE_MODELS))
    unknown = sorted(set(models) - set(REFERENCE_MODELS))
    if unknown:
        raise UsageError(
            f"exactflow reproduce: unknown reference model(s) {', '.join(unknown)}; "
            f"valid: {', '.join(REFERENCE_MODELS)}"
        )
    results = reproduce(
        args.out,
        _run_recipe(args),
        recipe_name=_recipe_name(args),
        seeds=seeds,
        first_seed=args.seed,
        jobs=args.jobs,
        models=models,
    )
    page = report.write(args.out)
    print((args.out / "results.md").read_text(), end="")
    print(
        f"\n{len(results['runs'])} runs in {time.perf_counter() - start:.0f} s; "
        f"results, checkpoints and figures in {args.out}/, report in {page}"
    )

    return 0


TRAIN_OPTIONS = {
    "data": str,
    "dataset": str,
    "model": str,
    "out": str,
    "columns": list,
    "drop_invalid": bool,
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "lr_min": float,
    "clip": float,
    "weight_decay": float,
    "seed": int,
    "val_fraction": float,
    "patience": int,
    "device": str,
    "dequantize": bool,
}
RECIPE_OPTIONS = ("epochs", "batch_size", "lr", "lr_min", "clip", "weight_decay")
KINDS = {
    str: "a string",
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    list: "a list",
}


def _config(path: Path) -> dict[str, Any]:
    """Read train options from a TOML file, checking names and types."""
    where = f"exactflow train: --config {path}"
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{where}: no such config file") from None
    except OSError as error:
        raise UsageError(f"{where}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{where}: not a valid TOML file ({error})") from None

    options = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in options:
            raise UsageError(f"{where}: option {key!r} is given twice (with - and _)")
        if name not in TRAIN_OPTIONS:
            raise UsageError(
                f"{where}: unknown option {key!r}; valid options: {', '.join(TRAIN_OPTIONS)}"
            )
        kind = TRAIN_OPTIONS[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is list and isinstance(value, list):
            value = [str(v) for v in value]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise UsageError(f"{where}: option {key!r} must be {KINDS[kind]}, got {value!r}")
        if kind is list and not value:
            raise UsageError(
                f"{where}: option {key!r} is an empty list; leave it out to use every column"
            )
        options[name] = value

    return options


def _train(args: argparse.Namespace) -> int:
    from exactflow import workflow

    if args.resume is not None and args.config is not None:
        raise UsageError(
            "exactflow train: --resume continues a run with its own settings; drop --config"
        )
    options = _config(args.config) if args.config is not None else {}
    for name in TRAIN_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    if args.data is not None or args.dataset is not None:
        options.pop("dataset" if args.data is not None else "data", None)
    if args.resume is not None and set(options) - {"out"}:
        extra = ", ".join("--" + k.replace("_", "-") for k in sorted(set(options) - {"out"}))
        raise UsageError(
            f"exactflow train: --resume continues a run with its own settings; drop {extra}"
        )

    interrupted = []

    def on_interrupt(signum: int, frame: Any) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)
        print("\nexactflow: stopping after this epoch (Ctrl-C again to abort)", file=sys.stderr)

    def requested() -> bool:
        return bool(interrupted)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    progress = not args.no_progress
    try:
        if args.resume is not None:
            summary = workflow.resume(args.resume, options.get("out"), progress, requested)
        else:
            defaults = Recipe()
            recipe = Recipe(**{k: options.pop(k, getattr(defaults, k)) for k in RECIPE_OPTIONS})
            options.setdefault("out", "runs/train")
            settings = workflow.TrainSettings(recipe=recipe, **options)
            summary = workflow.train(settings, progress, requested, args.force)
    except TrainingInterrupted as error:
        print(f"exactflow: training interrupted: {error}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)

    workflow.plot(Path(summary["out"]) / workflow.MODEL_FILE)
    report.write(summary["out"])
    stopped = " (early stop)" if summary["stopped_early"] else ""
    dropped = (
        f", {summary['rows_dropped']} invalid rows dropped" if summary["rows_dropped"] else ""
    )
    held_out = summary["validation_rows"]
    scored = f"validation NLL ({held_out} rows held out)" if held_out else "training NLL"
    print(
        f"trained {summary['model']} ({summary['parameters']:,} parameters) on "
        f"{summary['rows']} rows × {summary['columns']} columns{dropped}: best epoch "
        f"{summary['best_epoch']} of {summary['epochs_done']}{stopped}, {scored} "
        f"{summary['best_nll_data_units']:.4f} nats per row in the data's units "
        f"({summary['best_nll']:.4f} standardized); written to {summary['out']}/"
    )

    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from exactflow import workflow
    from exactflow.experiments import json_safe

    result = workflow.evaluate(args.checkpoint, args.data, args.columns, args.drop_invalid)
    if args.json:
        # Standard JSON: a value that is not finite (an infinite NLL) is written as null.
        print(json.dumps(json_safe(result), indent=2))
        return 0

    dropped = f" ({result['rows_dropped']} invalid rows dropped)" if result["rows_dropped"] else ""
    print(
        f"{result['rows']} rows{dropped}: NLL {result['nll_mean']:.4f} ± {result['nll_se']:.4f} "
        f"nats per row (median {result['nll_median']:.4f}), {result['bits_per_dim']:.4f} bits per "
        "dimension, in the data's own units"
    )

    return 0


def _refuse_to_overwrite(command: str, out: Path, *inputs: Path | str) -> None:
    """Refuse an output path that is one of the command's input files."""
    for given in inputs:
        if out.exists() and Path(given).exists() and os.path.samefile(out, given):
            raise UsageError(
                f"exactflow {command}: --out {out} is the input file {given}; choose another "
                "file to write"
            )


def _sample(args: argparse.Namespace) -> int:
    from exactflow import workflow

    _refuse_to_overwrite("sample", args.out, args.checkpoint)
    workflow.check_output(args.out, args.force)
    rows = workflow.draw(args.checkpoint, args.n, args.temperature, args.seed)
    names = workflow.column_names(checkpoint.load(args.checkpoint)[2])
    header = names or [f"x{i + 1}" for i in range(rows.shape[1])]
    workflow.write_rows(args.out, rows, header)
    # On standard error, so that --out /dev/stdout carries the samples alone.
    print(f"wrote {len(rows)} samples × {rows.shape[1]} columns to {args.out}", file=sys.stderr)

    return 0


def _score(args: argparse.Namespace) -> int:
    from exactflow import workflow

    _refuse_to_overwrite("score", args.out, args.checkpoint, args.data)
    workflow.check_output(args.out, args.force)
    numbers, log_p, outlier, threshold = workflow.score(
        args.checkpoint, args.data, args.quantile, args.columns, args.drop_invalid
    )
    table = [
        [int(number), float(value), int(flag)]
        for number, value, flag in zip(numbers, log_p, outlier, strict=True)
    ]
    workflow.write_rows(args.out, table, ["row", "log_density", "is_outlier"])
    print(
        f"scored {len(log_p)} rows: {int(outlier.sum())} below the {args.quantile:g} quantile "
        f"of the training log-densities ({threshold:.4f}); written to {args.out}",
        file=sys.stderr,
    )

    return 0


def _plot(args: argparse.Namespace) -> int:
    from exactflow import workflow

    if args.data is None and (args.columns is not None or args.drop_invalid):
        raise UsageError("exactflow plot: --columns and --drop-invalid need --data")
    paths = workflow.plot(
        args.checkpoint, args.out, args.data, args.columns, args.drop_invalid, args.force
    )
    print("wrote " + ", ".join(str(p) for p in paths))

    return 0


def _report(args: argparse.Namespace) -> int:
    print(f"wrote {report.write(args.folder)}")

    return 0


def _zoo(args: argparse.Namespace) -> int:
    from exactflow.zoo import TABLE_FILE, run_zoo

    start = time.perf_counter()
    results = run_zoo(
        args.out,
        args.models or list(MODELS),
        args.datasets or list(DATASETS),
        _run_recipe(args),
        seeds=args.seeds,
        jobs=args.jobs,
        first_seed=args.seed,
        recipe_name=_recipe_name(args),
    )
    print((args.out / TABLE_FILE).read_text(), end="")
    print(
        f"\n{len(results['runs'])} runs in {time.perf_counter() - start:.0f} s; "
        f"zoo.json, zoo.md, zoo.png and checkpoints in {args.out}/"
    )

    return 0


COMMANDS = {
    "reproduce": _reproduce,
    "train": _train,
    "evaluate": _evaluate,
    "sample": _sample,
    "score": _score,
    "plot": _plot,
    "report": _report,
    "zoo": _zoo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (2 for a usage mistake)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2

        return COMMANDS[args.command](args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except OSError as error:
        # The system's words, with the path they are about when there is one.
        where = f"{error.filename}: " if error.filename else ""
        print(f"exactflow: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except ValueError as error:
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

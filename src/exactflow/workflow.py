"""Flows on the user's own data: train, evaluate, sample, score; each also a command."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from exactflow import checkpoint, plotting
from exactflow.checkpoint import CheckpointError
from exactflow.data import (
    DATASETS,
    DataError,
    Standardizer,
    csv_header,
    dequantize,
    generate,
    read_table,
    split_rows,
)
from exactflow.distribution import FlowDistribution
from exactflow.evaluation import Grid, grid_log_prob
from exactflow.flow import Flow
from exactflow.models import MODELS, build, count_parameters
from exactflow.report import REPORT_FILE
from exactflow.train import Recipe, Trainer, TrainingDiverged, TrainingInterrupted, evaluate_nll

MODEL_FILE = "model.pt"
RESUME_FILE = "resume.pt"
METRICS_FILE = "metrics.csv"
SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"
#: The figures :func:`plot` may draw into a run folder.
FIGURES = HEATMAP_FILE, TRANSFORMATION_FILE, SAMPLES_FILE, PAIRWISE_FILE, LOSS_FILE = (
    "heatmap.png",
    "transformation.png",
    "samples.png",
    "pairwise.png",
    "loss.png",
)
#: Every file a run of ``train`` writes into its folder.
RUN_FILES = (
    MODEL_FILE,
    RESUME_FILE,
    METRICS_FILE,
    SETTINGS_FILE,
    SUMMARY_FILE,
    REPORT_FILE,
    *FIGURES,
)
BUILTIN_ROWS = 4000
RESUME_EVERY = 25
MAX_SAMPLES = 10_000_000
ONE_DIMENSIONAL = {"planar": 1, "radial": 1}
LN2 = math.log(2.0)


@dataclass
class TrainSettings:
    """Everything that defines a training run on the user's data or a built-in dataset.

    Exactly one of ``data`` (a CSV, ``.npy`` or ``.npz`` file) and ``dataset`` (a built-in
    name) is given. ``val_fraction`` of the rows, drawn at random with ``seed``, is held out
    for validation and picks the best epoch; ``patience`` stops training after that many
    epochs without a new best. ``dequantize`` adds uniform noise on ``[0, 1)`` to every column
    whose values are all whole numbers, so that a density can be fitted to counts; the model's
    log-density of the noisy values is then a lower bound on the log-probability of the whole
    numbers (Theis, van den Oord & Bethge, 2016).
    """

    out: str
    model: str = "realnvp"
    data: str | None = None
    dataset: str | None = None
    columns: list[str | int] | None = None
    drop_invalid: bool = False
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    val_fraction: float = 0.1
    patience: int | None = None
    device: str = "cpu"
    dequantize: bool = False

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise ValueError("--out is empty; give the run folder to write")
        if (self.data is None) == (self.dataset is None):
            raise DataError("give exactly one of a data file (--data) or a built-in --dataset")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid models: {', '.join(MODELS)}")
        if self.dataset is not None and self.dataset not in DATASETS:
            raise DataError(
                f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(DATASETS)}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"validation fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be from 0 to 2**32 - 1, got {self.seed}")

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as plain data."""
        return {
            "out": self.out,
            "model": self.model,
            "data": self.data,
            "dataset": self.dataset,
            "columns": self.columns,
            "drop_invalid": self.drop_invalid,
            "recipe": self.recipe.as_dict(),
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "patience": self.patience,
            "device": self.device,
            "dequantize": self.dequantize,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        """Rebuild settings written by :meth:`as_dict`."""
        values = dict(values)
        values["recipe"] = Recipe(**values["recipe"])

        return cls(**values)


def _device(name: str) -> torch.device:
    """Return the torch device called ``name``, checking that it is usable here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available here")

    return device


def load_rows(settings: TrainSettings) -> tuple[np.ndarray, int, list[str] | None]:
    """Read the raw rows the settings name; return them, how many were dropped, their names."""
    if settings.dataset is not None:
        return generate(settings.dataset, BUILTIN_ROWS, settings.seed), 0, None

    min_columns = ONE_DIMENSIONAL.get(settings.model, 2)
    rows, kept, names = read_table(
        settings.data, settings.columns, settings.drop_invalid, min_columns
    )
    if names is not None:
        # The model keeps the names to pick its columns from later files by; each must be one.
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated or "" in names:
            problem = (
                f"repeats {', '.join(map(repr, repeated))}" if repeated else "has an empty name"
            )
            raise DataError(
                f"{settings.data}: the header of the chosen columns {problem}; name each "
                "column once"
            )
    if settings.dequantize:
        rows = dequantize(rows, settings.seed)

    return rows, int((~kept).sum()), names


def _fingerprint(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float64).tobytes()).hexdigest()


def _write_metrics(path: Path, trainer: Trainer) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["epoch", "loss", "train_nll", "val_nll", "lr", "seconds"])
        for e in trainer.history:
            writer.writerow([e.epoch, e.loss, e.train_nll, e.val_nll, e.lr, e.seconds])


@dataclass
class _Run:
    """The pieces of a training run that the saving functions need."""

    settings: TrainSettings
    trainer: Trainer
    standardizer: Standardizer
    train: torch.Tensor
    fingerprint: str
    dim: int
    dropped: int
    names: list[str] | None


def _model_info(run: _Run) -> dict[str, Any]:
    return {"name": run.settings.model, "dim": run.dim, "options": {}}


def _save_best(run: _Run, path: Path) -> None:
    """Write the best epoch's weights, with the training log-densities for outlier scores."""
    flow = build(run.settings.model, run.dim).to(run.train.device, run.train.dtype)
    flow.load_state_dict(run.trainer.best_state)
    flow.eval()
    checkpoint.save(
        path,
        flow,
        model=_model_info(run),
        standardizer=run.standardizer,
        info={
            "settings": run.settings.as_dict(),
            "best_epoch": run.trainer.best_epoch,
            "best_nll": run.trainer.best_nll,
            "epochs_done": run.trainer.epoch,
            "rows_dropped": run.dropped,
            "columns": run.names,
            "data_sha256": run.fingerprint,
        },
        train_log_density=-evaluate_nll(flow, run.train).double(),
    )


def _save_resumable(run: _Run, path: Path) -> None:
    checkpoint.save(
        path,
        run.trainer.flow,
        model=_model_info(run),
        standardizer=run.standardizer,
        info={"settings": run.settings.as_dict(), "data_sha256": run.fingerprint},
        training=run.trainer.state_dict(),
    )


def _fit_standardizer(rows: np.ndarray) -> Standardizer:
    """Fit the standardization, refusing columns it cannot scale.

    Raises:
        DataError: naming the columns that are constant (up to the rounding of their mean),
            too large for float64 arithmetic, or spread too narrowly to divide by.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below, by name
        standardizer = Standardizer.fit(rows)
    mean, std = standardizer.mean, standardizer.std

    def named(mask: np.ndarray) -> str:
        return ", ".join(str(i + 1) for i in np.flatnonzero(mask))

    huge = ~(np.isfinite(mean) & np.isfinite(std))
    if huge.any():
        raise DataError(
            f"column(s) {named(huge)} hold values too large to standardize in float64 "
            "arithmetic; rescale them"
        )
    # Equal values whose mean rounds off them leave a std of rounding noise, not zero.
    constant = rows.max(0) - rows.min(0) <= 1e-12 * np.abs(mean)
    if constant.any():
        raise DataError(
            f"column(s) {named(constant)} are constant in the training rows; drop them"
        )
    narrow = std < 1e-150
    if narrow.any():
        raise DataError(
            f"column(s) {named(narrow)} vary by less than 1e-150; rescale them before training"
        )

    return standardizer


def _prepare(settings: TrainSettings) -> _Run:
    """Load and split the data, fit the standardization, build the model and its trainer."""
    device = _device(settings.device)
    rows, dropped, names = load_rows(settings)
    train_rows, val_rows = split_rows(rows, settings.val_fraction, settings.seed)
    standardizer = _fit_standardizer(train_rows)

    torch.manual_seed(settings.seed)
    flow = build(settings.model, rows.shape[1]).to(device)
    train = torch.as_tensor(standardizer.transform(train_rows), dtype=torch.float32, device=device)
    validation = None
    if val_rows is not None:
        validation = torch.as_tensor(
            standardizer.transform(val_rows), dtype=torch.float32, device=device
        )
    trainer = Trainer(flow, train, settings.recipe, settings.seed, validation, settings.patience)

    return _Run(
        settings, trainer, standardizer, train, _fingerprint(rows), rows.shape[1], dropped, names
    )


def train(
    settings: TrainSettings, progress: bool = True, stop: Any = None, force: bool = False
) -> dict[str, Any]:
    """Train a model on the user's data (or a built-in dataset) and write its run folder.

    The folder ``settings.out`` receives ``model.pt`` (the best epoch's weights), ``resume.pt``
    (the full training state, rewritten every 25 epochs, on interruption and at the end),
    ``metrics.csv`` (one row per epoch), ``settings.json`` and ``summary.json`` (the returned
    summary). A folder that holds files of an earlier run is refused, or with ``force`` has
    them removed first, so that no figure of the old run is left beside the new one.

    Args:
        settings: what to train on and how.
        progress: show a progress bar.
        stop: an optional callable checked after each epoch; when true, training stops with
            :class:`~exactflow.train.TrainingInterrupted` after writing ``resume.pt``.
        force: replace an earlier run in ``settings.out``.

    Returns:
        A summary: best epoch, best NLL, epochs done, parameters, rows and output folder.

    Raises:
        DataError: for unusable data or settings.
        TrainingDiverged: for a non-finite loss or gradient (``model.pt`` keeps the best so far).
        TrainingInterrupted: when ``stop`` asked for it (``resume.pt`` continues the run).
    """
    run = _prepare(settings)
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {settings.out!r} is a file, not a folder; give a run folder")
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not force:
        raise ValueError(
            f"--out {settings.out!r} holds an earlier run ({', '.join(earlier)}); pass --force "
            "to replace it, or choose another folder"
        )
    for name in earlier:
        (out / name).unlink()

    return _execute(run, progress, stop)


def resume(
    path: str | Path, out: str | None = None, progress: bool = True, stop: Any = None
) -> dict[str, Any]:
    """Continue the run of a ``resume.pt`` with its own settings, into ``out`` or its folder.

    The continued run ends exactly where an uninterrupted one ends (on the same machine).

    Raises:
        CheckpointError: when the file holds no training state.
        DataError: when the run's data can no longer be read or changed since it started.
    """
    _, _, payload = checkpoint.load(path)
    if "training" not in payload:
        raise CheckpointError(f"{str(path)!r} holds no training state to resume from")

    settings = TrainSettings.from_dict(payload["info"]["settings"])
    settings.out = out if out is not None else str(Path(path).parent)
    if settings.data is not None and not Path(settings.data).exists():
        raise DataError(
            f"the run's data file {settings.data!r} is not found from {str(Path.cwd())!r}; a "
            "relative path counts from the folder the run was started in, so resume from there"
        )
    run = _prepare(settings)
    if payload["info"]["data_sha256"] != run.fingerprint:
        raise DataError(
            f"the data of {settings.data or settings.dataset!r} changed since the run "
            "started; a resumed run needs the same rows"
        )
    run.trainer.load_state_dict(payload["training"])

    return _execute(run, progress, stop)


def _execute(run: _Run, progress: bool, stop: Any) -> dict[str, Any]:
    """Run the trainer to the end, writing checkpoints and metrics on the way and at the end."""
    settings = run.settings
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(settings.as_dict(), indent=2) + "\n")

    def after_epoch() -> bool:
        if run.trainer.epoch % RESUME_EVERY == 0:
            _save_resumable(run, out / RESUME_FILE)

        return bool(stop()) if stop is not None else False

    bar = tqdm(
        total=settings.recipe.epochs,
        initial=run.trainer.epoch,
        desc=f"{settings.model} epochs",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        with bar:
            result = run.trainer.run(bar, stop=after_epoch)
    except TrainingInterrupted as error:
        _save_resumable(run, out / RESUME_FILE)
        _save_best(run, out / MODEL_FILE)
        _write_metrics(out / METRICS_FILE, run.trainer)
        raise TrainingInterrupted(
            f"{error}; continue with: exactflow train --resume {out / RESUME_FILE}"
        ) from None
    except TrainingDiverged:
        if run.trainer.best_epoch > 0:
            _save_best(run, out / MODEL_FILE)
        _write_metrics(out / METRICS_FILE, run.trainer)
        raise

    _save_resumable(run, out / RESUME_FILE)
    _save_best(run, out / MODEL_FILE)
    _write_metrics(out / METRICS_FILE, run.trainer)
    flow = run.trainer.best_flow()
    validation_rows = 0 if run.trainer.validation is None else len(run.trainer.validation)
    rows = len(run.train) + validation_rows

    summary = {
        "model": settings.model,
        "parameters": count_parameters(flow),
        "rows": rows,
        "validation_rows": validation_rows,
        "rows_dropped": run.dropped,
        "columns": run.dim,
        "best_epoch": result.best_epoch,
        "best_nll": result.best_nll,
        "epochs_done": run.trainer.epoch,
        "stopped_early": result.stopped_early,
        "best_nll_data_units": result.best_nll - run.standardizer.log_det,
        "out": str(out),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")

    return summary


def _checked_rows(
    path: str | Path,
    flow: Flow,
    standardizer: Standardizer,
    payload: dict[str, Any],
    columns: list[str | int] | None,
    drop: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Read rows to score with a model: its columns, dequantized as in training.

    Returns the rows and a mask over the file's data rows, true where the row was kept.

    When the model knows its column names and the file has a header, the columns are picked
    by name (in the model's order) unless ``columns`` says otherwise; a file that lacks one of
    them is refused rather than scored on the wrong columns.
    """
    trained = column_names(payload)
    named = [str(column) for column in columns or []]
    if trained is not None and sorted(named) == sorted(trained) and named != trained:
        raise DataError(
            f"{path}: --columns {','.join(named)} names the model's columns in another order; "
            f"it reads them as {','.join(trained)}"
        )
    if columns is None and trained is not None:
        header = csv_header(path)
        if header is not None:
            missing = [name for name in trained if name not in header]
            if missing:
                raise DataError(
                    f"{path}: no column named {', '.join(map(repr, missing))}; the model was "
                    f"trained on columns {', '.join(trained)} (choose others with --columns)"
                )
            columns = trained
    rows, kept, _ = read_table(path, columns, drop)
    if rows.shape[1] != flow.dim:
        expected = f" ({', '.join(trained)})" if trained else ""
        raise DataError(
            f"{path}: {rows.shape[1]} column(s), but the model was trained on "
            f"{flow.dim}{expected}; choose them with --columns"
        )
    if payload["info"].get("settings", {}).get("dequantize"):
        rows = dequantize(rows, seed=0)

    # Rows that standardize beyond the range of the model's dtype have no density it can
    # compute; they are refused (or dropped) as rows with infinity are.
    dtype = next(flow.parameters()).dtype
    limit = torch.finfo(dtype).max ** 0.5
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is a row beyond the limit
        far = ~(np.abs(standardizer.transform(rows)) < limit).all(axis=1)
    if far.any():
        if not drop:
            first = ", ".join(str(i + 1) for i in np.flatnonzero(far)[:5])
            raise DataError(
                f"{path}: {int(far.sum())} row(s) lie beyond {limit:.0e} standard deviations of "
                f"the training rows, past what the model computes in {dtype} (first rows: "
                f"{first}); pass --drop-invalid to drop them"
            )
        rows = rows[~far]
        kept[np.flatnonzero(kept)[far]] = False
        if len(rows) == 0:
            raise DataError(f"{path}: no rows left after dropping invalid ones")

    return rows, kept


def _load_model(path: str | Path) -> tuple[Flow, Standardizer, dict[str, Any]]:
    """Load a trained model, refusing a run's ``resume.pt`` (its last state, not its best).

    Raises:
        CheckpointError: for a file that is no checkpoint, or a ``resume.pt``; the message
            names the ``model.pt`` beside it.
    """
    flow, standardizer, payload = checkpoint.load(path)
    if "training" in payload:
        raise CheckpointError(
            f"{str(path)!r} is a run's training state, for exactflow train --resume; the "
            f"trained model is {str(Path(path).with_name(MODEL_FILE))!r}"
        )

    return flow, standardizer, payload


def column_names(payload: dict[str, Any]) -> list[str] | None:
    """The names of the columns a checkpoint's model was trained on, when the data had them."""
    return payload["info"].get("columns")


def log_density(flow: Flow, standardizer: Standardizer, rows: np.ndarray) -> np.ndarray:
    """Return the log-density of raw rows in the data's own units (standardization included)."""
    x = torch.as_tensor(standardizer.transform(rows), dtype=next(flow.parameters()).dtype)

    return -evaluate_nll(flow, x).double().numpy() + standardizer.log_det


def evaluate(
    model: str | Path,
    data: str | Path,
    columns: list[str | int] | None = None,
    drop_invalid: bool = False,
) -> dict[str, float]:
    """Return the NLL of a data file under a trained model, in nats and bits per dimension.

    The NLL is in the data's own units: the standardization's log-det is included.
    """
    flow, standardizer, payload = _load_model(model)
    rows, kept = _checked_rows(data, flow, standardizer, payload, columns, drop_invalid)
    nll = -log_density(flow, standardizer, rows)
    se = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else math.nan

    return {
        "rows": len(nll),
        "rows_dropped": int((~kept).sum()),
        "nll_mean": float(nll.mean()),
        "nll_median": float(np.median(nll)),
        "nll_se": se,
        "bits_per_dim": float(nll.mean() / (flow.dim * LN2)),
    }


def draw(model: str | Path, n: int, temperature: float = 1.0, seed: int = 0) -> np.ndarray:
    """Draw ``n`` samples in the data's own units from a base Gaussian of scale ``temperature``."""
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"the number of samples must be in [1, {MAX_SAMPLES:,}], got {n}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")

    flow, standardizer, _ = _load_model(model)
    reference = next(flow.parameters())
    generator = torch.Generator().manual_seed(seed)
    z = temperature * torch.randn(n, flow.dim, generator=generator, dtype=reference.dtype)
    with torch.no_grad():
        x, _ = flow.inverse(z)
    rows = standardizer.inverse(x.double().numpy())
    bad = int((~np.isfinite(rows).all(axis=1)).sum())
    if bad:
        raise ValueError(
            f"{bad} of {n} samples at temperature {temperature:g} are not finite (the base "
            "draws reach past what the model maps); use a smaller --temperature"
        )

    return rows


def _is_special(path: Path) -> bool:
    """Whether ``path`` is written to directly: a pipe or device, or one under /dev or /proc."""
    special = path.absolute().parts[1:2] in (("dev",), ("proc",))

    return path.exists() and (special or not path.is_file())


def check_output(path: str | Path, force: bool = False) -> None:
    """Refuse an output file that cannot be written as rows, or that would replace a file.

    Rows go to ``.npy`` or to CSV (a ``.csv`` name, a name without a suffix, ``-`` for standard
    output, or a pipe or device such as ``/dev/stdout``). An existing regular file is replaced
    only with ``force``.

    Raises:
        ValueError: naming the path and the problem.
    """
    if str(path) == "-":
        return
    path = Path(path)
    if str(path) in ("", "."):
        raise ValueError("--out is empty; give a file name to write")
    if path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a folder; give a file name to write")
    if _is_special(path):
        return
    if path.suffix.lower() not in (".csv", ".npy", ""):
        raise ValueError(
            f"--out {str(path)!r}: exactflow writes rows as .csv or .npy, not {path.suffix!r}"
        )
    if path.exists() and not force:
        raise ValueError(
            f"--out {str(path)!r} exists; pass --force to replace it, or choose another file"
        )
    parent = path.resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {str(path)!r}: {str(existing)!r} is a file, not a folder")


def _standard_stream(path: Path) -> Any:
    """The binary buffer of standard output or error when ``path`` names the same file."""
    for stream in (sys.stdout, sys.stderr):
        try:
            mine, given = os.fstat(stream.fileno()), os.stat(path)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            continue
        if (mine.st_dev, mine.st_ino) == (given.st_dev, given.st_ino):
            stream.flush()
            return stream.buffer

    return None


def write_rows(path: str | Path, rows: np.ndarray | list[list[Any]], header: list[str]) -> None:
    """Write rows to ``.npy`` or CSV (by the file's suffix), replacing the file in one step.

    A symbolic link is followed: the file it points to is replaced, the link stays. A path
    that is no regular file (a pipe), or one under ``/dev`` or ``/proc``, is written to
    directly, appending: ``/dev/stdout`` and ``/dev/stderr`` write through this process's own
    streams, so that a file they are redirected to (even with ``>>``) keeps what it held and
    what is written after; ``-`` is standard output. Check the path first with
    :func:`check_output`.
    """
    to_stdout = str(path) == "-"
    path = Path(path)

    def write(file: Any) -> None:
        if path.suffix.lower() == ".npy":
            np.save(file, np.asarray(rows, dtype=np.float64))
        else:
            text = io.TextIOWrapper(file, newline="", encoding="utf-8")
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows.tolist() if isinstance(rows, np.ndarray) else rows)
            text.flush()
            text.detach()

    if to_stdout or _is_special(path):
        stream = sys.stdout.buffer if to_stdout else _standard_stream(path)
        if stream is None:
            with path.open("ab") as file:
                write(file)
        else:
            write(stream)
            stream.flush()
        return

    target = path.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        with temporary.open("wb") as file:
            write(file)
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def score(
    model: str | Path,
    data: str | Path,
    quantile: float = 0.01,
    columns: list[str | int] | None = None,
    drop_invalid: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Score every row: its log-density in the data's units and whether it is an outlier.

    A row is an outlier when its log-density is below the ``quantile`` of the training rows'
    log-densities.

    Returns:
        The 1-based numbers of the scored data rows in the file (rows dropped as invalid have
        none), their log-densities, their outlier flags and the threshold.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")

    flow, standardizer, payload = _load_model(model)
    if "train_log_density" not in payload:
        raise CheckpointError(f"{str(model)!r} holds no training log-densities to set a threshold")
    rows, kept = _checked_rows(data, flow, standardizer, payload, columns, drop_invalid)
    log_p = log_density(flow, standardizer, rows)
    reference = payload["train_log_density"].double().numpy() + standardizer.log_det
    threshold = float(np.quantile(reference, quantile))

    # A log-density that is not a number counts as an outlier: nothing vouches for the row.
    return np.flatnonzero(kept) + 1, log_p, ~(log_p >= threshold), threshold


def _training_rows(payload: dict[str, Any]) -> np.ndarray | None:
    """The raw rows a checkpoint was trained on, when they can still be read."""
    settings = payload["info"].get("settings")
    if settings is None:
        return None
    try:
        rows, _, _ = load_rows(TrainSettings.from_dict(settings))
    except (DataError, ValueError, TypeError, KeyError):
        return None

    return rows


def plot(
    model: str | Path,
    out: str | Path | None = None,
    data: str | Path | None = None,
    columns: list[str | int] | None = None,
    drop_invalid: bool = False,
    force: bool = False,
) -> list[Path]:
    """Draw a trained model's figures; return their paths.

    2-D models get a log-density heatmap, the layer-by-layer transformation and samples beside
    the data; higher dimensions get pairwise plots of samples against data. The data are
    ``data`` when given (its ``columns``, the model's by default; rows with NaN or infinity
    refused unless ``drop_invalid``), else the rows the model was trained on when they can be
    read. The loss curve is drawn when the checkpoint's folder has ``metrics.csv``.

    The figures go to ``out``, by default the checkpoint's folder, where they replace the run's
    own. Figures of other ``data`` are refused there (the run's report would show them as the
    run's); in any other folder an existing figure is replaced only with ``force``.
    """
    flow, standardizer, payload = _load_model(model)
    folder = Path(out) if out is not None else Path(model).parent
    own = folder.resolve() == Path(model).resolve().parent
    if own and data is not None:
        raise DataError(
            f"{folder}: holds the run's own figures; draw the figures of other data into "
            "another folder with --out"
        )
    taken = [name for name in FIGURES if (folder / name).exists()]
    if taken and not own and not force:
        raise DataError(f"{folder / taken[0]}: exists; pass --force to replace it")
    rows = (
        _checked_rows(data, flow, standardizer, payload, columns, drop_invalid)[0]
        if data is not None
        else _training_rows(payload)
    )
    folder.mkdir(parents=True, exist_ok=True)
    samples = draw(model, 2000)
    paths = []

    if flow.dim == 2:
        scaled = standardizer.transform(rows) if rows is not None else flow.sample(2000).numpy()
        grid = Grid.covering(scaled, 300)
        log_p = grid_log_prob(flow, grid)
        path = folder / HEATMAP_FILE
        plotting.heatmaps([("model", [("log p (standardized units)", log_p)])], [grid], path)
        paths.append(path)
        path = folder / TRANSFORMATION_FILE
        plotting.transformation(flow, path, "base → data, layer by layer")
        paths.append(path)
        panels = [("model samples", standardizer.transform(samples))]
        if rows is not None:
            panels.insert(0, ("data", scaled[:2000]))
        path = folder / SAMPLES_FILE
        plotting.samples(panels, len(panels), path)
        paths.append(path)
    else:
        path = folder / PAIRWISE_FILE
        plotting.pairwise(samples, None if rows is None else rows[:2000], path)
        paths.append(path)

    metrics = Path(model).parent / METRICS_FILE
    if metrics.is_file():
        try:
            with warnings.catch_warnings():
                # An empty file is damaged like any other; numpy would also warn of it.
                warnings.simplefilter("ignore")
                table = np.atleast_1d(np.genfromtxt(metrics, delimiter=",", names=True))
            curves = {"train (eval mode)": table["train_nll"], "validation": table["val_nll"]}
            epochs = table["epoch"]
            if len(epochs) == 0:
                raise ValueError("no epochs")
        except (ValueError, TypeError, IndexError, UnicodeDecodeError):
            raise DataError(
                f"{metrics}: damaged; it needs the columns epoch, train_nll and val_nll of a "
                "run's history (the other figures are written)"
            ) from None
        path = folder / LOSS_FILE
        plotting.loss_curve(epochs, curves, path)
        paths.append(path)

    return paths


def load_distribution(model: str | Path) -> FlowDistribution:
    """Load a trained model as a ``torch.distributions.Distribution`` in the data's own units."""
    flow, standardizer, _ = _load_model(model)

    return FlowDistribution(flow, standardizer)

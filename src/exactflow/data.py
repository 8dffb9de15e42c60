"""Datasets: the built-in ones, the user's files, and the standardization fitted on them."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import make_circles, make_moons

from exactflow import toys

NOISE = 0.06
CIRCLES_FACTOR = 0.4
DATASETS = ("moons", "circles", *toys.TOYS)
SUFFIXES = (".csv", ".npy", ".npz")


class DataError(ValueError):
    """Raised when a data file or dataset name cannot give a usable table of numbers."""


def generate(name: str, n: int, seed: int) -> np.ndarray:
    """Draw ``n`` raw points of shape ``(n, 2)`` from the built-in dataset ``name``.

    ``moons`` is scikit-learn's ``make_moons`` and ``circles`` its ``make_circles`` with radius
    ratio 0.4, both with Gaussian noise of standard deviation 0.06. The other names are the
    toys of :mod:`exactflow.toys`.
    """
    if name == "moons":
        x, _ = make_moons(n_samples=n, noise=NOISE, random_state=seed)
    elif name == "circles":
        x, _ = make_circles(n_samples=n, noise=NOISE, factor=CIRCLES_FACTOR, random_state=seed)
    elif name in toys.TOYS:
        x = toys.sample(name, n, seed)
    else:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")

    return x


@dataclass(frozen=True)
class Standardizer:
    """The affine map ``(x - mean) / std`` fitted on training data, per coordinate."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """Fit to the rows of ``x`` of shape ``(n, d)``."""
        return cls(mean=x.mean(0), std=x.std(0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Map raw rows to standardized ones."""
        return (x - self.mean) / self.std

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Map standardized rows back to raw units."""
        return y * self.std + self.mean

    @property
    def log_det(self) -> float:
        """Log-abs-det of ``transform``: add it to a standardized log-density for raw units."""
        return float(-np.log(self.std).sum())


@dataclass(frozen=True)
class Split:
    """A training set and a held-out set, both standardized with the training statistics."""

    train: np.ndarray
    test: np.ndarray
    standardizer: Standardizer


def load_split(name: str, seed: int, n: int = 4000) -> Split:
    """Draw a training and a held-out set of ``n`` points each, with different seeds."""
    train = generate(name, n, seed)
    test = generate(name, n, seed + 100_003)
    standardizer = Standardizer.fit(train)

    return Split(standardizer.transform(train), standardizer.transform(test), standardizer)


def _rows_to_array(rows: list[list[str]], path: Path, columns: list[int]) -> np.ndarray:
    """Parse the chosen columns of CSV rows into a float array, naming the first bad cell.

    Row numbers in messages count data rows from 1, as the NaN message does.
    """
    values = np.empty((len(rows), len(columns)), dtype=np.float64)
    for i, row in enumerate(rows):
        for k, j in enumerate(columns):
            try:
                values[i, k] = float(row[j])
            except ValueError:
                raise DataError(
                    f"{path}: data row {i + 1}, column {j + 1}: {row[j].strip()[:40]!r} "
                    "is not a number (choose numeric columns with --columns)"
                ) from None

    return values


def _is_header(row: list[str]) -> bool:
    """A first row with any cell that is not a number is a header."""
    for cell in row:
        try:
            float(cell)
        except ValueError:
            return True

    return False


def csv_header(path: str | Path) -> list[str] | None:
    """Return the column names of a CSV file's header row, or ``None`` (no header, not a CSV).

    Reads only the first non-empty row; every other error is left to :func:`read_table`.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            first = next((row for row in csv.reader(file) if any(c.strip() for c in row)), None)
    except (UnicodeDecodeError, csv.Error):
        return None

    return [cell.strip() for cell in first] if first and _is_header(first) else None


def _read_csv(path: Path, columns: Sequence[str] | None) -> tuple[np.ndarray, list[str] | None]:
    """Read a CSV file with or without a header row; return the chosen values and names.

    Columns are chosen before any cell is parsed, so unchosen columns may hold text.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            rows = [row for row in csv.reader(file) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file (it is not valid UTF-8)") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    if not rows:
        raise DataError(f"{path}: the file is empty")

    header = _is_header(rows[0])
    names = [cell.strip() for cell in rows[0]] if header else None
    body = rows[1:] if header else rows
    if not body:
        raise DataError(f"{path}: the file has a header row but no data rows")
    width = len(rows[0])
    ragged = next((i for i, row in enumerate(body) if len(row) != width), None)
    if ragged is not None:
        raise DataError(
            f"{path}: ragged rows: data row {ragged + 1} has {len(body[ragged])} columns, "
            f"the {'header' if header else 'first row'} has {width}"
        )

    chosen = _column_indices(names, columns, width, path) if columns else list(range(width))
    names = [names[j] for j in chosen] if names is not None else None

    return _rows_to_array(body, path, chosen), names


def _read_numpy(path: Path) -> np.ndarray:
    """Read a ``.npy`` array, or the single array (or the one named ``x``) of an ``.npz``.

    The file's content decides how it is read, whatever its suffix says.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as archive:
                keys = list(archive.keys())
                if not keys:
                    raise DataError(f"{path}: the archive holds no arrays")
                key = "x" if "x" in keys else keys[0]
                if len(keys) > 1 and key != "x":
                    raise DataError(
                        f"{path}: the archive holds several arrays ({', '.join(keys)}) and "
                        "none is named 'x'"
                    )
                array = archive[key]
        else:
            array = loaded
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: the array it declares is too large to load") from None
    except Exception as error:
        # A damaged header can fail numpy's parser in many ways (ValueError, EOFError,
        # TypeError, IndexError, tokenize errors, zip errors): each means an unreadable file.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "pickle" in message:
            # numpy takes any file that is not an array for pickled objects, and its messages
            # point to loading them unsafely, which exactflow never does.
            message = "it holds no array of numbers, and pickled objects are never loaded"
        raise DataError(f"{path}: not a readable {path.suffix} file ({message})") from None

    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: the archive member {key!r} is not a numpy array")
    if array.dtype.kind not in "iufb":
        raise DataError(f"{path}: the array holds {array.dtype} values, not numbers")

    return array.astype(np.float64)


def _column_indices(
    names: list[str] | None, columns: Sequence[str | int], width: int, path: Path
) -> list[int]:
    """Return the 0-based indices of the chosen columns, given by header name or number."""
    chosen = []
    for column in columns:
        if names is not None and column in names:
            if names.count(column) > 1:
                raise DataError(
                    f"{path}: the header names {column!r} more than once; choose that column "
                    "by number"
                )
            chosen.append(names.index(column))
            continue
        try:
            number = int(column)
        except ValueError:
            valid = (
                f"; its columns are {', '.join(names)}"
                if names
                else "; the file has no header, so choose columns by number"
            )
            raise DataError(f"{path}: no column named {column!r}{valid}") from None
        if not 1 <= number <= width:
            raise DataError(
                f"{path}: column {number} is out of range; columns are numbered 1 to {width}"
            )
        chosen.append(number - 1)
    if len(set(chosen)) != len(chosen):
        raise DataError(f"{path}: a column is chosen twice in {', '.join(map(str, columns))}")

    return chosen


def read_table(
    path: str | Path,
    columns: Sequence[str | int] | None = None,
    drop_invalid: bool = False,
    min_columns: int = 1,
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Read a table of numbers of shape ``(n, d)`` from a CSV, ``.npy`` or ``.npz`` file.

    Args:
        path: the file. A CSV may have a header row (detected by non-numeric cells).
        columns: keep only these columns, by header name or 1-based number.
        drop_invalid: drop rows holding NaN or infinity instead of refusing the file.
        min_columns: the fewest columns the caller accepts.

    Returns:
        The float64 table; a mask over the file's data rows, true where the row was kept (all
        true unless ``drop_invalid`` dropped some); and the names of its columns (from a CSV
        header; ``None`` without one).

    Raises:
        DataError: for a missing, empty, non-numeric or ragged file, a bad column choice, too
            few columns, or rows with NaN or infinity when ``drop_invalid`` is false (the
            message gives how many and the first row numbers).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a folder, a device or a pipe); give a file")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")

    names = None
    if path.suffix.lower() == ".csv":
        values, names = _read_csv(path, columns)
    else:
        values = _read_numpy(path)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
            raise DataError(f"{path}: expected a non-empty 2-D table, got shape {values.shape}")
        if columns:
            values = values[:, _column_indices(None, columns, values.shape[1], path)]
    if values.shape[1] < min_columns:
        raise DataError(
            f"{path}: {values.shape[1]} column(s), but this model needs at least {min_columns}"
            + ("; one column trains with --model planar or radial" if values.shape[1] == 1 else "")
        )

    bad = ~np.isfinite(values).all(axis=1)
    dropped = int(bad.sum())
    if dropped and not drop_invalid:
        first = ", ".join(str(i + 1) for i in np.flatnonzero(bad)[:5])
        raise DataError(
            f"{path}: {dropped} row(s) hold NaN or infinity (first data rows: {first}); "
            "pass --drop-invalid to drop them"
        )
    values = values[~bad]
    if len(values) == 0:
        raise DataError(f"{path}: no rows left after dropping invalid ones")

    return values, ~bad, names


def split_rows(
    x: np.ndarray, val_fraction: float, seed: int, min_rows: int = 2
) -> tuple[np.ndarray, np.ndarray | None]:
    """Shuffle rows and split off a validation share; return ``(train, validation or None)``.

    Raises:
        DataError: when either part would have fewer than ``min_rows`` rows.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")

    order = np.random.default_rng(seed).permutation(len(x))
    n_val = round(val_fraction * len(x))
    n_train = len(x) - n_val
    if n_train < min_rows or (val_fraction > 0 and n_val < min_rows):
        raise DataError(
            f"{len(x)} rows are too few for a training set and a validation set of at least "
            f"{min_rows} rows each with validation fraction {val_fraction}"
        )
    if n_val == 0:
        return x[order], None

    return x[order[:n_train]], x[order[n_train:]]


def dequantize(x: np.ndarray, seed: int) -> np.ndarray:
    """Add uniform noise on ``[0, 1)`` to every column of ``x`` whose values are whole numbers.

    A density fitted to the noisy values bounds the log-probability of the whole numbers from
    below (Theis, van den Oord & Bethge, 2016). The noise is drawn with ``seed``, so the same
    rows always get the same noise.
    """
    whole = np.all(x == np.round(x), axis=0)
    noise = np.random.default_rng(seed).uniform(0.0, 1.0, size=x.shape)

    return x + noise * whole

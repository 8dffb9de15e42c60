"""Robustness: bad input, untrusted checkpoints, interrupted writes, state, seeds, saturation.

A bad input must give exit code 2 and one line on stderr naming the problem, never a
traceback; the Python API raises typed exceptions. Everything runs on tiny data with torch
held to one thread (on a loaded two-core machine two threads run many times slower).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.datasets import make_moons
from torch import nn

from exactflow import checkpoint, cli, models, plotting, workflow
from exactflow.bijections import AffineCouplingLayer, BatchNormFlow
from exactflow.checkpoint import CheckpointError
from exactflow.data import DataError, Standardizer, read_table, split_rows
from exactflow.evaluation import Grid, grid_log_prob
from exactflow.flow import Flow
from exactflow.train import Recipe, batches, evaluate_nll, fit

HERE = Path(__file__).resolve().parent
EXIT_CODES = {0, 1, 2, 130}


pytestmark = pytest.mark.usefixtures("one_thread")


def _raw_rows(n: int, seed: int = 0) -> np.ndarray:
    x, _ = make_moons(n_samples=n, noise=0.1, random_state=seed)

    return x * np.array([30.0, 0.2]) + np.array([-200.0, 40.0])


def _write_csv(path: Path, rows: np.ndarray | list, header: list[str] | None = None) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        if header is not None:
            writer.writerow(header)
        writer.writerows(np.asarray(rows).tolist())

    return path


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()

    return code, out, err


def _assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, f"expected exit code 2, got {code}; stderr: {err!r}"
    assert "Traceback" not in err, f"a traceback reached the user: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message, got {len(lines)} lines: {err!r}"
    for needle in needles:
        assert needle in err, f"the message should mention {needle!r}: {err!r}"


def _no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the figures at the end of train: they take most of a tiny run's time."""
    monkeypatch.setattr(workflow, "plot", lambda *args, **kwargs: [])


@pytest.fixture(scope="module", name="trained")
def trained_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A realnvp trained for two epochs on 150 rows, and its data file."""
    folder = tmp_path_factory.mktemp("robust")
    data = _write_csv(folder / "rows.csv", _raw_rows(150), ["a", "b"])
    settings_ = workflow.TrainSettings(
        out=str(folder / "run"), data=str(data), recipe=Recipe(epochs=2, batch_size=64)
    )
    workflow.train(settings_, progress=False)

    return {
        "folder": folder,
        "data": data,
        "model": folder / "run" / "model.pt",
        "resume": folder / "run" / "resume.pt",
    }


# --- Bad input on the command line ------------------------------------------------------------


def _invalid_rows_csv(path: Path) -> Path:
    rows = _raw_rows(20, seed=1).astype(object)
    rows[2, 0] = "nan"
    rows[6, 1] = "inf"
    rows[11, 1] = "-inf"

    return _write_csv(path, rows, ["a", "b"])


def _data_command(command: str, data: Path, trained: dict, tmp_path: Path) -> list:
    """The argument list of a command that reads the data file ``data``."""
    return {
        "train": ["train", "--data", data, "--out", tmp_path / "run"],
        "evaluate": ["evaluate", trained["model"], "--data", data],
        "score": ["score", trained["model"], "--data", data, "--out", tmp_path / "s.csv"],
        "plot": ["plot", trained["model"], "--data", data, "--out", tmp_path / "figures"],
    }[command]


@pytest.mark.parametrize("command", ["train", "evaluate", "score", "plot"])
def test_rows_with_nan_or_inf_are_refused_with_count_and_rows(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    data = _invalid_rows_csv(tmp_path / "bad.csv")
    argv = _data_command(command, data, trained, tmp_path)
    code, _, err = _run(capsys, argv)

    _assert_refused(code, err, "3 row(s)", "3, 7, 12", "--drop-invalid")


def test_drop_invalid_drops_the_rows_and_says_how_many(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _invalid_rows_csv(tmp_path / "bad.csv")
    code, out, err = _run(capsys, ["evaluate", trained["model"], "--data", data, "--drop-invalid"])
    assert code == 0, f"evaluate --drop-invalid failed: {err}"
    assert out.startswith("17 rows (3 invalid rows dropped)"), f"unexpected summary: {out!r}"

    scores = tmp_path / "scores.csv"
    argv = ["score", trained["model"], "--data", data, "--out", scores, "--drop-invalid"]
    code, _, err = _run(capsys, argv)
    assert code == 0, f"score --drop-invalid failed: {err}"
    assert len(scores.read_text().splitlines()) == 1 + 17, "score must keep the 17 valid rows"

    figures = tmp_path / "figures"
    argv = ["plot", trained["model"], "--data", data, "--out", figures, "--drop-invalid"]
    code, _, err = _run(capsys, argv)
    assert code == 0, f"plot --drop-invalid failed: {err}"
    assert (figures / "samples.png").is_file(), "plot --drop-invalid must draw the figures"


def test_plot_reads_the_columns_it_is_given(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = np.column_stack([_raw_rows(40, seed=3), np.zeros(40)])
    data = _write_csv(tmp_path / "three.csv", rows, ["a", "b", "c"])
    argv = ["plot", trained["model"], "--data", data, "--out", tmp_path / "figures"]

    code, _, err = _run(capsys, [*argv, "--columns", "a"])
    _assert_refused(code, err, "1 column(s)", "trained on 2")
    code, _, err = _run(capsys, [*argv, "--columns", "b,c"])
    assert code == 0, f"plot --columns b,c failed: {err}"


def _model_alone(trained: dict, folder: Path) -> Path:
    """A run folder holding a copy of the trained model and nothing else."""
    folder.mkdir()
    (folder / "model.pt").write_bytes(trained["model"].read_bytes())

    return folder


def test_plot_keeps_the_runs_figures_and_replaces_others_only_when_forced(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _model_alone(trained, tmp_path / "run")
    code, _, err = _run(capsys, ["plot", run / "model.pt"])
    assert code == 0, f"plot into the run's own folder failed: {err}"
    own = {path.name: path.read_bytes() for path in run.glob("*.png")}

    code, _, err = _run(capsys, ["plot", run / "model.pt", "--data", trained["data"]])
    _assert_refused(code, err, "holds the run's own figures", "--out")
    assert {path.name: path.read_bytes() for path in run.glob("*.png")} == own

    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "heatmap.png").write_text("the user's own file\n")
    argv = ["plot", run / "model.pt", "--data", trained["data"], "--out", figures]
    code, _, err = _run(capsys, argv)
    _assert_refused(code, err, str(figures / "heatmap.png"), "--force")
    assert (figures / "heatmap.png").read_text() == "the user's own file\n"

    code, _, err = _run(capsys, [*argv, "--force"])
    assert code == 0, f"plot --force failed: {err}"
    assert (figures / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_refused_plot_makes_no_folder(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _invalid_rows_csv(tmp_path / "bad.csv")
    out = tmp_path / "new" / "figures"
    code, _, err = _run(capsys, ["plot", trained["model"], "--data", data, "--out", out])

    _assert_refused(code, err, "--drop-invalid")
    assert not (tmp_path / "new").exists(), "a refused plot left a folder behind"


@pytest.mark.parametrize("command", ["evaluate", "score", "plot"])
def test_columns_are_matched_by_name_not_reordered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, trained: dict
) -> None:
    rows = np.column_stack([_raw_rows(40, seed=4), _raw_rows(40, seed=5)[:, 0]])
    shuffled = _write_csv(tmp_path / "cols.csv", rows, ["b", "a", "c"])
    argv = _data_command(command, shuffled, trained, tmp_path)

    code, _, err = _run(capsys, [*argv, "--columns", "b,a"])
    _assert_refused(code, err, "--columns b,a", "another order", "a,b")

    doubled = _write_csv(tmp_path / "doubled.csv", rows, ["a", "a", "b"])
    code, _, err = _run(capsys, _data_command(command, doubled, trained, tmp_path))
    _assert_refused(code, err, "'a' more than once", "by number")


def test_names_for_a_file_without_a_header_say_so(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_csv(tmp_path / "bare.csv", _raw_rows(40, seed=6))
    argv = ["evaluate", trained["model"], "--data", data, "--columns", "a,b"]
    code, _, err = _run(capsys, argv)

    _assert_refused(code, err, "no column named 'a'", "no header", "by number")


def test_plot_row_options_need_data(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plot", trained["model"], "--columns", "a,b", "--out", tmp_path / "figures"]
    code, _, err = _run(capsys, argv)

    _assert_refused(code, err, "--columns and --drop-invalid need --data")
    assert not (tmp_path / "figures").exists(), "a refused plot must write nothing"


def test_train_drop_invalid_says_how_many(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_figures(monkeypatch)
    rows = _raw_rows(60, seed=2).astype(object)
    rows[[4, 30], 0] = "nan"
    data = _write_csv(tmp_path / "rows.csv", rows, ["a", "b"])
    argv = ["train", "--data", data, "--drop-invalid", "--model", "planar", "--epochs", "1"]
    code, out, err = _run(capsys, [*argv, "--out", tmp_path / "run", "--no-progress"])

    assert code == 0, f"train --drop-invalid failed: {err}"
    assert "58 rows × 2 columns, 2 invalid rows dropped" in out, f"unexpected summary: {out!r}"


def _huge_npy(path: Path) -> None:
    """A 144-byte .npy whose header claims 10**15 rows (no allocation of that size succeeds)."""
    with path.open("wb") as file:
        header = {"descr": "<f8", "fortran_order": False, "shape": (10**15, 2)}
        np.lib.format.write_array_header_1_0(file, header)
        file.write(b"\0" * 16)


def _pickled_npy(path: Path) -> None:
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def _zip_with_garbage(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY garbage")


def _zip_with_text_member(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", b"1,2\n3,4\n")


BAD_FILES = {
    "empty.csv": (b"", "empty"),
    "blank.csv": (b"\n  \n\n", "empty"),
    "words.csv": (b"a,b\nx,y\nz,w\n", "not a number"),
    "ragged.csv": (b"1,2\n3,4,5\n6,7\n", "ragged"),
    "header-only.csv": (b"a,b\n", "no data rows"),
    "binary.csv": (bytes(range(128, 256)), "UTF-8"),
    "garbage.npy": (b"this is not numpy", "not a readable .npy"),
    "garbage.npz": (b"PK\x03\x04 not a zip", "not a readable .npz"),
    "rows.txt": (b"1,2\n3,4\n", "unsupported file type"),
    "pickled.npy": (_pickled_npy, "pickled.npy"),
    "member.npz": (_zip_with_garbage, "member.npz"),
    "huge.npy": (_huge_npy, "huge.npy"),
    "text-member.npz": (_zip_with_text_member, "text-member.npz"),
}


@pytest.mark.parametrize("command", ["train", "evaluate", "score", "plot"])
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_unreadable_data_files_are_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, command: str
) -> None:
    content, needle = BAD_FILES[name]
    data = tmp_path / name
    if callable(content):
        content(data)
    else:
        data.write_bytes(content)
    argv = _data_command(command, data, trained, tmp_path)
    code, _, err = _run(capsys, argv)

    _assert_refused(code, err, needle)
    assert "allow_pickle" not in err, "the message must not suggest loading pickles"


@pytest.mark.parametrize("command", ["evaluate", "score"])
@pytest.mark.parametrize("name", ["archive.npy", "array.npz"])
def test_numpy_content_under_the_other_suffix_is_read_or_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, command: str
) -> None:
    # numpy.load sniffs the content, not the name: an .npz archive named .npy, or the reverse.
    rows = _raw_rows(30, seed=5)
    data = tmp_path / name
    with data.open("wb") as file:
        if name == "archive.npy":
            np.savez(file, x=rows)
        else:
            np.save(file, rows)
    argv = {
        "evaluate": ["evaluate", trained["model"], "--data", data],
        "score": ["score", trained["model"], "--data", data, "--out", tmp_path / "s.csv"],
    }[command]
    code, _, err = _run(capsys, argv)

    if code != 0:
        _assert_refused(code, err, name)


@pytest.mark.parametrize("rows", [3, 12])
def test_too_few_rows_for_a_split_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: int
) -> None:
    data = _write_csv(tmp_path / "few.csv", _raw_rows(rows), ["a", "b"])
    code, _, err = _run(capsys, ["train", "--data", data, "--out", tmp_path / "run"])

    _assert_refused(code, err, f"{rows} rows are too few")


@pytest.mark.parametrize("command", ["evaluate", "score", "plot"])
def test_column_count_differing_from_the_checkpoint_is_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    data = _write_csv(tmp_path / "three.csv", np.random.default_rng(0).normal(size=(30, 3)))
    argv = {
        "evaluate": ["evaluate", trained["model"], "--data", data],
        "score": ["score", trained["model"], "--data", data, "--out", tmp_path / "s.csv"],
        "plot": ["plot", trained["model"], "--data", data, "--out", tmp_path / "figures"],
    }[command]
    code, _, err = _run(capsys, argv)

    _assert_refused(code, err, "3 column(s)", "trained on 2")


def test_unknown_model_and_dataset_list_the_valid_ones(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "train",
        "--data",
        trained["data"],
        "--model",
        "no-such-model",
        "--out",
        tmp_path / "a",
    ]
    code, _, err = _run(capsys, argv)
    _assert_refused(code, err, "'no-such-model'", "realnvp", "planar")

    code, _, err = _run(capsys, ["train", "--dataset", "no-such-dataset", "--out", tmp_path / "b"])
    _assert_refused(code, err, "'no-such-dataset'", "moons", "circles")


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--lr", "0", "learning rate"),
        ("--lr", "-0.001", "learning rate"),
        ("--lr", "nan", "finite"),
        ("--weight-decay", "-0.1", "weight decay"),
        ("--weight-decay", "1", "weight decay"),
        ("--weight-decay", "inf", "finite"),
        ("--epochs", "0", "at least 1"),
        ("--epochs", "-3", "at least 1"),
        ("--batch-size", "1", "batch size"),
        ("--batch-size", "0", "batch size"),
        ("--val-fraction", "1.5", "validation fraction"),
        ("--patience", "0", "at least 1"),
        ("--seed", "abc", "whole number"),
        ("--epochs", "1_000", "whole number, got '1_000'"),
        ("--lr", "1_0e-3", "a number, got '1_0e-3'"),
    ],
)
def test_bad_training_numbers_are_refused(
    trained: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
    needle: str,
) -> None:
    argv = ["train", "--data", trained["data"], "--out", tmp_path / "run", option, value]
    code, _, err = _run(capsys, argv)

    _assert_refused(code, err, needle)
    assert not (tmp_path / "run" / "model.pt").exists(), "a refused run must not write a model"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sample", "{model}", "-n", "5", "--out", "{tmp}/s.csv", "--temperature", "-1"], "temp"),
        (["sample", "{model}", "-n", "0", "--out", "{tmp}/s.csv"], "at least 1"),
        (["sample", "{model}", "-n", "many", "--out", "{tmp}/s.csv"], "whole number"),
        (
            ["score", "{model}", "--data", "{data}", "--out", "{tmp}/s.csv", "--quantile", "0"],
            "quantile",
        ),
        (
            ["score", "{model}", "--data", "{data}", "--out", "{tmp}/s.csv", "--quantile", "1"],
            "quantile",
        ),
        (["evaluate", "{model}", "--data", "{data}", "--columns", "a,zz"], "'zz'"),
        (["evaluate", "{model}", "--data", "{data}", "--columns", "1,9"], "out of range"),
        (["evaluate", "{model}", "--data", "{data}", "--columns", "a,a"], "chosen twice"),
        (["sample", "{model}", "-n", "5", "--out", "{tmp}/s.csv", "--seed", "-5"], "--seed"),
        (["train", "--data", "{data}", "--out", "{tmp}/run", "--seed", "-5"], "--seed"),
        (["sample", "{model}", "-n", "5", "--out", "{model}"], "is the input file"),
        (["score", "{model}", "--data", "{data}", "--out", "{data}"], "is the input file"),
        (["score", "{model}", "--data", "{data}", "--out", "{model}"], "is the input file"),
    ],
)
def test_bad_command_numbers_are_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list, needle: str
) -> None:
    values = {"model": trained["model"], "data": trained["data"], "tmp": tmp_path}
    code, _, err = _run(capsys, [a.format(**values) for a in argv])

    _assert_refused(code, err, needle)


def test_missing_files_are_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    cases = [
        (["train", "--data", f"{missing}.csv", "--out", tmp_path / "run"], "no such file"),
        (["train", "--config", f"{missing}.toml"], "no such config file"),
        (["evaluate", f"{missing}.pt", "--data", trained["data"]], "does not exist"),
        (["evaluate", trained["model"], "--data", f"{missing}.csv"], "no such file"),
        (["sample", f"{missing}.pt", "-n", "3", "--out", tmp_path / "s.csv"], "does not exist"),
        (["score", trained["model"], "--data", f"{missing}.npy", "--out", tmp_path / "s.csv"], ""),
        (["plot", f"{missing}.pt"], "does not exist"),
        (["train", "--resume", f"{missing}.pt"], "does not exist"),
        (["report", missing], "no such run folder"),
    ]
    for argv, needle in cases:
        code, _, err = _run(capsys, argv)
        _assert_refused(code, err, str(missing), needle)


def test_a_directory_given_as_a_file_is_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    cases = [
        ["train", "--data", folder, "--out", tmp_path / "run"],
        ["train", "--config", folder],
        ["evaluate", folder, "--data", trained["data"]],
        ["evaluate", trained["model"], "--data", folder],
        ["sample", folder, "-n", "3", "--out", tmp_path / "s.csv"],
        ["sample", trained["model"], "-n", "3", "--out", folder],
        ["score", trained["model"], "--data", trained["data"], "--out", folder],
        ["plot", folder],
        ["train", "--resume", folder],
    ]
    for argv in cases:
        code, _, err = _run(capsys, argv)
        _assert_refused(code, err, str(folder))
    assert folder.is_dir() and not any(folder.iterdir()), "the directory must be left alone"


def test_a_resume_file_is_refused_where_a_model_is_read(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resume = trained["resume"]
    cases = [
        ["evaluate", resume, "--data", trained["data"]],
        ["sample", resume, "-n", "3", "--out", tmp_path / "s.csv"],
        ["score", resume, "--data", trained["data"], "--out", tmp_path / "scores.csv"],
        ["plot", resume, "--out", tmp_path / "figures"],
    ]
    for argv in cases:
        code, _, err = _run(capsys, argv)
        _assert_refused(code, err, str(resume), "train --resume", "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused command wrote files"


def test_samples_write_through_a_link_and_into_a_pipe(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    code, _, err = _run(capsys, ["sample", trained["model"], "-n", "3", "--out", link])
    _assert_refused(code, err, str(link), "exists", "--force")
    assert target.read_text() == "old\n", "a refused sample wrote over the file"
    argv = ["sample", trained["model"], "-n", "3", "--out", link, "--force"]
    code, _, err = _run(capsys, argv)
    assert code == 0, err
    assert link.is_symlink(), "the link was replaced by a file"
    assert target.read_text().splitlines()[0] == "a,b", "the file behind the link was not written"

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()))
    reader.start()
    code, _, err = _run(capsys, ["sample", trained["model"], "-n", "3", "--out", pipe])
    reader.join(timeout=30)
    assert code == 0, err
    assert pipe.exists() and not pipe.is_file(), "the pipe was replaced by a file"
    assert received and len(received[0].splitlines()) == 4, f"the pipe received {received}"


@pytest.mark.parametrize(
    ("column", "needle"),
    [
        (np.full(50, 0.1), "constant"),  # a mean that rounds off 0.1 leaves a std of 4e-16
        (np.linspace(1.0, 2.0, 50) * 1e-300, "vary by less than 1e-150"),
        (np.linspace(1.0, 2.0, 50) * 1e200, "too large to standardize"),
    ],
)
@pytest.mark.filterwarnings("error")  # the refusal is the only thing the user sees
def test_columns_that_cannot_be_standardized_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], column: np.ndarray, needle: str
) -> None:
    rows = np.column_stack([np.random.default_rng(0).normal(size=50), column])
    data = tmp_path / "rows.npy"
    np.save(data, rows)
    code, _, err = _run(capsys, ["train", "--data", data, "--out", tmp_path / "run"])

    _assert_refused(code, err, "column(s) 2", needle)
    assert not (tmp_path / "run" / "model.pt").exists(), "a refused run wrote a model"


@pytest.mark.filterwarnings("error")  # the refusal is the only thing the user sees
def test_rows_that_overflow_when_standardized_are_refused_without_warnings(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _raw_rows(10, seed=3)
    rows[2] = [1.79e308, -1.79e308]  # x - mean and (x - mean) / std overflow float64
    data = _write_csv(tmp_path / "edge.csv", rows, ["a", "b"])
    code, _, err = _run(capsys, ["evaluate", trained["model"], "--data", data])

    _assert_refused(code, err, "1 row(s) lie beyond", "first rows: 3")


def test_rows_beyond_the_model_range_are_refused_or_dropped(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _raw_rows(10, seed=3)
    rows[4, 0] = 1e30  # finite, but about 1e28 standard deviations out
    data = _write_csv(tmp_path / "far.csv", rows, ["a", "b"])

    code, _, err = _run(capsys, ["evaluate", trained["model"], "--data", data])
    _assert_refused(code, err, "1 row(s) lie beyond", "first rows: 5", "--drop-invalid")

    scores = tmp_path / "scores.csv"
    argv = ["score", trained["model"], "--data", data, "--out", scores, "--drop-invalid"]
    code, _, err = _run(capsys, argv)
    assert code == 0, err
    table = np.loadtxt(scores, delimiter=",", skiprows=1)
    assert table.shape == (9, 3) and np.isfinite(table).all(), "a far row was scored"
    assert 5 not in table[:, 0], "the far row (data row 5) was scored"
    np.testing.assert_array_equal(table[:, 0], [1, 2, 3, 4, 6, 7, 8, 9, 10])


def test_evaluate_json_is_standard_json_for_an_infinite_nll(
    trained: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = {"rows": 3, "rows_dropped": 0, "nll_mean": math.inf, "nll_median": 1.0}
    result |= {"nll_se": math.nan, "bits_per_dim": math.inf}
    monkeypatch.setattr(workflow, "evaluate", lambda *args: result)
    argv = ["evaluate", trained["model"], "--data", trained["data"], "--json"]
    code, out, err = _run(capsys, argv)

    assert code == 0, err
    parsed = json.loads(out, parse_constant=_no_constant)
    assert parsed["nll_mean"] is None and parsed["nll_se"] is None and parsed["rows"] == 3


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} is not standard JSON")


def test_a_refused_output_leaves_no_temporary_file(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "taken"
    folder.mkdir()
    code, _, err = _run(capsys, ["sample", trained["model"], "-n", "3", "--out", folder])

    _assert_refused(code, err, str(folder))
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "taken")
    assert left == [], f"a failed write left files behind: {left}"


def test_a_huge_sample_count_is_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 10**30 does not fit in 64 bits, so no allocation is ever attempted.
    argv = ["sample", trained["model"], "-n", str(10**30), "--out", tmp_path / "s.csv"]
    code, _, err = _run(capsys, argv)

    _assert_refused(code, err)


def test_a_learning_rate_beyond_float32_is_refused_or_diverges(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--data", trained["data"], "--lr", "1e300", "--epochs", "1"]
    code, _, err = _run(capsys, [*argv, "--out", tmp_path / "run", "--no-progress"])

    assert code in {1, 2}, f"expected exit code 1 or 2, got {code}: {err!r}"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, f"stderr: {err!r}"


@pytest.mark.parametrize("device", ["meta", "mps", "xla", "cuda:7", "gpu"])
def test_an_unusable_device_is_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str
) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device may exist here")
    argv = ["train", "--data", trained["data"], "--epochs", "1", "--device", device]
    code, _, err = _run(capsys, [*argv, "--out", tmp_path / "run", "--no-progress"])

    _assert_refused(code, err, device)


def test_batch_size_two_on_an_odd_number_of_rows_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_figures(monkeypatch)
    data = _write_csv(tmp_path / "rows.csv", _raw_rows(23, seed=3), ["a", "b"])
    argv = ["train", "--data", data, "--batch-size", "2", "--val-fraction", "0"]
    code, _, err = _run(capsys, [*argv, "--epochs", "1", "--out", tmp_path / "run"])

    assert code == 0, f"--batch-size 2 (documented minimum) on 23 rows failed: {err!r}"


@pytest.mark.parametrize(
    "header",
    [
        # Each fails numpy's header parser differently: a tokenize error, a TypeError while
        # sorting the keys, a truncated dictionary.
        b"3'descr': '<f8', 'fortran_order': False, 'shape': (3, 2)\xb7 } ",
        b"{'descr': '<f8', 'fortran_order': False,B'shape': (3, 2), } ",
        b"{'descr': '<f8', 'fortran_order': False, 'shape': (3, ",
    ],
)
def test_damaged_npy_headers_are_refused_as_data_errors(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "damaged.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)

    with pytest.raises(DataError, match=r"not a readable \.npy file"):
        read_table(path)


# --- The Python API ----------------------------------------------------------------------------


def test_python_api_raises_typed_exceptions(tmp_path: Path) -> None:
    assert issubclass(DataError, ValueError), "DataError must be a ValueError"
    assert issubclass(CheckpointError, ValueError), "CheckpointError must be a ValueError"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_table(empty)
    with pytest.raises(DataError, match="no such file"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="too few"):
        split_rows(np.zeros((3, 2)), 0.1, seed=0)
    with pytest.raises(DataError, match="exactly one"):
        workflow.TrainSettings(out=str(tmp_path))
    with pytest.raises(ValueError, match="K"):
        models.planar(K=0)
    with pytest.raises(ValueError, match="blocks"):
        models.realnvp(blocks=0)
    with pytest.raises(ValueError, match="batch size"):
        Recipe(batch_size=1)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_a_one_dimensional_coupling_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="dim") as raised:
        AffineCouplingLayer(1, 0)

    message = str(raised.value)
    assert "2" in message and "fixed" in message, f"the reason is not given: {message}"


def test_complementary_couplings_in_three_dimensions_move_every_coordinate() -> None:
    torch.manual_seed(0)
    even, odd = AffineCouplingLayer(3, 0, hidden=16), AffineCouplingLayer(3, 1, hidden=16)
    x = torch.randn(64, 3)
    with torch.no_grad():
        y_even, _ = even(x)
        y_odd, _ = odd(x)
        both, _ = odd(y_even)
        back, _ = even.inverse(odd.inverse(both)[0])

    moved_even = (y_even != x).any(0).tolist()
    moved_odd = (y_odd != x).any(0).tolist()
    assert moved_even == [False, True, False], f"mask 1,0,1 moved {moved_even}"
    assert moved_odd == [True, False, True], f"mask 0,1,0 moved {moved_odd}"
    assert (both != x).all(0).all(), "together the two couplings must move every coordinate"
    torch.testing.assert_close(back, x, msg="the pair must invert exactly")


def test_float64_input_to_a_float32_model_is_cast() -> None:
    torch.manual_seed(0)
    flow = models.realnvp(blocks=2, hidden=8).eval()
    x = np.random.default_rng(0).normal(size=(5, 2))
    with torch.no_grad():
        reference = flow.log_prob(torch.as_tensor(x, dtype=torch.float32))
        from_numpy = flow.log_prob(x)
        from_torch64 = flow.log_prob(torch.as_tensor(x))
        single = flow.log_prob(x[0])

    assert reference.dtype == torch.float32 and reference.shape == (5,)
    torch.testing.assert_close(torch.as_tensor(from_numpy), reference)
    torch.testing.assert_close(torch.as_tensor(from_torch64), reference)
    assert single.shape == (), f"a single point must give a scalar, got {tuple(single.shape)}"
    assert single.item() == pytest.approx(reference[0].item(), abs=1e-5), "single point differs"


# --- Fuzzing -----------------------------------------------------------------------------------


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)

    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)

    return buffer.getvalue()


_tables = arrays(
    np.float64,
    st.tuples(st.integers(1, 30), st.integers(1, 4)),
    elements=st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
        st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e308, -1e308, 5e-324]),
    ),
)


def _table_text(table: np.ndarray, header: bool) -> bytes:
    lines = [",".join(f"c{j}" for j in range(table.shape[1]))] if header else []
    lines += [",".join(repr(float(v)) for v in row) for row in table]

    return ("\n".join(lines) + "\n").encode()


_file_contents = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(_table_text, _tables, st.booleans()),
    _tables.map(_npy_bytes),
    st.builds(lambda t: _zip_bytes({"x.npy": _npy_bytes(t)}), _tables),
    st.dictionaries(st.text(min_size=1, max_size=8), st.binary(max_size=60), max_size=3).map(
        _zip_bytes
    ),
)


# Shrinking a failure can take many times longer than finding it; report it as found.
_NO_SHRINK = (Phase.explicit, Phase.generate)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    phases=_NO_SHRINK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    content=_file_contents,
    suffix=st.sampled_from([".csv", ".npy", ".npz"]),
    command=st.sampled_from(["train", "evaluate", "score"]),
    model=st.sampled_from(["realnvp", "planar"]),
    drop=st.booleans(),
)
def test_fuzz_data_files(
    trained: dict, content: bytes, suffix: str, command: str, model: str, drop: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / f"data{suffix}"
        data.write_bytes(content)
        argv = {
            "train": ["train", "--data", data, "--epochs", "1", "--model", model],
            "evaluate": ["evaluate", trained["model"], "--data", data],
            "score": ["score", trained["model"], "--data", data, "--out", f"{folder}/s.csv"],
        }[command]
        argv += ["--out", f"{folder}/run", "--no-progress"] if command == "train" else []
        argv += ["--drop-invalid"] if drop else []
        with pytest.MonkeyPatch.context() as patch:
            _no_figures(patch)
            code = cli.main([str(a) for a in argv])

    assert code in EXIT_CODES, f"exit code {code} for {argv}"


_HUGE = ["1e300", "-1e300", "1e400", "inf", "-inf", "nan", str(10**30), "9" * 40, "-0"]
_values = st.one_of(
    st.integers(-5, 3000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(_HUGE),
    st.text(max_size=12),
)
_DEVICES = ["cpu", "cuda", "cuda:3", "meta", "mps", "garbage", ""]
_OPTIONS = {
    "train": [
        "--batch-size",
        "--lr",
        "--val-fraction",
        "--seed",
        "--patience",
        "--model",
        "--columns",
        "--device",
    ],
    "evaluate": ["--columns"],
    "sample": ["-n", "--temperature", "--seed"],
    "score": ["--quantile", "--columns"],
}


@settings(max_examples=80, deadline=None, database=None, phases=_NO_SHRINK)
@given(data=st.data())
def test_fuzz_options(trained: dict, data: st.DataObject) -> None:
    command = data.draw(st.sampled_from(list(_OPTIONS)), label="command")
    given_ = data.draw(
        st.dictionaries(st.sampled_from(_OPTIONS[command]), _values, max_size=4), label="options"
    )
    if "--device" in given_:
        given_["--device"] = data.draw(st.sampled_from(_DEVICES), label="device")
    with tempfile.TemporaryDirectory() as folder:
        base = {
            "train": [
                "train",
                "--data",
                trained["data"],
                "--epochs",
                "1",
                "--no-progress",
                "--out",
                f"{folder}/run",
            ],
            "evaluate": ["evaluate", trained["model"], "--data", trained["data"]],
            "sample": ["sample", trained["model"], "--out", f"{folder}/s.csv"],
            "score": [
                "score",
                trained["model"],
                "--data",
                trained["data"],
                "--out",
                f"{folder}/s.csv",
            ],
        }[command]
        if command == "sample" and "-n" not in given_:
            given_["-n"] = "5"
        argv = [str(a) for a in base] + [f"{k}={v}" for k, v in given_.items()]
        with pytest.MonkeyPatch.context() as patch:
            _no_figures(patch)
            code = cli.main(argv)

    assert code in EXIT_CODES, f"exit code {code} for {argv}"


# --- Untrusted checkpoints ---------------------------------------------------------------------


class _CreatesFile:
    """Unpickling this object opens (creates) a file: a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


class _TouchesFile(_CreatesFile):
    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.path),))


def _hostile_file(kind: str, path: Path, marker: Path, trained: dict) -> None:
    payload = torch.load(trained["model"], map_location="cpu", weights_only=True)
    if kind == "torch-zip":
        payload["info"] = {"settings": _CreatesFile(marker)}
        torch.save(payload, path)
    elif kind == "legacy-pickle":
        payload["standardizer"] = {"mean": _TouchesFile(marker), "std": [1.0, 1.0]}
        with path.open("wb") as file:
            pickle.dump(payload, file, protocol=4)
    else:
        torch.save(_CreatesFile(marker), path)


@pytest.mark.parametrize("kind", ["torch-zip", "legacy-pickle", "bare-object"])
def test_hostile_checkpoints_run_no_code(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    # The object really does create a file when unpickled the unsafe way.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_CreatesFile(control))).close()
    pickle.loads(pickle.dumps(_TouchesFile(tmp_path / "control2")))
    assert control.exists() and (tmp_path / "control2").exists(), "the payload must be live"

    marker = tmp_path / "marker"
    hostile = tmp_path / "model.pt"
    _hostile_file(kind, hostile, marker, trained)
    data = trained["data"]
    calls = {
        "checkpoint.load": lambda: checkpoint.load(hostile),
        "workflow.evaluate": lambda: workflow.evaluate(hostile, data),
        "workflow.score": lambda: workflow.score(hostile, data),
        "workflow.draw": lambda: workflow.draw(hostile, 5),
        "workflow.plot": lambda: workflow.plot(hostile, tmp_path / "figures"),
        "workflow.resume": lambda: workflow.resume(hostile, str(tmp_path / "resumed")),
    }
    for name, call in calls.items():
        with pytest.raises(CheckpointError):
            call()
        assert not marker.exists(), f"{name} ran code from the checkpoint"

    commands = [
        ["evaluate", hostile, "--data", data],
        ["sample", hostile, "-n", "3", "--out", tmp_path / "s.csv"],
        ["score", hostile, "--data", data, "--out", tmp_path / "s.csv"],
        ["plot", hostile, "--out", tmp_path / "figures"],
        ["train", "--resume", hostile],
    ]
    for argv in commands:
        code, _, err = _run(capsys, argv)
        _assert_refused(code, err, str(hostile))
        assert not marker.exists(), f"exactflow {argv[0]} ran code from the checkpoint"


def test_a_plain_pickle_is_refused_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with path.open("wb") as file:
        pickle.dump({"standardizer": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}}, file, protocol=4)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="not an exactflow checkpoint"):
            checkpoint.load(path)
    assert not caught, f"warnings besides the refusal: {[str(w.message) for w in caught]}"


def _edit(payload: dict, change: str) -> dict:
    payload = dict(payload)
    if change == "missing key":
        del payload["standardizer"]
    elif change == "unexpected key":
        payload["optimizer_hack"] = 1
    elif change == "format version":
        payload["format_version"] = 2
    elif change == "another shape":
        torch.manual_seed(0)
        payload["state"] = models.realnvp(hidden=32).state_dict()
    elif change == "missing weight":
        payload["state"] = {k: v for k, v in payload["state"].items() if k != "layers.1.beta"}
    elif change == "extra weight":
        payload["state"] = {**payload["state"], "layers.99.gain": torch.ones(2)}
    elif change == "unknown model":
        payload["model"] = {"name": "transformer", "dim": 2, "options": {}}
    elif change == "not a checkpoint":
        payload["format"] = "something-else"
    elif change == "format version as text":
        payload["format_version"] = "1"
    elif change == "whole-number weights":
        payload["state"] = {k: v.round().long() for k, v in payload["state"].items()}
    elif change == "a column name too many":
        payload["info"] = {**payload["info"], "columns": ["a", "b", "c"]}

    return payload


CHANGES = {
    "missing key": ("missing keys", "standardizer"),
    "unexpected key": ("unexpected keys", "optimizer_hack"),
    "format version": ("format version 2",),
    "another shape": ("does not match", "size mismatch"),
    "missing weight": ("missing weights", "layers.1.beta"),
    "extra weight": ("unexpected weights", "layers.99.gain"),
    "unknown model": ("cannot be built", "transformer"),
    "not a checkpoint": ("not an exactflow checkpoint",),
    "format version as text": ("format version '1'",),
    "whole-number weights": ("does not match", "torch.int64 values"),
    "a column name too many": ("names 3 columns", "dimension 2"),
}


@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("dim", [2, 3])
def test_every_model_saves_and_loads(tmp_path: Path, name: str, dim: int) -> None:
    torch.manual_seed(0)
    flow = models.build(name, dim)
    standardizer = Standardizer(mean=np.zeros(dim), std=np.ones(dim))
    path = tmp_path / "model.pt"
    checkpoint.save(path, flow, {"name": name, "dim": dim, "options": {}}, standardizer)

    loaded, _, _ = checkpoint.load(path)

    for (key, mine), (_, theirs) in zip(
        loaded.state_dict().items(), flow.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, theirs), key


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"x,y\n1,2\n", "not a torch file of tensors and plain data"),
        (b"", "empty or cut short"),
        (b"PK\x03\x04" + b"\x00" * 40, "damaged or of another kind"),
        # Text starting with the opcodes 's' or 'e' stops the loader with an IndexError.
        (b"step,loss\n1,2.5\n", "damaged or of another kind"),
        (b"epoch,train_nll\n1,2.5\n", "damaged or of another kind"),
    ],
)
def test_files_that_are_no_checkpoint_get_a_short_reason(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)

    with pytest.raises(CheckpointError, match=needle) as raised:
        checkpoint.load(path)
    assert "weights_only" not in str(raised.value)
    assert len(str(raised.value)) - len(str(path)) < 160, "the reason is not short"


def _edited_checkpoint(trained: dict, tmp_path: Path, edit: Callable[[dict], dict]) -> Path:
    """Write the trained checkpoint's payload, changed by ``edit``, to a file of its own."""
    payload = torch.load(trained["model"], map_location="cpu", weights_only=True)
    path = tmp_path / "edited.pt"
    torch.save(edit(payload), path)

    return path


@pytest.mark.parametrize("change", list(CHANGES))
def test_incompatible_checkpoints_are_refused_with_the_reason(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    path = _edited_checkpoint(trained, tmp_path, lambda p: _edit(p, change))

    with pytest.raises(CheckpointError) as raised:
        checkpoint.load(path)
    for needle in CHANGES[change]:
        assert needle in str(raised.value), f"{change}: {needle!r} not in {raised.value}"

    code, _, err = _run(capsys, ["evaluate", path, "--data", trained["data"]])
    _assert_refused(code, err, *CHANGES[change])


MALFORMED = {
    "standardizer without mean": lambda p: {**p, "standardizer": {"std": [1.0, 1.0]}},
    "standardizer of another dimension": lambda p: {
        **p,
        "standardizer": {"mean": [0.0], "std": [1.0]},
    },
    "state that is not a mapping": lambda p: {**p, "state": None},
    "info that is a list": lambda p: {**p, "info": []},
    "column names that are a number": lambda p: {**p, "info": {**p["info"], "columns": 5}},
    "settings that are text": lambda p: {**p, "info": {**p["info"], "settings": "x"}},
    "training log-densities that are text": lambda p: {**p, "train_log_density": "x"},
    "no training log-densities": lambda p: {**p, "train_log_density": torch.zeros(0)},
    "training log-densities in a table": lambda p: {
        **p,
        "train_log_density": torch.zeros(3, 3),
    },
    "a NaN weight": lambda p: {
        **p,
        "state": {
            k: v.clone().fill_(math.nan) if k.endswith("beta") else v
            for k, v in p["state"].items()
        },
    },
    "a negative variance": lambda p: {
        **p,
        "state": {k: -v if k.endswith("running_var") else v for k, v in p["state"].items()},
    },
    # Options are bounded by the weights the file carries before anything is built.
    "a huge hidden width": lambda p: {**p, "model": {**p["model"], "options": {"hidden": 60000}}},
    "ten million planar layers": lambda p: {
        **p,
        "model": {"name": "planar", "dim": 2, "options": {"K": 10**7}},
    },
    "a width that is text": lambda p: {**p, "model": {**p["model"], "options": {"hidden": "64"}}},
}


@pytest.mark.parametrize("change", list(MALFORMED))
def test_malformed_checkpoint_fields_are_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    path = _edited_checkpoint(trained, tmp_path, MALFORMED[change])

    with pytest.raises(CheckpointError):
        checkpoint.load(path)
    code, _, err = _run(capsys, ["evaluate", path, "--data", trained["data"]])
    _assert_refused(code, err, str(path))


# --- Interrupted checkpoint writes -------------------------------------------------------------


def test_sigkill_while_saving_leaves_the_checkpoint_intact(tmp_path: Path) -> None:
    seed, hidden = 11, 512
    path = tmp_path / "model.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(HERE / "save_checkpoints_forever.py"), str(path)]
    killed_mid_write = False
    for _ in range(3):
        child = subprocess.Popen(
            [*script, str(seed), str(hidden)], stderr=subprocess.PIPE, env=env
        )
        try:
            deadline = time.monotonic() + 60
            while not (path.exists() and list(tmp_path.glob(".model.pt.*.tmp"))):
                assert child.poll() is None, f"writer died: {child.communicate()[1]!r}"
                assert time.monotonic() < deadline, "no complete save within 60 s"
                time.sleep(0.002)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, "the writer should have been killed"
        if list(tmp_path.glob(".model.pt.*.tmp")):
            killed_mid_write = True
            break

    assert killed_mid_write, "never caught the writer in the middle of a save"
    flow, standardizer, payload = checkpoint.load(path)
    torch.manual_seed(seed)
    expected = models.realnvp(hidden=hidden).state_dict()
    state = flow.state_dict()
    assert state.keys() == expected.keys(), "the checkpoint lost weights"
    for key, value in expected.items():
        assert torch.equal(state[key], value), f"{key} differs from what the writer saved"
    assert standardizer.mean.tolist() == [1.0, -2.0] and standardizer.std.tolist() == [3.0, 0.5]
    assert payload["info"] == {"seed": seed}, "the checkpoint's info was damaged"


# --- State that must not change ----------------------------------------------------------------


def _module_flags(flow: Flow) -> list[bool]:
    return [module.training for module in flow.modules()]


def _exercised_realnvp(training: bool) -> Flow:
    """A small realnvp whose batch-norm running statistics are away from their start."""
    torch.manual_seed(0)
    flow = models.realnvp(blocks=2, hidden=16).train()
    with torch.no_grad():
        for _ in range(3):
            flow.log_prob(torch.randn(64, 2) * 3 + 1)

    return flow.train(training)


@pytest.mark.parametrize("training", [True, False])
def test_evaluation_grids_sampling_and_figures_leave_the_model_unchanged(
    tmp_path: Path, training: bool
) -> None:
    flow = _exercised_realnvp(training)
    assert not torch.equal(flow.layers[1].running_mean, torch.zeros(2)), "stats must have moved"
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    flags = _module_flags(flow)
    grid = Grid((-3.0, -3.0), (3.0, 3.0), 20)
    calls = {
        "evaluate_nll": lambda: evaluate_nll(flow, torch.randn(50, 2)),
        "grid_log_prob": lambda: grid_log_prob(flow, grid),
        "Flow.sample": lambda: flow.sample(50),
        "plotting.transformation": lambda: plotting.transformation(
            flow, tmp_path / "t.png", "t", n=200
        ),
    }
    for name, call in calls.items():
        call()
        assert _module_flags(flow) == flags, f"{name} changed the train/eval flags"
        for key, value in flow.state_dict().items():
            assert torch.equal(value, before[key]), f"{name} changed {key}"


def test_two_heatmaps_of_the_same_model_are_identical() -> None:
    flow = _exercised_realnvp(training=True)
    grid = Grid((-3.0, -3.0), (3.0, 3.0), 30)

    first, second = grid_log_prob(flow, grid), grid_log_prob(flow, grid)

    assert np.isfinite(first).all(), "the heatmap must be finite"
    assert np.array_equal(first, second), "the same model gave two different heatmaps"


def test_workflow_plot_leaves_the_model_unchanged(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = []
    load = checkpoint.load

    def keeping(path: str | Path) -> tuple:
        result = load(path)
        loaded.append(result[0])
        return result

    monkeypatch.setattr(checkpoint, "load", keeping)
    on_disk = trained["model"].read_bytes()
    reference = load(trained["model"])[0].state_dict()

    workflow.plot(trained["model"], tmp_path / "figures")

    assert loaded, "plot must load the checkpoint"
    assert trained["model"].read_bytes() == on_disk, "plot rewrote the checkpoint"
    for flow in loaded:
        assert not any(_module_flags(flow)), "plot left a model in training mode"
        for key, value in flow.state_dict().items():
            assert torch.equal(value, reference[key]), f"plot changed {key}"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["realnvp", "planar"])
def test_sampling_a_fresh_model_follows_its_dtype(name: str, training: bool) -> None:
    torch.manual_seed(0)
    options = {"blocks": 2, "hidden": 8} if name == "realnvp" else {"K": 4}
    flow32 = models.build(name, 2, **options).train(training)
    flow64 = models.build(name, 2, **options).double().train(training)

    x32, x64 = flow32.sample(20), flow64.sample(20)

    assert x32.dtype == torch.float32 and x32.shape == (20, 2), "float32 model, float32 samples"
    assert x64.dtype == torch.float64 and x64.shape == (20, 2), "float64 model, float64 samples"
    assert torch.isfinite(x32).all() and torch.isfinite(x64).all(), "samples must be finite"


# --- Batch norm and batches --------------------------------------------------------------------


def test_batch_norm_refuses_a_batch_of_one_in_training_mode() -> None:
    layer = BatchNormFlow(2).train()
    with pytest.raises(ValueError, match="at least 2"):
        layer(torch.randn(1, 2))

    layer.eval()
    y, _ = layer(torch.randn(1, 2))
    assert y.shape == (1, 2), "evaluation mode must accept a single point"


@pytest.mark.parametrize(("n", "batch_size"), [(257, 256), (513, 256), (3, 2), (5, 2), (7, 4)])
def test_batches_never_hold_a_single_row(n: int, batch_size: int) -> None:
    sizes = [len(b) for b in batches(n, batch_size, torch.Generator().manual_seed(0))]

    assert sum(sizes) == n, f"batches must cover all {n} rows, got {sizes}"
    assert min(sizes) >= 2, f"n={n}, batch size {batch_size}: batch of one in {sizes}"


def test_batches_cover_a_permutation_for_many_sizes() -> None:
    for n in range(2, 40):
        for batch_size in range(2, 12):
            parts = list(batches(n, batch_size, torch.Generator().manual_seed(n)))
            order = torch.cat(parts)
            assert sorted(order.tolist()) == list(range(n)), f"n={n}, b={batch_size}: not a perm"
            assert min(len(p) for p in parts) >= 2, f"n={n}, b={batch_size}: a batch of one"


# --- Seeds -------------------------------------------------------------------------------------


def _seeded_run(data: Path, out: Path, seed: int) -> dict:
    settings_ = workflow.TrainSettings(
        out=str(out), data=str(data), seed=seed, recipe=Recipe(epochs=3, batch_size=32)
    )
    workflow.train(settings_, progress=False)
    with (out / "metrics.csv").open(newline="") as file:
        losses = [(r["loss"], r["train_nll"], r["val_nll"]) for r in csv.DictReader(file)]

    return {
        "losses": losses,
        "payload": torch.load(out / "model.pt", weights_only=True),
        "samples": workflow.draw(out / "model.pt", 50, seed=0),
    }


def test_same_seed_gives_identical_runs_and_another_seed_differs(tmp_path: Path) -> None:
    rows = _raw_rows(120, seed=4)
    data = _write_csv(tmp_path / "rows.csv", rows, ["a", "b"])
    a, b = split_rows(rows, 0.1, seed=3), split_rows(rows, 0.1, seed=3)
    c = split_rows(rows, 0.1, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), "same seed, other split"
    assert not np.array_equal(a[1], c[1]), "another seed gave the same split"

    first = _seeded_run(data, tmp_path / "a", 3)
    second = _seeded_run(data, tmp_path / "b", 3)
    other = _seeded_run(data, tmp_path / "c", 4)

    assert first["losses"] == second["losses"], "same seed, different losses"
    state_a, state_b = first["payload"]["state"], second["payload"]["state"]
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), f"same seed, different {key}"
    assert torch.equal(
        first["payload"]["train_log_density"], second["payload"]["train_log_density"]
    ), "same seed, different training log-densities"
    assert np.array_equal(first["samples"], second["samples"]), "same seed, different samples"
    assert first["losses"] != other["losses"], "another seed gave the same losses"
    assert first["payload"]["standardizer"] != other["payload"]["standardizer"], "same split"
    assert not np.array_equal(first["samples"], other["samples"]), "another seed, same samples"


# --- A saturated scale net ---------------------------------------------------------------------


def _saturate(layer: AffineCouplingLayer, bias: float = 50.0) -> None:
    last = [m for m in layer.nets.scale.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias.fill_(bias)


def test_a_saturated_scale_net_keeps_the_log_det_bounded() -> None:
    torch.manual_seed(0)
    for parity in (0, 1):
        layer = AffineCouplingLayer(2, parity, hidden=16)
        _saturate(layer)
        x = torch.randn(500, 2) * 10
        with torch.no_grad():
            y, log_det = layer(x)
            back, inverse_log_det = layer.inverse(y)

        assert torch.isfinite(y).all(), "outputs must stay finite"
        assert log_det.min() >= -1.0 and log_det.max() <= 1.0, "log-det outside [-1, 1]"
        assert log_det.min() > 0.99, "the +50 bias should saturate the scale at e^1"
        torch.testing.assert_close(inverse_log_det, -log_det)
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-4)


def test_training_with_saturated_scale_nets_stays_finite() -> None:
    torch.manual_seed(0)
    flow = models.realnvp(blocks=4, hidden=16)
    for layer in flow.layers:
        if isinstance(layer, AffineCouplingLayer):
            _saturate(layer)
    x, _ = make_moons(n_samples=512, noise=0.06, random_state=0)
    x = (x - x.mean(0)) / x.std(0)

    result = fit(flow, x, Recipe(epochs=4, batch_size=128), seed=0)

    assert all(math.isfinite(loss) for loss in result.losses), f"losses: {result.losses}"
    assert all(torch.isfinite(p).all() for p in flow.parameters()), "weights became non-finite"
    log_p = -evaluate_nll(flow, torch.as_tensor(x, dtype=torch.float32))
    assert torch.isfinite(log_p).all(), "log-densities must stay finite"


@pytest.mark.parametrize("out", ["/dev/stdout", "-"])
def test_samples_to_standard_output_are_the_rows_alone(trained: dict, out: str) -> None:
    argv = ["sample", str(trained["model"]), "-n", "3", "--out", out]
    done = subprocess.run(
        [sys.executable, "-m", "exactflow.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "a,b" and lines[-1] == "", f"unexpected output {done.stdout!r}"
    assert len(lines) == 5 and all(len(line.split(",")) == 2 for line in lines[1:4])
    assert np.isfinite([[float(c) for c in line.split(",")] for line in lines[1:4]]).all()
    assert "wrote 3 samples" in done.stderr, "the status line belongs on standard error"


def test_samples_to_redirected_standard_output_keep_the_file(
    trained: dict, tmp_path: Path
) -> None:
    log = tmp_path / "log.txt"
    log.write_text("kept\n")
    command = (
        f'{{ echo before; "{sys.executable}" -m exactflow.cli sample "{trained["model"]}" -n 2 '
        f'--out /dev/stdout; echo after; }} >> "{log}"'
    )
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().split("\n")
    assert lines[:3] == ["kept", "before", "a,b"], f"the file lost lines: {lines}"
    assert lines[5:] == ["after", ""], f"the samples were overwritten or misplaced: {lines}"
    assert all(len(line.split(",")) == 2 for line in lines[3:5])


@pytest.mark.parametrize("name", ["s.npz", "s.txt", "s.parquet"])
def test_outputs_of_an_unknown_kind_are_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    for argv in (
        ["sample", trained["model"], "-n", "3", "--out", tmp_path / name],
        ["score", trained["model"], "--data", trained["data"], "--out", tmp_path / name],
    ):
        code, _, err = _run(capsys, argv)
        _assert_refused(code, err, name, ".csv or .npy")
    assert list(tmp_path.iterdir()) == [], "a refused command wrote a file"


def test_existing_files_are_replaced_only_with_force(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = trained["model"].parent / "metrics.csv"
    kept = tmp_path / "metrics.csv"
    kept.write_bytes(history.read_bytes())
    argv = ["score", trained["model"], "--data", trained["data"], "--out", kept]
    code, _, err = _run(capsys, argv)
    _assert_refused(code, err, str(kept), "exists", "--force")
    assert kept.read_bytes() == history.read_bytes(), "the existing file changed"

    code, _, err = _run(capsys, [*argv, "--force"])
    assert code == 0, err
    assert kept.read_text().splitlines()[0] == "row,log_density,is_outlier"


def test_a_nested_output_under_a_file_is_refused_by_name(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(trained["data"]) / "x.csv"
    code, _, err = _run(capsys, ["sample", trained["model"], "-n", "3", "--out", out])
    _assert_refused(code, err, str(trained["data"]), "is a file, not a folder")


def test_samples_beyond_the_model_range_are_refused(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.csv"
    argv = ["sample", trained["model"], "-n", "5", "--out", out, "--temperature", "1e308"]
    code, _, err = _run(capsys, argv)
    _assert_refused(code, err, "not finite", "--temperature")
    assert not out.exists(), "non-finite samples were written"


def test_a_byte_order_mark_is_not_part_of_the_first_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_figures(monkeypatch)
    rows = _raw_rows(60)
    marked = tmp_path / "excel.csv"
    marked.write_bytes(
        b"\xef\xbb\xbf" + _write_csv(tmp_path / "plain.csv", rows, ["a", "b"]).read_bytes()
    )
    argv = ["train", "--data", marked, "--out", tmp_path / "run", "--epochs", "1", "--no-progress"]
    code, _, err = _run(capsys, argv)
    assert code == 0, err
    _, _, payload = checkpoint.load(tmp_path / "run" / "model.pt")
    assert workflow.column_names(payload) == ["a", "b"]

    code, _, err = _run(
        capsys, ["evaluate", tmp_path / "run" / "model.pt", "--data", tmp_path / "plain.csv"]
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("header", "needle"), [(["a", "a"], "repeats 'a'"), (["a", ""], "has an empty name")]
)
def test_training_columns_need_names_of_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], header: list[str], needle: str
) -> None:
    data = _write_csv(tmp_path / "rows.csv", _raw_rows(60), header)
    argv = ["train", "--data", data, "--out", tmp_path / "run", "--epochs", "1"]
    code, _, err = _run(capsys, argv)
    _assert_refused(code, err, str(data), needle)
    assert not (tmp_path / "run").exists(), "a refused run wrote its folder"


def test_data_that_is_not_a_regular_file_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "rows.csv"
    folder.mkdir()
    code, _, err = _run(capsys, ["train", "--data", folder, "--out", tmp_path / "run"])
    _assert_refused(code, err, str(folder), "not a regular file")


def test_training_into_an_earlier_run_needs_force_and_clears_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_csv(tmp_path / "rows.csv", _raw_rows(60), ["a", "b"])
    run = tmp_path / "run"
    argv = ["train", "--data", data, "--out", run, "--epochs", "1", "--no-progress"]
    assert _run(capsys, argv)[0] == 0
    model = (run / "model.pt").read_bytes()
    stale = run / "pairwise.png"  # a figure this 2-D run does not draw
    stale.write_bytes(b"old figure")
    mine = run / "notes.txt"
    mine.write_text("the user's own file\n")

    code, _, err = _run(capsys, [*argv, "--seed", "1"])
    _assert_refused(code, err, str(run), "earlier run", "model.pt", "--force")
    assert (run / "model.pt").read_bytes() == model, "a refused run replaced the model"

    code, _, err = _run(capsys, [*argv, "--seed", "1", "--force"])
    assert code == 0, err
    assert (run / "model.pt").read_bytes() != model, "--force did not replace the run"
    assert not stale.exists(), "a figure of the earlier run was left beside the new one"
    assert "pairwise.png" not in (run / "report.html").read_text()
    assert mine.read_text() == "the user's own file\n", "a file of the user's was touched"


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("batch-size = 64\nbatch_size = 32\n", "given twice"),
        ("columns = []\n", "empty list"),
    ],
)
def test_conflicting_or_empty_config_options_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, needle: str
) -> None:
    path = tmp_path / "run.toml"
    path.write_text(config)
    argv = ["train", "--config", path, "--dataset", "moons", "--out", tmp_path / "run"]
    code, _, err = _run(capsys, argv)
    _assert_refused(code, err, str(path), needle)


def test_quick_and_seeds_together_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["reproduce", "--quick", "--seeds", "3", "--out", tmp_path / "r"]
    code, _, err = _run(capsys, argv)
    _assert_refused(code, err, "--quick", "--seeds")
    assert not (tmp_path / "r").exists()


def test_damaged_run_files_are_named(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _model_alone(trained, tmp_path / "run")
    for damaged in ("x,y\n1,2\n", "", "epoch,train_nll,val_nll\n"):
        (run / "metrics.csv").write_text(damaged)
        code, _, err = _run(capsys, ["plot", run / "model.pt"])
        _assert_refused(code, err, str(run / "metrics.csv"), "damaged")

    (run / "summary.json").write_text("{bad")
    code, _, err = _run(capsys, ["report", run])
    _assert_refused(code, err, str(run / "summary.json"), "JSON")


def test_system_errors_name_their_path(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "figures"
    taken.write_text("a file where a folder is asked for\n")
    code, _, err = _run(capsys, ["plot", trained["model"], "--out", taken])
    _assert_refused(code, err, f"{taken}: File exists")
    assert "Errno" not in err

    code, _, err = _run(capsys, ["train", "--config", tmp_path, "--dataset", "moons"])
    _assert_refused(code, err, f"--config {tmp_path}: Is a directory")


def test_one_column_with_a_two_column_model_names_the_models_that_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_csv(tmp_path / "rows.csv", _raw_rows(60)[:, :1], ["a"])
    argv = ["train", "--data", data, "--out", tmp_path / "run", "--model", "nsf"]
    code, _, err = _run(capsys, argv)
    _assert_refused(code, err, "1 column(s)", "at least 2", "--model planar or radial")

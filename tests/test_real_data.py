"""End to end on a real data set that scikit-learn ships: wine, 13 columns, some of counts."""

import csv
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_wine

from exactflow import cli
from exactflow.data import dequantize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", name="wine_csv")
def wine_csv_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wine = load_wine()
    path = tmp_path_factory.mktemp("wine") / "wine.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(wine.feature_names)
        writer.writerows(wine.data.tolist())

    return path


def test_dequantize_adds_noise_to_whole_number_columns_only() -> None:
    x = np.array([[1.0, 0.5], [2.0, 1.25], [3.0, 2.0]])
    noisy = dequantize(x, seed=0)

    assert np.all((noisy[:, 0] - x[:, 0] >= 0) & (noisy[:, 0] - x[:, 0] < 1))
    assert not np.array_equal(noisy[:, 0], x[:, 0]), "the whole-number column got no noise"
    np.testing.assert_array_equal(noisy[:, 1], x[:, 1])


def test_wine_train_evaluate_sample_score_plot(wine_csv: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--data",
            str(wine_csv),
            "--out",
            str(out),
            "--epochs",
            "4",
            "--dequantize",
            "--batch-size",
            "64",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "13 columns" in capsys.readouterr().out

    assert cli.main(["evaluate", str(out / "model.pt"), "--data", str(wine_csv)]) == 0
    assert "bits per dimension" in capsys.readouterr().out

    samples = tmp_path / "samples.csv"
    assert cli.main(["sample", str(out / "model.pt"), "-n", "300", "--out", str(samples)]) == 0
    drawn = np.loadtxt(samples, delimiter=",", skiprows=1)
    data = load_wine().data
    assert drawn.shape == (300, 13)
    scale = np.abs(np.median(drawn, 0) - np.median(data, 0)) / data.std(0)
    assert np.all(scale < 3), "samples are not in the data's own units"

    scores = tmp_path / "scores.csv"
    argv = ["score", str(out / "model.pt"), "--data", str(wine_csv), "--out", str(scores)]
    assert cli.main(argv) == 0
    table = np.loadtxt(scores, delimiter=",", skiprows=1)
    assert table.shape == (178, 3) and np.isfinite(table[:, 1]).all()

    assert (out / "pairwise.png").is_file(), "train did not draw the pairwise plot"
    assert (out / "report.html").is_file()

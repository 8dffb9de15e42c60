"""The zoo command: a tiny grid of runs writes its JSON, table and figure; bad names exit 2."""

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from exactflow import cli, zoo

MODELS = ("planar", "nice")
DATASETS = ("checkerboard", "pinwheel")


@pytest.fixture(scope="module", name="tiny")
def tiny_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """Run a 2 × 2 zoo of 2 epochs through the command line, in one worker process."""
    out = tmp_path_factory.mktemp("zoo")
    argv = ["zoo", "--models", ",".join(MODELS), "--datasets", ",".join(DATASETS)]
    argv += ["--epochs", "2", "--jobs", "1", "--seed", "5", "--out", str(out)]
    code = cli.main(argv)

    return out, code, (out / zoo.TABLE_FILE).read_text()


def test_tiny_zoo_json_has_every_run(tiny: tuple[Path, int, str]) -> None:
    out, code, _ = tiny
    results = json.loads((out / zoo.JSON_FILE).read_text())

    assert code == 0
    assert results["models"] == list(MODELS) and results["datasets"] == list(DATASETS)
    assert results["recipe"]["epochs"] == 2 and results["seeds"] == 1
    assert results["recipe_name"] == "short with --epochs 2"
    runs = {(r["model"], r["dataset"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {(m, d, 5) for m in MODELS for d in DATASETS}
    assert len(results["summary"]) == 4
    for (model, dataset, _), run in runs.items():
        assert (out / run["checkpoint"]).is_file(), f"{model} {dataset}: no checkpoint"
        assert math.isfinite(run["test_nll"]), f"{model} {dataset}: NLL {run['test_nll']}"
        if dataset == "checkerboard":
            assert run["gap"] == pytest.approx(run["test_nll"] - run["entropy"])
        else:
            assert run["entropy"] is None and run["gap"] is None, f"{model} pinwheel has a floor"


def test_tiny_zoo_table_and_figure(tiny: tuple[Path, int, str]) -> None:
    out, _, text = tiny
    lines = text.splitlines()
    floor = json.loads((out / zoo.JSON_FILE).read_text())["summary"][0]["entropy_mean"]

    assert lines[0] == "| model | params | checkerboard | pinwheel |"
    assert lines[2] == f"| entropy floor H | | {floor:.4f} | — |"
    assert lines[3].startswith("| planar | 160 | ") and "(gap +" in lines[3]
    assert lines[4].startswith("| nice | 17,930 | ")
    assert "nats per point" in text and "standardized coordinates" in text
    recipe = "short with --epochs 2 (2 epochs, Adam at 0.001 cosine-annealed to 1e-05, batch 256"
    assert f"Recipe: {recipe}" in text
    image = matplotlib.image.imread(out / zoo.FIGURE_FILE)
    assert image.shape[0] > image.shape[1] > 300, f"figure of shape {image.shape}"


@pytest.mark.parametrize(
    ("option", "value", "listed"),
    [
        ("--models", "planar,flowy", "valid models: realnvp, planar, radial, nice, glow, maf"),
        ("--datasets", "moons,spirals", "valid datasets: moons, circles, 8gaussians, pinwheel"),
    ],
)
def test_unknown_names_exit_2_with_one_line(
    option: str, value: str, listed: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "never"

    code = cli.main(["zoo", option, value, "--epochs", "1", "--out", str(out)])

    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and listed in error, error
    assert value.split(",")[1] in error
    assert not out.exists(), "a rejected call created its output folder"


def test_table_gives_mean_and_std_over_seeds() -> None:
    def record(model: str, dataset: str, seed: int, nll: float, entropy: float) -> dict:
        return {
            "model": model,
            "dataset": dataset,
            "seed": seed,
            "params": 160,
            "train_nll": nll,
            "test_nll": nll,
            "test_nll_median": nll,
            "outlier_share": 0.0,
            "gaussian_nll": 2.84,
            "published_nll": float("nan"),
            "entropy": entropy,
            "gap": nll - entropy,
            "grid_mass": 1.0 if dataset == "rings" else 0.9,
            "best_epoch": 3,
            "seconds": 1.0,
        }

    nan = float("nan")
    records = [
        record("planar", "rings", 0, 2.0, 1.9),
        record("planar", "rings", 1, 2.2, 1.9),
        record("planar", "swissroll", 0, 2.5, nan),
        record("planar", "swissroll", 1, 2.7, nan),
    ]

    summary = zoo.summarise(records, ["planar"], ["rings", "swissroll"])
    text = zoo.table(summary, "reference", zoo.Recipe())

    lines = text.splitlines()
    assert lines[2] == "| entropy floor H | | 1.9000 | — |"
    assert (
        lines[3] == "| planar | 160 | 2.1000 ± 0.1414 (gap +0.2000 ± 0.1414) | 2.6000 ± 0.1414 ⚠ |"
    )
    assert "2 seeds, mean ± standard deviation over seeds" in text and "⚠:" in text


def test_zoo_defaults_to_the_short_recipe_and_reproduce_to_the_reference_one() -> None:
    parser = cli._parser()

    assert parser.parse_args(["zoo"]).recipe == "short"
    assert parser.parse_args(["reproduce"]).recipe == "reference"

"""The reproduce command on a tiny grid: its results file and table; weight decay in the recipe."""

import json
from pathlib import Path

import pytest
import torch

from exactflow import cli
from exactflow.models import build
from exactflow.train import RECIPES, Recipe, Trainer


@pytest.fixture(scope="module", name="tiny")
def tiny_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Planar flows on both datasets by the ``long`` recipe cut to 2 epochs, one worker."""
    out = tmp_path_factory.mktemp("reproduce")
    argv = ["reproduce", "--models", "planar", "--seeds", "1", "--epochs", "2", "--jobs", "1"]
    code = cli.main([*argv, "--recipe", "long", "--out", str(out)])

    return out, code


def test_results_hold_the_recipe_and_every_field(tiny: tuple[Path, int]) -> None:
    out, code = tiny
    assert code == 0
    results = json.loads((out / "results.json").read_text())

    assert results["recipe_name"] == "long with --epochs 2"
    assert results["recipe"] == {**RECIPES["long"].as_dict(), "epochs": 2}
    fields = {"entropy", "entropy_se", "gap", "test_nll_median", "outlier_share", "grid_mass"}
    assert {(r["model"], r["dataset"]) for r in results["runs"]} == {
        ("planar", "moons"),
        ("planar", "circles"),
    }
    for run in results["runs"]:
        assert fields <= run.keys()
        assert run["gap"] == pytest.approx(run["test_nll"] - run["entropy"])


def test_table_states_the_recipe(tiny: tuple[Path, int]) -> None:
    out, _ = tiny
    text = (out / "results.md").read_text()

    recipe = "long with --epochs 2 (2 epochs, Adam at 0.001 cosine-annealed to 1e-05, batch 256"
    assert f"Recipe: {recipe}" in text
    assert "weight decay" not in text


def test_the_named_recipes_differ_from_the_reference_only_as_documented() -> None:
    assert RECIPES["reference"] == Recipe()
    assert RECIPES["long"] == Recipe(epochs=2 * Recipe().epochs)
    assert RECIPES["short"] == Recipe(epochs=Recipe().epochs // 5)


def test_weight_decay_shrinks_a_weight_without_gradient(one_thread) -> None:
    """The kept-coordinate rows of a coupling's last layer get no gradient, only the decay."""
    torch.manual_seed(0)
    flow = build("realnvp", 2, blocks=1, hidden=8)
    last = flow.layers[0].nets.shift[4].weight
    recipe = Recipe(lr=0.1, weight_decay=0.5)
    trainer = Trainer(flow, torch.randn(64, 2), recipe, seed=0)
    kept = flow.layers[0].parity
    before = last.detach().clone()

    flow.train()
    trainer.step(trainer.data)
    trainer.step(trainer.data)

    decayed = before * (1 - 0.1 * 0.5) ** 2
    torch.testing.assert_close(last[kept], decayed[kept])
    assert not torch.allclose(last[1 - kept], decayed[1 - kept]), "the free row had a gradient"


def test_an_unknown_recipe_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "never"
    code = cli.main(["reproduce", "--recipe", "fastest", "--out", str(out)])

    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and "fastest" in error and "long" in error, error
    assert not out.exists()

"""The composed flow: normalised densities, sampling, determinism and a short training run."""

import math

import numpy as np
import pytest
import torch

from exactflow.bijections import BatchNormFlow
from exactflow.data import load_split
from exactflow.evaluation import Grid, grid_log_prob, grid_mass
from exactflow.flow import Flow
from exactflow.models import planar, realnvp
from exactflow.train import Recipe, evaluate_nll, fit


@pytest.fixture(scope="module", name="moons")
def moons_fixture() -> np.ndarray:
    return load_split("moons", seed=0).train


@pytest.fixture(scope="module", name="trained_realnvp")
def trained_realnvp_fixture(moons: np.ndarray) -> Flow:
    torch.manual_seed(0)
    flow = realnvp()
    fit(flow, moons, Recipe(epochs=20), seed=0)

    return flow


def test_positive_log_density_is_not_clipped() -> None:
    layer = BatchNormFlow(2).double().eval()
    with torch.no_grad():
        layer.log_gamma.fill_(math.log(10.0))
    flow = Flow([layer], dim=2)

    log_p = flow.log_prob(torch.zeros(2, dtype=torch.float64))

    assert log_p.shape == (), "a single point must give a scalar"
    assert log_p.item() == pytest.approx(2.767283, abs=1e-6)


def test_trained_realnvp_density_integrates_to_one(trained_realnvp: Flow) -> None:
    grid = Grid((-4.0, -4.0), (4.0, 4.0), 400)
    mass = grid_mass(grid_log_prob(trained_realnvp, grid), grid)

    assert mass == pytest.approx(1.0, abs=0.01)


def test_untrained_planar_density_integrates_to_one() -> None:
    torch.manual_seed(0)
    flow = planar(K=8)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.8 * torch.randn(parameter.shape))
    grid = Grid((-9.0, -9.0), (9.0, 9.0), 600)
    log_p = grid_log_prob(flow, grid)
    standard = -0.5 * (grid.points**2).sum(1) - math.log(2 * math.pi)

    assert np.abs(log_p.ravel() - standard).max() > 0.5, "the stack must not be the identity"
    assert grid_mass(log_p, grid) == pytest.approx(1.0, abs=0.01)


def test_short_training_beats_the_standard_gaussian(trained_realnvp: Flow) -> None:
    test = torch.as_tensor(load_split("moons", seed=0).test, dtype=torch.float32)
    nll = evaluate_nll(trained_realnvp, test).mean().item()

    assert nll < 2.84, f"held-out NLL {nll:.4f} is no better than N(0, I)"


def _train_and_sample(seed: int, moons: np.ndarray) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(seed)
    flow = realnvp(blocks=2, hidden=16)
    result = fit(flow, moons[:600], Recipe(epochs=3), seed=seed)

    return result.losses, flow.sample(100, torch.Generator().manual_seed(seed))


def test_same_seed_is_bitwise_identical_and_another_seed_differs(moons: np.ndarray) -> None:
    losses_a, samples_a = _train_and_sample(7, moons)
    losses_b, samples_b = _train_and_sample(7, moons)
    losses_c, samples_c = _train_and_sample(8, moons)

    assert losses_a == losses_b, "same seed, different losses"
    assert torch.equal(samples_a, samples_b), "same seed, different samples"
    assert losses_a != losses_c, "another seed gave the same losses"
    assert not torch.equal(samples_a, samples_c), "another seed gave the same samples"


def test_sampling_follows_dtype_and_leaves_the_model_unchanged() -> None:
    torch.manual_seed(0)
    flow = realnvp(blocks=2, hidden=8).double().train()
    before = {k: v.clone() for k, v in flow.state_dict().items()}

    x = flow.sample(50)

    assert x.dtype == torch.float64 and x.shape == (50, 2)
    assert torch.isfinite(x).all()
    assert flow.training, "sampling changed the train/eval flag"
    for key, value in flow.state_dict().items():
        assert torch.equal(value, before[key]), f"sampling changed {key}"

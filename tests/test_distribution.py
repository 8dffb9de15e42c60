"""The trained flow as a torch.distributions.Distribution in the data's own units."""

import math

import numpy as np
import pytest
import torch

from exactflow.bijections import PlanarFlow
from exactflow.data import Standardizer
from exactflow.distribution import FlowDistribution
from exactflow.flow import Flow
from exactflow.models import build


@pytest.fixture(name="distribution")
def distribution_fixture() -> FlowDistribution:
    torch.manual_seed(0)
    flow = Flow([PlanarFlow(2) for _ in range(4)], dim=2).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.7 * torch.randn(parameter.shape, dtype=torch.float64))
    standardizer = Standardizer(mean=np.array([10.0, -3.0]), std=np.array([4.0, 0.5]))

    return FlowDistribution(flow, standardizer)


def test_log_prob_is_the_flow_density_moved_to_data_units(distribution: FlowDistribution) -> None:
    x = torch.tensor([[9.0, -2.5], [14.0, -3.2]], dtype=torch.float64)
    standardized = (x - torch.tensor([10.0, -3.0])) / torch.tensor([4.0, 0.5])
    expected = distribution.flow.log_prob(standardized) - math.log(4.0 * 0.5)

    torch.testing.assert_close(distribution.log_prob(x), expected)
    assert distribution.log_prob(x[0]).shape == (), "one point gives a scalar"


def test_density_integrates_to_one_in_data_units(distribution: FlowDistribution) -> None:
    xs = np.linspace(10 - 40, 10 + 40, 500)
    ys = np.linspace(-3 - 5, -3 + 5, 500)
    xx, yy = np.meshgrid(xs, ys)
    points = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], 1))
    mass = distribution.log_prob(points).exp().sum().item() * (xs[1] - xs[0]) * (ys[1] - ys[0])

    assert mass == pytest.approx(1.0, abs=0.01)


def test_samples_have_the_requested_shape_and_data_scale(distribution: FlowDistribution) -> None:
    torch.manual_seed(1)
    x = distribution.sample((3, 4000))

    assert x.shape == (3, 4000, 2)
    assert not x.requires_grad
    assert abs(x[..., 0].mean().item() - 10.0) < 4.0, "samples are not in the data's units"


def test_rsample_is_differentiable_in_the_flow_weights(distribution: FlowDistribution) -> None:
    x = distribution.rsample((64,))
    x.square().sum().backward()

    for name, parameter in distribution.flow.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_values_of_the_wrong_width_are_refused() -> None:
    density = FlowDistribution(build("realnvp", 2))
    for value in (torch.zeros(5, 3), torch.zeros(3), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="expected values with 2 coordinates"):
            density.log_prob(value)

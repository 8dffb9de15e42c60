"""Every layer against its contract: round trip, exact log-det, inverse log-det, gradients."""

import math

import pytest
import torch
from torch import nn

from exactflow.bijections import AffineCouplingLayer, BatchNormFlow, Bijection, PlanarFlow
from exactflow.models import planar, realnvp


def _perturb(layer: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Move every parameter and buffer away from its initial (possibly identity) value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        if isinstance(layer, BatchNormFlow):
            layer.running_mean.copy_(torch.randn(layer.dim, generator=generator))
            layer.running_var.copy_(0.5 + torch.rand(layer.dim, generator=generator))

    return layer


LAYERS = {
    "planar-2d": lambda: PlanarFlow(2),
    "planar-3d": lambda: PlanarFlow(3),
    "coupling-even-2d": lambda: AffineCouplingLayer(2, parity=0),
    "coupling-odd-2d": lambda: AffineCouplingLayer(2, parity=1),
    "coupling-even-3d": lambda: AffineCouplingLayer(3, parity=0),
    "coupling-odd-5d": lambda: AffineCouplingLayer(5, parity=1, hidden=16),
    "batchnorm-eval-2d": lambda: BatchNormFlow(2).eval(),
    "batchnorm-eval-3d": lambda: BatchNormFlow(3).eval(),
}


@pytest.fixture(params=sorted(LAYERS), name="layer")
def layer_fixture(request: pytest.FixtureRequest) -> Bijection:
    torch.manual_seed(0)
    return _perturb(LAYERS[request.param](), seed=1)


def _inputs(dim: int, n: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return 1.5 * torch.randn(n, dim, generator=torch.Generator().manual_seed(2), dtype=dtype)


def test_round_trip(layer: Bijection) -> None:
    x = _inputs(layer.dim)
    z, _ = layer(x)
    back, _ = layer.inverse(z)

    assert not torch.allclose(z, x, atol=1e-3), "the layer must not be the identity here"
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5, msg="inverse(forward(x)) != x")


def test_log_det_matches_autograd_jacobian(layer: Bijection) -> None:
    layer = layer.double()
    x = _inputs(layer.dim, n=16, dtype=torch.float64)
    _, log_det = layer(x)

    expected = []
    for point in x:
        jacobian = torch.autograd.functional.jacobian(lambda p: layer(p.unsqueeze(0))[0][0], point)
        expected.append(torch.linalg.slogdet(jacobian).logabsdet)
    expected = torch.stack(expected)

    assert expected.abs().max() > 1e-3, "the log-det must not be zero here"
    torch.testing.assert_close(log_det, expected, atol=1e-10, rtol=1e-10, msg="log-det")


def test_inverse_log_det_is_negative_of_forward(layer: Bijection) -> None:
    layer = layer.double()
    x = _inputs(layer.dim, dtype=torch.float64)
    z, forward_log_det = layer(x)
    _, inverse_log_det = layer.inverse(z)

    torch.testing.assert_close(inverse_log_det, -forward_log_det, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradients_reach_every_parameter(layer: Bijection, direction: str) -> None:
    x = _inputs(layer.dim)
    out, log_det = layer(x) if direction == "forward" else layer.inverse(x)
    (out.square().sum() + log_det.sum()).backward()

    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, f"no gradient reaches {name}"
        assert parameter.grad.abs().sum() > 0, f"the gradient of {name} is zero"


def test_repr_shows_shape_settings() -> None:
    assert "mask=[0, 1, 0]" in repr(AffineCouplingLayer(3, parity=1))
    assert "dim=2" in repr(PlanarFlow(2))


def test_batchnorm_training_mode_round_trip_uses_batch_statistics() -> None:
    layer = _perturb(BatchNormFlow(2), seed=3).train()
    x = _inputs(2) * torch.tensor([3.0, 0.5]) + 2.0
    z, log_det = layer(x)
    back, inverse_log_det = layer.inverse(z)

    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inverse_log_det, -log_det)
    expected = (layer.log_gamma - 0.5 * torch.log(x.var(0, unbiased=False) + layer.eps)).sum()
    torch.testing.assert_close(log_det, expected.expand(len(x)))


def test_batchnorm_running_statistics_use_the_batch_variance() -> None:
    layer = BatchNormFlow(2, momentum=0.25).train()
    x = torch.tensor([[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]])
    layer(x)

    # Batch mean (2, 3), biased batch variance (8/3, 8/3); running starts at (0, 0) and (1, 1).
    torch.testing.assert_close(layer.running_mean, torch.tensor([0.5, 0.75]))
    torch.testing.assert_close(layer.running_var, torch.tensor([0.75 + 2 / 3, 0.75 + 2 / 3]))


def test_batchnorm_rejects_a_batch_of_one_in_training_mode() -> None:
    with pytest.raises(ValueError, match="at least 2 points"):
        BatchNormFlow(2).train()(torch.zeros(1, 2))


def test_batchnorm_eval_case_computed_by_hand() -> None:
    layer = BatchNormFlow(2).double().eval()
    with torch.no_grad():
        layer.log_gamma.fill_(math.log(2.0))
        layer.beta.fill_(1.0)
    x = torch.tensor([[0.5, -0.2]], dtype=torch.float64)
    y, log_det = layer(x)
    back, inverse_log_det = layer.inverse(y)

    torch.testing.assert_close(
        y, torch.tensor([[1.999995, 0.600002]], dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert log_det.item() == pytest.approx(2 * math.log(2) - math.log(1.00001), abs=1e-9)
    assert log_det.item() == pytest.approx(1.386284, abs=1e-6)
    torch.testing.assert_close(back, x)
    assert inverse_log_det.item() == pytest.approx(-1.386284, abs=1e-6)


def test_planar_case_computed_by_hand() -> None:
    layer = PlanarFlow(2).double()
    with torch.no_grad():
        layer.w.copy_(torch.tensor([1.0, 0.0]))
        layer.u.copy_(torch.tensor([1.0, 0.0]))
        layer.b.zero_()
    x = torch.tensor([[0.5, -0.2]], dtype=torch.float64)
    z, log_det = layer(x)
    back, _ = layer.inverse(z)

    torch.testing.assert_close(
        layer.u_hat(), torch.tensor([0.313262, 0.0], dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        z, torch.tensor([[0.644764, -0.2]], dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert log_det.item() == pytest.approx(0.220230, abs=1e-6)
    torch.testing.assert_close(back, x, atol=1e-6, rtol=0)


def test_planar_inverse_holds_near_the_invertibility_limit() -> None:
    layer = PlanarFlow(2).double()
    with torch.no_grad():
        layer.w.copy_(torch.tensor([3.0, -1.0]))
        layer.u.copy_(torch.tensor([-20.0, 5.0]))  # w^T u_hat close to -1: nearly flat
        layer.b.fill_(0.3)
    x = 4 * torch.randn(500, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z, _ = layer(x)
    back, _ = layer.inverse(z)

    assert (layer.w @ layer.u_hat()).item() < -0.99
    torch.testing.assert_close(back, x, atol=1e-8, rtol=0)


def test_coupling_rejects_dimension_one() -> None:
    with pytest.raises(ValueError, match="dim >= 2"):
        AffineCouplingLayer(1, parity=0)


def test_odd_dimension_couplings_transform_every_coordinate() -> None:
    torch.manual_seed(0)
    even, odd = AffineCouplingLayer(3, parity=0), AffineCouplingLayer(3, parity=1)
    x = _inputs(3)
    moved_by_even = (even(x)[0] - x).abs().amax(0) > 1e-4
    moved_by_odd = (odd(x)[0] - x).abs().amax(0) > 1e-4

    assert not (moved_by_even & moved_by_odd).any(), "the masks must be complementary"
    assert (moved_by_even | moved_by_odd).all(), "every coordinate must be transformed"


def test_reference_parameter_counts() -> None:
    count = lambda flow: sum(p.numel() for p in flow.parameters())  # noqa: E731

    assert count(realnvp()) == 71_744
    assert count(planar()) == 160

"""Every layer against its contract: round trip, exact log-det, inverse log-det, gradients."""

import io
import math

import pytest
import torch
from torch import nn

from exactflow.bijections import (
    ActNorm,
    AdditiveCoupling,
    AffineCouplingLayer,
    BatchNormFlow,
    Bijection,
    DiagonalScaling,
    InverseAutoregressive,
    LULinear,
    MaskedAutoregressive,
    Permutation,
    PlanarFlow,
    RadialFlow,
    RationalQuadraticCoupling,
)
from exactflow.made import MADE
from exactflow.models import MODELS, build, count_parameters, planar, realnvp


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


def _initialized_actnorm(dim: int) -> ActNorm:
    """An ActNorm initialised on a shifted, stretched batch, so it is not the identity."""
    layer = ActNorm(dim)
    layer(3.0 * torch.randn(256, dim, generator=torch.Generator().manual_seed(7)) + 1.0)

    return layer


# The autoregressive and spline layers use narrow networks here: _perturb adds 0.5 N(0, 1) to
# every weight, which in a 64-wide net saturates the scales and softmaxes, giving slopes near
# e^-14 where no float32 inverse can recover x to 1e-5. Narrow nets, and for the spline fewer
# bins with larger minimum sizes and derivatives, keep the perturbed maps well-conditioned yet
# far from the identity. test_spline_with_default_settings_is_exact_in_float64 covers defaults.
SPLINE = {"bins": 4, "hidden": 8, "min_width": 0.1, "min_height": 0.1, "min_derivative": 0.2}

LAYERS = {
    "planar-2d": lambda: PlanarFlow(2),
    "planar-3d": lambda: PlanarFlow(3),
    "coupling-even-2d": lambda: AffineCouplingLayer(2, parity=0),
    "coupling-odd-2d": lambda: AffineCouplingLayer(2, parity=1),
    "coupling-even-3d": lambda: AffineCouplingLayer(3, parity=0),
    "coupling-odd-5d": lambda: AffineCouplingLayer(5, parity=1, hidden=16),
    "batchnorm-eval-2d": lambda: BatchNormFlow(2).eval(),
    "batchnorm-eval-3d": lambda: BatchNormFlow(3).eval(),
    "radial-1d": lambda: RadialFlow(1),
    "radial-2d": lambda: RadialFlow(2),
    "radial-3d": lambda: RadialFlow(3),
    "additive-even-2d": lambda: AdditiveCoupling(2, parity=0, hidden=16),
    "additive-odd-3d": lambda: AdditiveCoupling(3, parity=1, hidden=16),
    "diagonal-scaling-3d": lambda: DiagonalScaling(3),
    "actnorm-2d": lambda: _initialized_actnorm(2),
    "actnorm-3d": lambda: _initialized_actnorm(3),
    "lu-linear-2d": lambda: LULinear(2),
    "lu-linear-4d": lambda: LULinear(4),
    "reverse-3d": lambda: Permutation.reverse(3),
    "maf-2d": lambda: MaskedAutoregressive(2, hidden=8),
    "maf-3d": lambda: MaskedAutoregressive(3, hidden=8),
    "iaf-2d": lambda: InverseAutoregressive(2, hidden=8),
    "iaf-3d": lambda: InverseAutoregressive(3, hidden=8),
    "spline-even-2d": lambda: RationalQuadraticCoupling(2, parity=0, **SPLINE),
    "spline-odd-3d": lambda: RationalQuadraticCoupling(3, parity=1, **SPLINE),
}

# Layers whose log-det is exactly 0 by design: the shared log-det test, which requires a
# non-zero log-det so that it can fail, is replaced for them by
# test_volume_preserving_layers_have_zero_log_det.
VOLUME_PRESERVING = {"additive-even-2d", "additive-odd-3d", "reverse-3d"}

# Layers that use batch statistics in training mode, so their two modes legitimately differ.
BATCH_STATISTICS = {"batchnorm-eval-2d", "batchnorm-eval-3d"}

# Shared tests that cannot apply to some layers: the layers, and why (with the replacement).
NOT_APPLICABLE = {
    "test_log_det_matches_autograd_jacobian": (
        VOLUME_PRESERVING,
        "log-det is 0 by design; see test_volume_preserving_layers_have_zero_log_det",
    ),
    "test_gradients_reach_every_parameter": ({"reverse-3d"}, "the layer has no parameters"),
}


def _make(name: str) -> Bijection:
    torch.manual_seed(0)
    return _perturb(LAYERS[name](), seed=1)


@pytest.fixture(params=sorted(LAYERS), name="layer")
def layer_fixture(request: pytest.FixtureRequest) -> Bijection:
    names, reason = NOT_APPLICABLE.get(request.function.__name__, (set(), ""))
    if request.param in names:
        pytest.skip(reason)
    return _make(request.param)


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


def test_zoo_builders_have_their_documented_sizes_and_spline_bound() -> None:
    documented = {"radial": 128, "nice": 17_930, "glow": 71_776, "maf": 23_060, "nsf": 35_106}
    for name, parameters in documented.items():
        assert count_parameters(build(name)) == parameters, name
    couplings = [layer for layer in build("nsf").layers if hasattr(layer, "bound")]
    assert len(couplings) == 6 and all(layer.bound == 5.0 for layer in couplings)


def _jacobian(layer: Bijection, point: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(lambda p: layer(p.unsqueeze(0))[0][0], point)


@pytest.mark.parametrize("name", sorted(VOLUME_PRESERVING))
def test_volume_preserving_layers_have_zero_log_det(name: str) -> None:
    layer = _make(name).double()
    x = _inputs(layer.dim, n=16, dtype=torch.float64)
    z, log_det = layer(x)
    _, inverse_log_det = layer.inverse(z)

    assert torch.equal(log_det, torch.zeros_like(log_det)), "forward log-det must be exactly 0"
    assert torch.equal(inverse_log_det, torch.zeros_like(log_det)), "inverse log-det must be 0"
    for point in x:
        jacobian = _jacobian(layer, point)
        assert not torch.allclose(jacobian, torch.eye(layer.dim, dtype=torch.float64)), (
            "the Jacobian must not be the identity here"
        )
        assert torch.linalg.slogdet(jacobian).logabsdet.abs() < 1e-10, "|det J| must be 1"


@pytest.mark.parametrize("name", sorted(set(LAYERS) - BATCH_STATISTICS))
def test_train_and_eval_modes_agree(name: str) -> None:
    layer = _make(name)
    x = _inputs(layer.dim)
    train = (*layer.train()(x), *layer.inverse(x))
    evaluation = (*layer.eval()(x), *layer.inverse(x))

    for a, b in zip(train, evaluation, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg="train and eval outputs differ")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_state_dict_round_trip_into_a_fresh_instance(name: str) -> None:
    layer = _make(name)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    torch.manual_seed(123)
    fresh = LAYERS[name]()
    x = _inputs(layer.dim)
    if any(p.numel() for p in layer.parameters()):
        assert not torch.allclose(fresh(x)[0], layer(x)[0]), "the fresh layer must differ at first"

    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))

    for direction in ("forward", "inverse"):
        expected = layer(x) if direction == "forward" else layer.inverse(x)
        loaded = fresh(x) if direction == "forward" else fresh.inverse(x)
        torch.testing.assert_close(loaded, expected, rtol=0, atol=0, msg=f"{direction} differs")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_repr_shows_the_dimension(name: str) -> None:
    layer = LAYERS[name]()

    assert f"dim={layer.dim}" in repr(layer)


def test_repr_of_the_new_layers_shows_their_settings() -> None:
    assert "mask=[1, 0]" in repr(AdditiveCoupling(2, parity=0))
    assert "mask=[0, 1, 0], bins=8, bound=3.0" in repr(RationalQuadraticCoupling(3, parity=1))
    assert "order=[2, 1, 0]" in repr(Permutation.reverse(3))
    assert "max_log_scale=3.0" in repr(MaskedAutoregressive(2))
    assert "MADE" in repr(InverseAutoregressive(2))
    assert "initialized=False" in repr(ActNorm(2))
    assert "initialized=True" in repr(_initialized_actnorm(2))


def test_radial_case_computed_by_hand() -> None:
    layer = RadialFlow(2).double()
    with torch.no_grad():
        layer.z0.zero_()
        layer.alpha_tilde.fill_(math.log(math.e - 1.0))  # alpha = 1
        layer.beta_tilde.fill_(math.log(math.e**2 - 1.0))  # alpha + beta = 2, so beta = 1
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # r = 5, h = 1/6
    z, log_det = layer(x)
    back, inverse_log_det = layer.inverse(z)

    torch.testing.assert_close(z, x * 7 / 6)
    # (d - 1) log(1 + beta h) + log(1 + beta h + beta h' r) = log(7/6) + log(1 + 1/36).
    assert log_det.item() == pytest.approx(math.log(7 / 6) + math.log(37 / 36), abs=1e-12)
    torch.testing.assert_close(back, x)
    assert inverse_log_det.item() == pytest.approx(-log_det.item(), abs=1e-12)


def test_radial_inverse_holds_near_the_invertibility_limit() -> None:
    layer = RadialFlow(3).double()
    with torch.no_grad():
        layer.alpha_tilde.fill_(1.0)
        layer.beta_tilde.fill_(-12.0)  # alpha + beta = softplus(-12) ~ 6e-6: nearly flat at z0
    x = layer.z0.detach() + 4 * torch.randn(
        500, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    x[0] = layer.z0.detach()
    z, log_det = layer(x)
    back, inverse_log_det = layer.inverse(z)

    assert torch.isfinite(log_det).all() and log_det.min() < -10, "the map must be nearly flat"
    torch.testing.assert_close(back, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(inverse_log_det, -log_det)


def test_actnorm_initialises_from_its_first_training_batch() -> None:
    layer = ActNorm(2)
    x = _inputs(2) * torch.tensor([3.0, 0.5]) + 2.0
    y, _ = layer(x)

    assert bool(layer.initialized), "the first training batch must initialise the layer"
    torch.testing.assert_close(y.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)

    before = [p.detach().clone() for p in layer.parameters()]
    layer(_inputs(2, n=32) - 5.0)
    for old, new in zip(before, layer.parameters(), strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0, msg="a later batch re-initialised")


def test_actnorm_evaluation_and_inverse_do_not_initialise() -> None:
    layer = ActNorm(2)
    x = _inputs(2) + 3.0
    back, _ = layer.inverse(x)
    y, log_det = layer.eval()(x)

    assert not bool(layer.initialized)
    torch.testing.assert_close(back, x, rtol=0, atol=0)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert torch.equal(log_det, torch.zeros(len(x)))


def test_actnorm_loaded_state_is_not_initialised_again() -> None:
    trained = _perturb(_initialized_actnorm(2), seed=3)
    fresh = ActNorm(2).train()
    fresh.load_state_dict(trained.state_dict())
    x = _inputs(2) - 4.0
    expected, _ = trained(x)
    loaded, _ = fresh(x)

    torch.testing.assert_close(
        loaded, expected, rtol=0, atol=0, msg="the loaded layer re-initialised"
    )


def test_actnorm_rejects_a_first_batch_of_one() -> None:
    with pytest.raises(ValueError, match="at least 2 points"):
        ActNorm(2)(torch.zeros(1, 2))


def test_lu_linear_starts_as_a_rotation_with_only_free_entries_as_parameters() -> None:
    torch.manual_seed(0)
    layer = LULinear(4).double()
    weight = layer.weight()

    torch.testing.assert_close(
        weight @ weight.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert sum(p.numel() for p in layer.parameters()) == 6 + 6 + 4
    assert set(layer.state_dict()) >= {"permutation", "sign"}, "P and the signs must be saved"


def test_made_outputs_depend_only_on_earlier_coordinates() -> None:
    torch.manual_seed(0)
    net = _perturb(MADE(4, outputs=2, hidden=8), seed=1).double()
    point = torch.randn(4, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda p: net(p.unsqueeze(0))[0], point)

    # jacobian[o, i, j] = d output (o, i) / d x_j must vanish for j >= i and not below.
    later = torch.ones(4, 4).triu().bool()
    assert torch.equal(jacobian[:, later], torch.zeros_like(jacobian[:, later]))
    assert (jacobian[:, ~later].abs() > 0).all(), "each output must read every earlier input"


@pytest.mark.parametrize("name", ["maf-3d", "iaf-3d"])
def test_autoregressive_jacobians_are_lower_triangular(name: str) -> None:
    layer = _make(name).double()
    jacobian = _jacobian(layer, _inputs(3, n=1, dtype=torch.float64)[0])

    assert torch.equal(jacobian.triu(1), torch.zeros_like(jacobian))
    assert (jacobian.tril(-1).abs() > 0).sum() == 3, "below the diagonal must be dense"


@pytest.mark.parametrize("build_layer", [lambda: MADE(1, outputs=2), lambda: LULinear(0)])
def test_layers_reject_too_small_dimensions(build_layer: object) -> None:
    with pytest.raises(ValueError, match="dim >= "):
        build_layer()


def test_spline_starts_as_the_identity() -> None:
    torch.manual_seed(0)
    layer = RationalQuadraticCoupling(3, parity=0)
    x = _inputs(3)
    z, log_det = layer(x)

    torch.testing.assert_close(z, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(log_det, torch.zeros(len(x)), atol=1e-6, rtol=0)


def test_spline_with_default_settings_is_exact_in_float64() -> None:
    torch.manual_seed(0)
    layer = _perturb(RationalQuadraticCoupling(3, parity=0), seed=1).double()
    x = _inputs(3, n=16, dtype=torch.float64)
    z, log_det = layer(x)
    back, inverse_log_det = layer.inverse(z)
    expected = torch.stack([torch.linalg.slogdet(_jacobian(layer, p)).logabsdet for p in x])

    assert log_det.min() < -5, "the perturbed default spline must be far from the identity"
    torch.testing.assert_close(back, x, atol=1e-9, rtol=0, msg="round trip")
    torch.testing.assert_close(inverse_log_det, -log_det, atol=1e-9, rtol=0)
    torch.testing.assert_close(log_det, expected, atol=1e-9, rtol=1e-9, msg="log-det")


EDGES = [3.0, -3.0, 3.0 + 1e-6, 3.0 - 1e-6, -3.0 + 1e-6, -3.0 - 1e-6, 100.0, -100.0]


@pytest.mark.parametrize("value", EDGES)
def test_spline_at_and_beyond_the_interval_edges(value: float) -> None:
    layer = _make("spline-odd-3d").double()  # mask [0, 1, 0]: coordinates 0 and 2 move
    assert layer.bound == 3.0
    x = torch.tensor([[value, 0.3, -0.5], [0.2, value, value]], dtype=torch.float64)
    z, log_det = layer(x)
    back, inverse_log_det = layer.inverse(z)

    assert torch.isfinite(z).all() and torch.isfinite(log_det).all(), "outputs must be finite"
    torch.testing.assert_close(back, x, atol=1e-10, rtol=1e-12, msg="round trip")
    torch.testing.assert_close(inverse_log_det, -log_det, atol=1e-10, rtol=0)
    expected = torch.stack([torch.linalg.slogdet(_jacobian(layer, p)).logabsdet for p in x])
    torch.testing.assert_close(log_det, expected, atol=1e-10, rtol=1e-10, msg="log-det")
    if abs(value) > 3.0:
        assert z[0, 0] == value and z[1, 2] == value, "the tails must be the identity"
    if abs(value) == pytest.approx(3.0, abs=1e-5):
        assert abs(z[0, 0] - value) < 1e-5, "the spline must meet the tails at the edges"
        slope = _jacobian(layer, x[0])[0, 0]
        assert slope.item() == pytest.approx(1.0, abs=1e-4), "the slope must be 1 at the edges"

    x32 = x.float()
    z32, log_det32 = layer.float()(x32)
    back32, _ = layer.inverse(z32)
    assert torch.isfinite(z32).all() and torch.isfinite(log_det32).all(), "float32 finite"
    torch.testing.assert_close(back32, x32, atol=1e-5, rtol=1e-5, msg="float32 round trip")


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_round_trips(name: str, dim: int) -> None:
    torch.manual_seed(0)
    flow = build(name, dim)
    x = _inputs(dim, n=32)
    z, log_det = flow(x)
    back, inverse_log_det = flow.inverse(z)

    assert count_parameters(flow) > 0
    assert torch.isfinite(log_det).all()
    torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4, msg="inverse(forward(x)) != x")
    torch.testing.assert_close(inverse_log_det, -log_det, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_single_coordinate_models_build_and_round_trip(name: str) -> None:
    torch.manual_seed(0)
    flow = build(name, 1)
    x = _inputs(1, n=32)
    back, _ = flow.inverse(flow(x)[0])

    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["realnvp", "nice", "glow", "maf", "nsf"])
def test_models_that_need_two_coordinates_say_so(name: str) -> None:
    with pytest.raises(ValueError, match="dim >= 2"):
        build(name, 1)

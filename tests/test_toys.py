"""The toy densities: generators, exact log-densities, their normalization and entropy."""

import warnings

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import multivariate_normal

from exactflow import data, toys, truth


@pytest.fixture(scope="module", name="stats")
def stats_fixture() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The standardization the experiments fit: mean and std of a 4,000-point training set."""
    splits = {name: data.load_split(name, 0) for name in toys.EXACT}

    return {name: (s.standardizer.mean, s.standardizer.std) for name, s in splits.items()}


def midpoints(low: float, high: float, step: float) -> np.ndarray:
    return np.arange(low + step / 2, high, step)


def plane(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


@pytest.mark.parametrize("name", toys.TOYS)
def test_generator_shape_determinism_and_seed(name: str) -> None:
    first = toys.sample(name, 500, 3)
    again = toys.sample(name, 500, 3)
    other = toys.sample(name, 500, 4)

    assert first.shape == (500, 2) and first.dtype == np.float64, f"{name}: {first.shape}"
    assert np.all(np.isfinite(first)), f"{name}: non-finite points"
    np.testing.assert_array_equal(first, again, err_msg=f"{name}: same seed, other points")
    assert not np.allclose(first, other), f"{name}: seeds 3 and 4 give the same points"
    assert toys.sample(name, 0, 3).shape == (0, 2), f"{name}: empty draw has the wrong shape"
    np.testing.assert_array_equal(data.generate(name, 500, 3), first, err_msg="data.generate")


def test_names_reach_data_and_truth() -> None:
    assert data.DATASETS == ("moons", "circles", *toys.TOYS)
    assert truth.DATASETS == ("moons", "circles", "8gaussians", "checkerboard", "rings")
    with pytest.raises(ValueError, match="unknown toy 'nope'; valid toys: 8gaussians"):
        toys.sample("nope", 1, 0)
    with pytest.raises(data.DataError, match="valid datasets: moons, circles, 8gaussians"):
        data.generate("nope", 1, 0)


@pytest.mark.parametrize("name", ["pinwheel", "2spirals", "swissroll"])
def test_toys_without_a_density_say_so(name: str) -> None:
    zeros, ones = np.zeros(2), np.ones(2)

    with pytest.raises(toys.NoExactDensity, match=f"no exact density.*{name}.*rings"):
        toys.log_density(name, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="valid names: moons, circles, 8gaussians, checkerboard"):
        truth.log_density(name, np.zeros((1, 2)), zeros, ones)
    with pytest.raises(ValueError, match="no exact density"):
        truth.entropy(name, zeros, ones, n=10)


@pytest.mark.parametrize(
    ("name", "half_width", "step"), [("8gaussians", 3.5, 0.02), ("rings", 3.0, 0.01)]
)
def test_smooth_density_integrates_to_one(
    name: str, half_width: float, step: float, stats: dict
) -> None:
    # The midpoint rule is spectrally accurate for these Gaussian-smooth densities; the grid
    # reaches past 6 noise widths beyond the outermost component.
    mean, std = stats[name]
    axis = midpoints(-half_width, half_width, step)

    mass = np.exp(truth.log_density(name, plane(axis, axis), mean, std)).sum() * step**2

    assert mass == pytest.approx(1.0, abs=1e-6), f"{name}: total mass {mass}"


def test_checkerboard_integrates_to_one_on_a_grid_aligned_with_its_squares(stats: dict) -> None:
    # Cells that tile each square exactly hold a constant density, so the midpoint rule is
    # exact up to rounding.
    mean, std = stats["checkerboard"]
    per_side = 50
    axes = []
    for d in range(2):
        edges = (np.array([-3.0, 3.0]) - mean[d]) / std[d]
        step = (toys.CHECKERBOARD_SIDE / std[d]) / per_side
        axes.append(midpoints(edges[0], edges[1] - step / 4, step))
    cell = (toys.CHECKERBOARD_SIDE / std[0] / per_side) * (
        toys.CHECKERBOARD_SIDE / std[1] / per_side
    )

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_p = truth.log_density("checkerboard", plane(*axes), mean, std)
    mass = np.exp(log_p).sum() * cell

    white_or_outside = log_p.size - 8 * per_side**2
    assert np.isneginf(log_p).sum() == white_or_outside, "white and outer cells are not −inf"
    assert mass == pytest.approx(1.0, abs=1e-9), f"aligned-grid mass {mass}"


def test_checkerboard_on_an_unaligned_grid_is_within_the_edge_bound(stats: dict) -> None:
    # On a grid that ignores the edges, the count of midpoints in an interval of length L is
    # within one of L/h, so a square of sides a × b gets mass within p·(h_x·b + h_y·a + h_x·h_y)
    # of its own. Summed over the 8 squares, with p = 1/(8ab), the bound is
    # h_x/a + h_y/b + h_x·h_y/(ab): 0.0095 at h = 0.004 in standardized units.
    mean, std = stats["checkerboard"]
    step = 0.004
    axis = midpoints(-2.5, 2.5, step)
    a, b = toys.CHECKERBOARD_SIDE / std

    mass = np.exp(truth.log_density("checkerboard", plane(axis, axis), mean, std)).sum() * step**2

    bound = step / a + step / b + step**2 / (a * b)
    assert bound < 0.01
    assert abs(mass - 1.0) <= bound, f"unaligned-grid mass {mass}, bound {bound}"


@pytest.mark.parametrize("name", toys.EXACT)
def test_fresh_sample_nll_matches_entropy(name: str, stats: dict) -> None:
    mean, std = stats[name]
    n = 20_000
    fresh = (data.generate(name, n, 7) - mean) / std

    log_p = truth.log_density(name, fresh, mean, std)
    value, error = truth.entropy(name, mean, std)

    assert np.all(np.isfinite(log_p)), f"{name}: a sample point has log-density {log_p.min()}"
    tolerance = 4 * np.hypot(error, log_p.std(ddof=1) / np.sqrt(n)) + 1e-12
    assert abs(-log_p.mean() - value) <= tolerance, f"{name}: {-log_p.mean()} vs {value}"


def test_eight_gaussians_matches_scipy_mixture() -> None:
    angles = np.arange(8) * np.pi / 4
    centers = 2.0 * np.column_stack([np.cos(angles), np.sin(angles)])
    x = np.array([[2.0, 0.0], [0.0, 0.0], [1.2, 1.5], [-1.9, -0.3], [4.0, -4.0]])

    expected = np.mean(
        [multivariate_normal(c, 0.25**2 * np.eye(2)).pdf(x) for c in centers], axis=0
    )

    np.testing.assert_allclose(np.exp(toys.log_density("8gaussians", x)), expected, rtol=1e-12)


def test_rings_match_quadrature_over_the_angle() -> None:
    sigma = 0.06
    x = np.array([[0.5, 0.0], [0.0, 0.75], [1.05, -1.05], [0.0, 0.0], [2.3, 0.4]])

    def ring(point: np.ndarray, radius: float) -> float:
        def integrand(theta: float) -> float:
            offset = point - radius * np.array([np.cos(theta), np.sin(theta)])
            return np.exp(-offset @ offset / (2 * sigma**2))

        value, _ = quad(integrand, 0.0, 2 * np.pi, epsabs=0.0, epsrel=1e-12, limit=400)
        return value / (2 * np.pi) / (2 * np.pi * sigma**2)

    expected = [np.mean([ring(p, r) for r in (0.5, 1.0, 1.5, 2.0)]) for p in x]

    np.testing.assert_allclose(np.exp(toys.log_density("rings", x)), expected, rtol=1e-9)


def test_checkerboard_closed_form(stats: dict) -> None:
    black = [[0.5, 0.5], [-1.5, -1.5], [1.9, -0.1], [-0.5, 1.5], [0.0, 0.0]]
    white = [[0.5, -0.5], [-1.5, 1.5], [1.0, 0.0], [-0.01, 0.5]]
    outside = [[2.0, 0.5], [-2.01, -1.5], [0.5, 7.0]]
    mean, std = stats["checkerboard"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_p = toys.log_density("checkerboard", np.array(black + white + outside))
    value, error = truth.entropy("checkerboard", mean, std)

    np.testing.assert_allclose(log_p[: len(black)], np.log(1 / 8), rtol=0, atol=1e-15)
    assert np.all(np.isneginf(log_p[len(black) :])), f"off-support log-density {log_p}"
    assert np.isnan(toys.log_density("checkerboard", np.array([[np.nan, 0.5]])))[0]
    assert value == pytest.approx(np.log(8.0) - np.log(std).sum(), abs=1e-12)
    assert error < 1e-12

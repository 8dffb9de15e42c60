"""The exact data density: normalization, quadrature convergence, independent checks, entropy."""

import numpy as np
import pytest
from scipy.integrate import quad
from sklearn.datasets import make_circles, make_moons

from exactflow.truth import entropy, log_density

# The checks below are written for the two arc datasets; tests/test_toys.py checks the toys.
DATASETS = ("moons", "circles")
SIGMA = 0.06

# Each piece: (curve t -> (2,) point, start of t, end of t), straight from scikit-learn's code.
PIECES = {
    "moons": [
        (lambda t: np.array([np.cos(t), np.sin(t)]), 0.0, np.pi),
        (lambda t: np.array([1.0 - np.cos(t), 1.0 - np.sin(t) - 0.5]), 0.0, np.pi),
    ],
    "circles": [
        (lambda t: np.array([np.cos(t), np.sin(t)]), 0.0, 2.0 * np.pi),
        (lambda t: 0.4 * np.array([np.cos(t), np.sin(t)]), 0.0, 2.0 * np.pi),
    ],
}

# Raw points on a curve, just off one, at a center, in an endpoint's shadow and far away.
RAW_POINTS = {
    "moons": [(0.5, 0.75**0.5), (1.0, 0.45), (0.6, 0.2), (-0.3, -0.4), (2.4, 1.1), (0.5, 0.25)],
    "circles": [(0.0, 1.0), (0.3, 0.0), (0.0, 0.0), (0.7, -0.7), (-2.0, 1.5)],
}


def draw(name: str, n: int, seed: int) -> np.ndarray:
    if name == "moons":
        return make_moons(n_samples=n, noise=SIGMA, random_state=seed)[0]

    return make_circles(n_samples=n, noise=SIGMA, factor=0.4, random_state=seed)[0]


@pytest.fixture(scope="module", name="stats")
def stats_fixture() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    samples = {name: draw(name, 4000, 0) for name in DATASETS}

    return {name: (x.mean(0), x.std(0)) for name, x in samples.items()}


def grid(half_width: float, step: float) -> np.ndarray:
    centers = np.arange(-half_width + step / 2, half_width, step)

    return np.stack(np.meshgrid(centers, centers), axis=-1).reshape(-1, 2)


def probe_points(name: str, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    raw = np.array(RAW_POINTS[name])

    return np.vstack([(raw - mean) / std, [[5.0, 5.0], [-5.0, -5.0], [5.0, -5.0]]])


def quad_log_density(name: str, z: np.ndarray) -> float:
    """Raw log-density at one point by adaptive quadrature of each piece's Gaussian integrand."""
    terms = []
    for curve, start, end in PIECES[name]:
        dense = np.linspace(start, end, 20_001)
        squared = np.sum((curve(dense) - z[:, None]) ** 2, axis=0)
        nearest = dense[np.argmin(squared)]
        floor = squared.min()

        def scaled(t: float, curve=curve, floor=floor) -> float:
            return np.exp(-(np.sum((curve(t) - z) ** 2) - floor) / (2 * SIGMA**2))

        breaks = [nearest] if start < nearest < end else None
        value, _ = quad(scaled, start, end, points=breaks, epsabs=0.0, epsrel=1e-13, limit=500)
        terms.append(
            np.log(0.5 / (end - start) * value)
            - floor / (2 * SIGMA**2)
            - np.log(2 * np.pi * SIGMA**2)
        )

    return float(np.logaddexp.reduce(terms))


def grid_entropy(name: str, mean: np.ndarray, std: np.ndarray) -> float:
    step = 0.04
    log_p = log_density(name, grid(4.5, step), mean, std)

    return float(-np.sum(np.exp(log_p) * log_p) * step**2)


@pytest.mark.parametrize("name", DATASETS)
def test_density_integrates_to_one(name: str, stats: dict) -> None:
    mean, std = stats[name]
    step = 0.04

    mass = np.exp(log_density(name, grid(4.5, step), mean, std)).sum() * step**2

    assert mass == pytest.approx(1.0, abs=1e-6), f"{name}: total mass {mass}"


@pytest.mark.parametrize("name", DATASETS)
def test_doubling_the_nodes_leaves_log_density_unchanged(name: str, stats: dict) -> None:
    mean, std = stats[name]
    x = probe_points(name, mean, std)

    default = log_density(name, x, mean, std)
    refined = log_density(name, x, mean, std, nodes=320)

    assert np.all(np.isfinite(default)), f"{name}: non-finite log-density {default}"
    assert np.max(np.abs(refined - default)) < 1e-6


def test_a_coarse_rule_is_detectably_wrong(stats: dict) -> None:
    mean, std = stats["moons"]
    x = probe_points("moons", mean, std)

    coarse = log_density("moons", x, mean, std, nodes=16)

    assert np.max(np.abs(coarse - log_density("moons", x, mean, std))) > 1e-6


@pytest.mark.parametrize("name", DATASETS)
def test_log_density_matches_adaptive_quadrature(name: str, stats: dict) -> None:
    mean, std = stats[name]
    x = probe_points(name, mean, std)

    expected = [quad_log_density(name, mean + std * point) + np.log(std).sum() for point in x]

    np.testing.assert_allclose(log_density(name, x, mean, std), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("name", "pinned"), [("moons", 1.316986), ("circles", 1.899709)])
def test_entropy_agrees_with_grid_integration(name: str, pinned: float, stats: dict) -> None:
    mean, std = stats[name]

    value, error = entropy(name, mean, std)
    exact = grid_entropy(name, mean, std)

    assert error <= 0.002, f"{name}: standard error {error}"
    assert abs(value - exact) < 4 * error, f"{name}: Monte Carlo {value} vs grid {exact}"
    assert exact == pytest.approx(pinned, abs=1e-5), f"{name}: grid entropy moved to {exact}"


@pytest.mark.parametrize("name", DATASETS)
def test_fresh_sample_nll_matches_entropy(name: str, stats: dict) -> None:
    mean, std = stats[name]
    n = 20_000
    fresh = (draw(name, n, 7) - mean) / std

    log_p = log_density(name, fresh, mean, std)
    value, error = entropy(name, mean, std)

    tolerance = 4 * np.hypot(error, log_p.std(ddof=1) / np.sqrt(n))
    assert abs(-log_p.mean() - value) < tolerance


def test_unknown_name_lists_valid_names() -> None:
    zeros, ones = np.zeros(2), np.ones(2)

    with pytest.raises(ValueError, match="moons, circles"):
        log_density("spirals", np.zeros((1, 2)), zeros, ones)
    with pytest.raises(ValueError, match="moons, circles"):
        entropy("spirals", zeros, ones, n=10)

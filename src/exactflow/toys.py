"""The standard 2-D toy densities of the flow literature, and the exact densities of three.

Each generator draws ``n`` raw points of shape ``(n, 2)``, deterministic given ``seed``
through :func:`numpy.random.default_rng`. Every mixture component is drawn independently per
point, so the points are i.i.d. draws of the stated density. The parameters are module
constants and each generator's docstring gives them.

``8gaussians``, ``checkerboard`` and ``rings`` have an exact log-density in raw
coordinates (:func:`log_density`). ``pinwheel``, ``2spirals`` and ``swissroll`` have none
implemented: :func:`log_density` raises :class:`NoExactDensity` for them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import ive, logsumexp

GAUSSIANS = 8
GAUSSIANS_RADIUS = 2.0
GAUSSIANS_SIGMA = 0.25

PINWHEEL_ARMS = 5
PINWHEEL_RADIAL_SIGMA = 0.3
PINWHEEL_TANGENTIAL_SIGMA = 0.1
PINWHEEL_RATE = 0.25
PINWHEEL_SCALE = 2.0

CHECKERBOARD_SQUARES = 4
CHECKERBOARD_SIDE = 1.0

SPIRALS_TURNS = 1.5
SPIRALS_SCALE = 1.0 / 3.0
SPIRALS_SIGMA = 0.1

SWISSROLL_START = 1.5 * np.pi
SWISSROLL_END = 4.5 * np.pi
SWISSROLL_SCALE = 0.2
SWISSROLL_SIGMA = 0.2

RINGS_RADII = (0.5, 1.0, 1.5, 2.0)
RINGS_SIGMA = 0.06


class NoExactDensity(NotImplementedError):
    """Raised for a toy whose exact density is not implemented; names the toys that have one."""


def _rng(n: int, seed: int) -> np.random.Generator:
    if n < 0:
        raise ValueError(f"n must be at least 0, got {n}")

    return np.random.default_rng(seed)


def _gaussian_centers() -> np.ndarray:
    angles = 2.0 * np.pi * np.arange(GAUSSIANS) / GAUSSIANS

    return GAUSSIANS_RADIUS * np.column_stack([np.cos(angles), np.sin(angles)])


def eight_gaussians(n: int, seed: int) -> np.ndarray:
    """Equal mixture of 8 isotropic Gaussians with centres evenly spaced on a circle.

    Parameters: ``GAUSSIANS = 8`` components, centres at angles 2πk/8 on a circle of radius
    ``GAUSSIANS_RADIUS = 2``, each with standard deviation ``GAUSSIANS_SIGMA = 0.25`` per
    coordinate. Exact density: p(x) = (1/8) Σ_k N(x; c_k, σ²I).
    """
    rng = _rng(n, seed)
    component = rng.integers(GAUSSIANS, size=n)
    noise = rng.normal(scale=GAUSSIANS_SIGMA, size=(n, 2))

    return _gaussian_centers()[component] + noise


def pinwheel(n: int, seed: int) -> np.ndarray:
    """Five curved arms: Gaussian blobs bent by a rotation that grows with the radius.

    Parameters: ``PINWHEEL_ARMS = 5`` equally likely arms. For arm k, (a, b) is drawn from
    N((1, 0), diag(0.3², 0.1²)) (``PINWHEEL_RADIAL_SIGMA``, ``PINWHEEL_TANGENTIAL_SIGMA``) and
    rotated by the angle 2πk/5 + 0.25·exp(a) (``PINWHEEL_RATE``), then scaled by
    ``PINWHEEL_SCALE = 2``. No exact density is implemented.
    """
    rng = _rng(n, seed)
    arm = rng.integers(PINWHEEL_ARMS, size=n)
    a = 1.0 + PINWHEEL_RADIAL_SIGMA * rng.standard_normal(n)
    b = PINWHEEL_TANGENTIAL_SIGMA * rng.standard_normal(n)
    angle = 2.0 * np.pi * arm / PINWHEEL_ARMS + PINWHEEL_RATE * np.exp(a)
    cos, sin = np.cos(angle), np.sin(angle)

    return PINWHEEL_SCALE * np.column_stack([cos * a - sin * b, sin * a + cos * b])


def _black_corners() -> np.ndarray:
    """Lower-left corners of the black squares: those whose two indices have an even sum."""
    half = CHECKERBOARD_SQUARES // 2
    i, j = np.meshgrid(np.arange(-half, half), np.arange(-half, half), indexing="ij")
    black = (i + j) % 2 == 0

    return CHECKERBOARD_SIDE * np.column_stack([i[black], j[black]]).astype(np.float64)


def checkerboard(n: int, seed: int) -> np.ndarray:
    """Uniform density on the black squares of a checkerboard centred on the origin.

    Parameters: ``CHECKERBOARD_SQUARES = 4`` squares of side ``CHECKERBOARD_SIDE = 1`` per
    row, covering [-2, 2)²; the square [i, i + 1) × [j, j + 1) is black when i + j is even,
    which gives 8 black squares. Exact density: 1/8 on the black squares (half-open, so each
    edge belongs to one square), 0 elsewhere.
    """
    rng = _rng(n, seed)
    corners = _black_corners()
    square = rng.integers(len(corners), size=n)
    offset = CHECKERBOARD_SIDE * rng.random((n, 2))

    return corners[square] + offset


def two_spirals(n: int, seed: int) -> np.ndarray:
    """Two interleaved spiral arms, one the point reflection of the other, with Gaussian noise.

    Parameters: the arm is t ↦ (−t·cos t, t·sin t) for t = 2π·1.5·√u with u uniform on [0, 1)
    (``SPIRALS_TURNS = 1.5`` turns), each arm equally likely, scaled by
    ``SPIRALS_SCALE = 1/3``, plus isotropic Gaussian noise of standard deviation
    ``SPIRALS_SIGMA = 0.1``. No exact density is implemented.
    """
    rng = _rng(n, seed)
    t = 2.0 * np.pi * SPIRALS_TURNS * np.sqrt(rng.random(n))
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    noise = rng.normal(scale=SPIRALS_SIGMA, size=(n, 2))
    arm = np.column_stack([-t * np.cos(t), t * np.sin(t)])

    return SPIRALS_SCALE * sign[:, None] * arm + noise


def swissroll(n: int, seed: int) -> np.ndarray:
    """The 2-D Swiss roll: a spiral t ↦ (t·cos t, t·sin t) with t uniform, plus Gaussian noise.

    Parameters: t uniform on [1.5π, 4.5π) (``SWISSROLL_START``, ``SWISSROLL_END``), the spiral
    scaled by ``SWISSROLL_SCALE = 0.2``, plus isotropic Gaussian noise of standard deviation
    ``SWISSROLL_SIGMA = 0.2``. No exact density is implemented.
    """
    rng = _rng(n, seed)
    t = rng.uniform(SWISSROLL_START, SWISSROLL_END, size=n)
    noise = rng.normal(scale=SWISSROLL_SIGMA, size=(n, 2))

    return SWISSROLL_SCALE * np.column_stack([t * np.cos(t), t * np.sin(t)]) + noise


def rings(n: int, seed: int) -> np.ndarray:
    """Concentric noisy rings: a point uniform on a circle plus isotropic Gaussian noise.

    Parameters: radii ``RINGS_RADII = (0.5, 1, 1.5, 2)``, each ring equally likely, noise of
    standard deviation ``RINGS_SIGMA = 0.06`` per coordinate (so the radius spreads by about
    σ). Exact density: the equal mixture of (1/2π) ∫ N(x; r·(cos θ, sin θ), σ²I) dθ over the
    radii, in Bessel closed form.
    """
    rng = _rng(n, seed)
    radius = np.asarray(RINGS_RADII)[rng.integers(len(RINGS_RADII), size=n)]
    theta = rng.uniform(0.0, 2.0 * np.pi, size=n)
    noise = rng.normal(scale=RINGS_SIGMA, size=(n, 2))

    return radius[:, None] * np.column_stack([np.cos(theta), np.sin(theta)]) + noise


def _log_eight_gaussians(x: np.ndarray) -> np.ndarray:
    squared = np.sum((x[:, None, :] - _gaussian_centers()[None]) ** 2, axis=2)

    return (
        logsumexp(-squared / (2.0 * GAUSSIANS_SIGMA**2), axis=1)
        - np.log(GAUSSIANS)
        - np.log(2.0 * np.pi * GAUSSIANS_SIGMA**2)
    )


def _log_checkerboard(x: np.ndarray) -> np.ndarray:
    index = np.floor(x / CHECKERBOARD_SIDE)
    half = CHECKERBOARD_SQUARES // 2
    inside = np.all((index >= -half) & (index < half), axis=1)
    black = inside & (np.sum(index, axis=1) % 2 == 0)
    log_p = np.where(black, -np.log(len(_black_corners()) * CHECKERBOARD_SIDE**2), -np.inf)

    return np.where(np.isnan(x).any(axis=1), np.nan, log_p)


def _log_rings(x: np.ndarray) -> np.ndarray:
    # (1/2π) ∫ N(x; r·u(θ), σ²I) dθ = exp(−(ρ − r)²/(2σ²)) · ive(0, rρ/σ²) / (2πσ²), where
    # ive(0, k) = e^{−k} I₀(k) keeps the Bessel factor finite for large rρ/σ².
    rho = np.hypot(x[:, 0], x[:, 1])
    per_ring = [
        -((rho - r) ** 2) / (2.0 * RINGS_SIGMA**2) + np.log(ive(0, r * rho / RINGS_SIGMA**2))
        for r in RINGS_RADII
    ]

    return (
        logsumexp(per_ring, axis=0)
        - np.log(len(RINGS_RADII))
        - np.log(2.0 * np.pi * RINGS_SIGMA**2)
    )


GENERATORS: dict[str, Callable[[int, int], np.ndarray]] = {
    "8gaussians": eight_gaussians,
    "pinwheel": pinwheel,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "swissroll": swissroll,
    "rings": rings,
}
TOYS = tuple(GENERATORS)

_LOG_DENSITIES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "8gaussians": _log_eight_gaussians,
    "checkerboard": _log_checkerboard,
    "rings": _log_rings,
}
#: The toys with an exact log-density.
EXACT = tuple(name for name in TOYS if name in _LOG_DENSITIES)


def sample(name: str, n: int, seed: int) -> np.ndarray:
    """Draw ``n`` raw points of shape ``(n, 2)`` from the toy ``name``.

    Raises:
        ValueError: if ``name`` is not one of ``TOYS`` or ``n`` is negative.
    """
    if name not in GENERATORS:
        raise ValueError(f"unknown toy {name!r}; valid toys: {', '.join(TOYS)}")

    return GENERATORS[name](n, seed)


def log_density(name: str, x: np.ndarray) -> np.ndarray:
    """Exact log-density of the toy ``name`` at raw points ``x`` of shape ``(n, 2)``.

    Points outside the support (the white and outer squares of ``checkerboard``) get −inf,
    without a floating-point warning.

    Raises:
        NoExactDensity: for ``pinwheel``, ``2spirals`` and ``swissroll``, which have none
            implemented.
        ValueError: if ``name`` is not one of ``TOYS`` or ``x`` is not of shape ``(n, 2)``.
    """
    if name not in GENERATORS:
        raise ValueError(f"unknown toy {name!r}; valid toys: {', '.join(TOYS)}")
    if name not in _LOG_DENSITIES:
        raise NoExactDensity(
            f"no exact density is implemented for toy {name!r}; toys with one: {', '.join(EXACT)}"
        )
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (n, 2), got {x.shape}")

    return _LOG_DENSITIES[name](x)

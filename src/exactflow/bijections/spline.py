"""Rational-quadratic spline couplings: neural spline flows (Durkan et al., 2019)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactflow.bijections.base import Bijection, coupling_mask
from exactflow.nets import mlp


def _knots(raw: Tensor, bound: float, minimum: float) -> tuple[Tensor, Tensor]:
    """Return knots ``(..., K + 1)`` from ``-bound`` to ``bound`` and bin sizes ``(..., K)``."""
    bins = raw.shape[-1]
    fractions = minimum + (1.0 - minimum * bins) * torch.softmax(raw, dim=-1)
    inner = 2.0 * bound * torch.cumsum(fractions[..., :-1], dim=-1) - bound

    # The end knots are set exactly, so that the spline meets the identity tails at +-bound.
    ends = inner.new_full((*inner.shape[:-1], 1), bound)
    knots = torch.cat([-ends, inner, ends], dim=-1)

    return knots, knots[..., 1:] - knots[..., :-1]


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """Pick ``values[..., index]`` along the last dimension; ``index`` has shape ``(..., 1)``."""
    return values.gather(-1, index).squeeze(-1)


class RationalQuadraticCoupling(Bijection):
    r"""Spline coupling :math:`y_i = g_i(x_i)` off the mask, :math:`g` read from :math:`x \odot m`.

    Durkan, Bekasov, Murray & Papamakarios (2019), "Neural Spline Flows". Each :math:`g_i` is a
    monotone rational-quadratic spline with :math:`K` bins on :math:`[-B, B]` and the identity
    outside it. In bin :math:`k`, with knots :math:`(x^k, y^k)`, width :math:`w`, height
    :math:`h`, slope :math:`s = h / w`, knot derivatives :math:`\delta^k, \delta^{k+1}` and
    :math:`\xi = (x - x^k) / w \in [0, 1]`,

    .. math::
        g(x) = y^k + \frac{h\,(s \xi^2 + \delta^k \xi (1 - \xi))}
                          {s + (\delta^{k+1} + \delta^k - 2 s)\, \xi (1 - \xi)},

    and :math:`g'(x) = s^2 (\delta^{k+1} \xi^2 + 2 s \xi (1 - \xi) + \delta^k (1 - \xi)^2)`
    divided by the square of that denominator, so
    :math:`\log |\det| = \sum_{i \notin m} \log g_i'(x_i)`. The network gives, per transformed
    coordinate, :math:`K` widths and :math:`K` heights (a softmax, each at least a minimum
    fraction of :math:`2B`) and :math:`K - 1` inner derivatives (a softplus plus a minimum,
    equal to 1 for a zero input); the derivatives at :math:`\pm B` are 1, so the spline joins
    its identity tails with a continuous slope. The last layer of the network starts at zero,
    so the layer starts as the identity. The inverse solves the quadratic for :math:`\xi` in
    the root form :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})`, which does not cancel.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``; at least 2.
        parity: 0 for the even mask ``1, 0, 1, 0, ...``, 1 for its complement.
        bins: the number :math:`K` of bins.
        bound: the half-width :math:`B` of the interval the spline covers.
        hidden: the width of the two hidden layers of the network.
        min_width: the least width of a bin, as a fraction of :math:`2B`.
        min_height: the least height of a bin, as a fraction of :math:`2B`.
        min_derivative: the least derivative at an inner knot.
    """

    def __init__(
        self,
        dim: int,
        parity: int,
        bins: int = 8,
        bound: float = 3.0,
        hidden: int = 64,
        min_width: float = 1e-3,
        min_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__()
        mask = coupling_mask(dim, parity, type(self).__name__)
        if bins < 1 or bound <= 0:
            raise ValueError(f"need bins >= 1 and bound > 0, got bins={bins}, bound={bound}")
        if min_width * bins >= 1 or min_height * bins >= 1 or not 0 < min_derivative < 1:
            raise ValueError(
                f"need min_width * bins < 1, min_height * bins < 1 and 0 < min_derivative < 1, "
                f"got {min_width}, {min_height}, {min_derivative} with bins={bins}"
            )

        self.dim = dim
        self.parity = parity
        self.bins = bins
        self.bound = bound
        self.min_width = min_width
        self.min_height = min_height
        self.min_derivative = min_derivative
        self.register_buffer("mask", mask)
        # The coordinates off the mask, from the parity (not from the mask's values).
        transformed = torch.arange(1 - parity, dim, 2)
        self.register_buffer("transformed", transformed, persistent=False)
        self.net = mlp(dim, hidden, len(self.transformed) * (3 * bins - 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def spline(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Return the knots, bin sizes (x then y) and knot derivatives read from ``x``.

        Shapes ``(n, m, K + 1)``, ``(n, m, K)``, ``(n, m, K + 1)``, ``(n, m, K)`` and
        ``(n, m, K + 1)`` for ``x`` of shape ``(n, d)`` with ``m`` transformed coordinates.
        """
        raw = self.net(x * self.mask).unflatten(-1, (len(self.transformed), 3 * self.bins - 1))
        raw_widths, raw_heights, raw_derivatives = raw.split(
            [self.bins, self.bins, self.bins - 1], dim=-1
        )
        x_knots, widths = _knots(raw_widths, self.bound, self.min_width)
        y_knots, heights = _knots(raw_heights, self.bound, self.min_height)

        # softplus(a + offset) = 1 - min_derivative at a = 0, so a zero net gives derivative 1.
        offset = math.log(math.expm1(1.0 - self.min_derivative))
        inner = self.min_derivative + F.softplus(raw_derivatives + offset)
        derivatives = F.pad(inner, (1, 1), value=1.0)

        return x_knots, widths, y_knots, heights, derivatives

    def _transform(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """Apply the splines, or their inverses, to ``x`` of shape ``(n, d)``."""
        x_knots, widths, y_knots, heights, derivatives = self.spline(x)
        values = x[:, self.transformed]

        # Outside [-B, B] the map is the identity. A point there is replaced by 0 before the
        # spline, so that no branch torch.where discards can produce inf or nan gradients.
        inside = (values >= -self.bound) & (values <= self.bound)
        safe = torch.where(inside, values, torch.zeros_like(values))
        knots = y_knots if inverse else x_knots
        index = torch.searchsorted(knots.contiguous(), safe.unsqueeze(-1), right=True) - 1
        index = index.clamp(0, self.bins - 1)

        x_k, w = _gather(x_knots, index), _gather(widths, index)
        y_k, h = _gather(y_knots, index), _gather(heights, index)
        d_k, d_k1 = _gather(derivatives, index), _gather(derivatives, index + 1)
        s = h / w
        curvature = d_k1 + d_k - 2.0 * s

        if inverse:
            rise = safe - y_k
            a = h * (s - d_k) + rise * curvature
            b = h * d_k - rise * curvature
            c = -s * rise
            xi = 2.0 * c / (-b - torch.sqrt((b.square() - 4.0 * a * c).clamp_min(0.0)))
            out = x_k + xi * w
        else:
            xi = (safe - x_k) / w
            out = y_k + h * (s * xi.square() + d_k * xi * (1.0 - xi)) / (
                s + curvature * xi * (1.0 - xi)
            )

        between = xi * (1.0 - xi)
        log_slope = (
            2.0 * torch.log(s)
            + torch.log(d_k1 * xi.square() + 2.0 * s * between + d_k * (1.0 - xi).square())
            - 2.0 * torch.log(s + curvature * between)
        )
        log_slope = torch.where(inside, log_slope, torch.zeros_like(log_slope)).sum(-1)
        out = x.index_copy(1, self.transformed, torch.where(inside, out, values))

        return out, -log_slope if inverse else log_slope

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the splines to the transformed coordinates of ``x`` of shape ``(n, d)``."""
        return self._transform(x, inverse=False)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the splines for ``z`` of shape ``(n, d)``; kept coordinates stay as they are."""
        return self._transform(z, inverse=True)

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return (
            f"dim={self.dim}, mask={self.mask.int().tolist()}, bins={self.bins}, "
            f"bound={self.bound}"
        )

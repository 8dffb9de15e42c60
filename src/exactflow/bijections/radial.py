"""Radial flows (Rezende & Mohamed, 2015), with a closed-form inverse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactflow.bijections.base import Bijection


class RadialFlow(Bijection):
    r"""Radial flow :math:`z' = z + \beta h(\alpha, r) (z - z_0)`, :math:`h = 1 / (\alpha + r)`.

    Rezende & Mohamed (2015), "Variational Inference with Normalizing Flows". Here
    :math:`r = \lVert z - z_0 \rVert`, :math:`\alpha = \operatorname{softplus}(\tilde\alpha) > 0`
    and :math:`\beta = -\alpha + \operatorname{softplus}(\tilde\beta) > -\alpha`, which makes the
    map invertible. With :math:`h' = -h^2`,
    :math:`\log |\det| = (d - 1) \log(1 + \beta h) + \log(1 + \beta h + \beta h' r)`. Both terms
    are evaluated as logs of sums of positive numbers,
    :math:`1 + \beta h = (\alpha + \beta + r) / (\alpha + r)` and
    :math:`1 + \beta h + \beta h' r = (r (2 \alpha + r) + \alpha (\alpha + \beta))
    / (\alpha + r)^2`, so they stay finite as :math:`\beta` approaches :math:`-\alpha`.

    The map moves a point along its ray from :math:`z_0`, from radius :math:`r` to radius
    :math:`\rho = r (\alpha + \beta + r) / (\alpha + r)`, which increases with :math:`r`. So the
    inverse only has to recover :math:`r` from :math:`\rho`, and that scalar equation is the
    quadratic :math:`r^2 + (\alpha + \beta - \rho) r - \alpha \rho = 0`, whose one non-negative
    root is taken in the cancellation-free form. No iteration is needed, and gradients flow
    through the root exactly.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"RadialFlow needs dim >= 1, got {dim}")

        # alpha_tilde = beta_tilde = 0 gives alpha = softplus(0) = log 2 and beta = 0, the
        # identity; a small perturbation of beta_tilde lets every parameter receive a gradient
        # from the first step (at beta = 0 the map does not depend on z0 or alpha).
        self.dim = dim
        self.z0 = nn.Parameter(torch.randn(dim))
        self.alpha_tilde = nn.Parameter(torch.zeros(1))
        self.beta_tilde = nn.Parameter(0.01 * torch.randn(1))

    def alpha_beta(self) -> tuple[Tensor, Tensor, Tensor]:
        r"""Return :math:`\alpha`, :math:`\beta` and :math:`\alpha + \beta > 0`, each ``(1,)``."""
        alpha = F.softplus(self.alpha_tilde)
        alpha_plus_beta = F.softplus(self.beta_tilde)

        return alpha, alpha_plus_beta - alpha, alpha_plus_beta

    def _log_det(self, r: Tensor, alpha: Tensor, alpha_plus_beta: Tensor) -> Tensor:
        """Return the forward log-abs-det at radius ``r`` of shape ``(n,)``."""
        log_alpha_r = torch.log(alpha + r)
        log_radial = torch.log(alpha_plus_beta + r) - log_alpha_r
        log_along = torch.log(r * (2.0 * alpha + r) + alpha * alpha_plus_beta) - 2.0 * log_alpha_r

        return (self.dim - 1) * log_radial + log_along

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the radial map to ``x`` of shape ``(n, d)``."""
        alpha, beta, alpha_plus_beta = self.alpha_beta()
        offset = x - self.z0
        r = torch.linalg.vector_norm(offset, dim=-1)
        h = 1.0 / (alpha + r)
        z = x + (beta * h).unsqueeze(-1) * offset

        return z, self._log_det(r, alpha, alpha_plus_beta)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the radial map in closed form for ``z`` of shape ``(n, d)``."""
        alpha, _, alpha_plus_beta = self.alpha_beta()
        offset = z - self.z0
        rho = torch.linalg.vector_norm(offset, dim=-1)

        # Roots of r^2 + b r + c with b = alpha + beta - rho and c = -alpha rho <= 0. With
        # q = |b| + sqrt(b^2 - 4c) > 0 the non-negative root is -2c / q when b >= 0 and q / 2
        # when b < 0; neither form subtracts nearly equal numbers, and both stay finite.
        b = alpha_plus_beta - rho
        q = b.abs() + torch.sqrt(b.square() + 4.0 * alpha * rho)
        r = torch.where(b >= 0, 2.0 * alpha * rho / q, 0.5 * q)

        # x - z0 points the same way as z - z0, scaled by r / rho, which is
        # (alpha + r) / (alpha + beta + r) and stays finite at rho = 0.
        x = self.z0 + ((alpha + r) / (alpha_plus_beta + r)).unsqueeze(-1) * offset

        return x, -self._log_det(r, alpha, alpha_plus_beta)

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}"

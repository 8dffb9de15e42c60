"""Planar flows (Rezende & Mohamed, 2015), with a numerical inverse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactflow.bijections.base import Bijection


class PlanarFlow(Bijection):
    r"""Planar flow :math:`z' = z + \hat u \tanh(w^\top z + b)`.

    Rezende & Mohamed (2015), "Variational Inference with Normalizing Flows". The vector
    :math:`u` is reparametrised as
    :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \lVert w \rVert^2` with
    :math:`m(a) = -1 + \operatorname{softplus}(a)`, so :math:`w^\top \hat u \ge -1` and the map
    is invertible. By the matrix determinant lemma the log-abs-det is
    :math:`\log |1 + \hat u^\top \psi|` with :math:`\psi = (1 - \tanh^2(w^\top z + b))\, w`.

    There is no closed-form inverse. Since the map moves :math:`z` only along :math:`\hat u`,
    writing :math:`z = y - \hat u \tanh(\alpha + b)` with :math:`\alpha = w^\top z` reduces
    inversion to the scalar equation :math:`\alpha + w^\top \hat u \tanh(\alpha + b) = w^\top y`,
    whose left side is non-decreasing in :math:`\alpha`. It is solved by Newton steps kept inside
    a shrinking bracket (bisection whenever a step would leave it).

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"PlanarFlow needs dim >= 1, got {dim}")

        # Start near the identity: u = log(e - 1) w / |w|^2 makes m(w^T u) = 0, hence u_hat = 0;
        # a small perturbation breaks the symmetry. A plain random u would make every layer a
        # sizeable contraction along w, and 32 of them a poor starting density.
        self.dim = dim
        bound = 1.0 / math.sqrt(dim)
        w = torch.empty(dim).uniform_(-bound, bound)
        u = math.log(math.e - 1.0) * w / (w @ w) + 0.01 * torch.randn(dim)
        self.w = nn.Parameter(w)
        self.u = nn.Parameter(u)
        self.b = nn.Parameter(torch.empty(1).uniform_(-bound, bound))

    def u_hat(self) -> Tensor:
        r"""Return the constrained :math:`\hat u`, for which :math:`w^\top \hat u \ge -1`."""
        wu = self.w @ self.u
        m = F.softplus(wu) - 1.0

        return self.u + ((m - wu) / (self.w @ self.w)) * self.w

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the planar map to ``x`` of shape ``(n, d)``."""
        u_hat = self.u_hat()
        h = torch.tanh(torch.addmv(self.b, x, self.w))
        z = torch.addr(x, h, u_hat)

        # 1 + u_hat^T psi >= 0 by construction; its log is the log-abs-det.
        log_det = torch.log1p((1.0 - h.square()) * (self.w @ u_hat))

        return z, log_det

    def inverse(self, z: Tensor, iterations: int = 100) -> tuple[Tensor, Tensor]:
        """Invert the planar map numerically, to float precision, for ``z`` of shape ``(n, d)``."""
        u_hat = self.u_hat()
        with torch.no_grad():
            alpha = self._solve_alpha(z.double(), u_hat.double(), iterations).to(z.dtype)

        # One differentiable Newton step from the converged root gives exact gradients to first
        # order (implicit function theorem) without back-propagating through the iterations.
        wu = self.w @ u_hat
        target = z @ self.w
        h = torch.tanh(alpha + self.b)
        residual = alpha + wu * h - target
        alpha = alpha - residual / (1.0 + wu * (1.0 - h.square()))

        h = torch.tanh(alpha + self.b)
        x = z - h.unsqueeze(-1) * u_hat
        log_det = -torch.log1p((1.0 - h.square()) * wu)

        return x, log_det

    def _solve_alpha(self, y: Tensor, u_hat: Tensor, iterations: int) -> Tensor:
        r"""Solve :math:`\\alpha + c \\tanh(\\alpha + b) = t` per row, with ``c = w^T u_hat``."""
        w = self.w.detach().double()
        b = self.b.detach().double()
        c = w @ u_hat
        t = y @ w

        # The root lies within |c| of t because |tanh| <= 1.
        low = t - c.abs() - 1.0
        high = t + c.abs() + 1.0
        alpha = t.clone()
        for _ in range(iterations):
            h = torch.tanh(alpha + b)
            g = alpha + c * h - t
            low = torch.where(g < 0, alpha, low)
            high = torch.where(g > 0, alpha, high)
            step = alpha - g / (1.0 + c * (1.0 - h.square())).clamp_min(1e-12)
            inside = (step > low) & (step < high)
            new = torch.where(inside, step, 0.5 * (low + high))
            if torch.equal(new, alpha):
                break
            alpha = new

        return alpha

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}"

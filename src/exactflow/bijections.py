r"""Invertible layers with exact log-determinants.

Every layer here follows one contract, stated once:

* ``forward(x)`` maps data :math:`x` towards the latent space and returns
  ``(z, log_det)`` where ``log_det`` is :math:`\log |\det \partial z / \partial x|`, one value
  per sample.
* ``inverse(z)`` maps latent back to data and returns ``(x, log_det)`` where ``log_det`` is the
  log-abs-det of that inverse map, that is the negative of the forward value at ``x``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactflow.nets import CouplingNet


class Bijection(nn.Module):
    """An invertible map with a tractable log-abs-det Jacobian (see the module docstring)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map data to latent; return the image and the forward log-abs-det per sample."""
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map latent to data; return the preimage and the inverse log-abs-det per sample."""
        raise NotImplementedError


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
        m = -1.0 + F.softplus(wu)

        return self.u + (m - wu) * self.w / (self.w @ self.w)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the planar map to ``x`` of shape ``(n, d)``."""
        u_hat = self.u_hat()
        h = torch.tanh(x @ self.w + self.b)
        z = x + h.unsqueeze(-1) * u_hat

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


class AffineCouplingLayer(Bijection):
    r"""Affine coupling :math:`y = x \odot e^{s} + t`, :math:`s, t` read from :math:`x \odot m`.

    Dinh, Sohl-Dickstein & Bengio (2017), "Density estimation using Real NVP". The binary mask
    :math:`m` keeps some coordinates fixed; the scale net :math:`s` and translation net :math:`t`
    read only those, and their outputs are zeroed on them, so the Jacobian is triangular with
    :math:`\log |\det| = \sum_i s_i`. The scale net ends in ``tanh``, so each scale
    :math:`e^{s_i}` stays in :math:`[e^{-1}, e]`. Inverse: :math:`x = (y - t) \odot e^{-s}`.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``; at least 2.
        parity: 0 for the even mask ``1, 0, 1, 0, ...``, 1 for its complement.
        hidden: the width of the two hidden layers of each net.
    """

    def __init__(self, dim: int, parity: int, hidden: int = 64) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(
                f"AffineCouplingLayer needs dim >= 2 (a coupling must keep at least one "
                f"coordinate fixed and transform another), got {dim}"
            )
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}")

        self.dim = dim
        self.parity = parity
        mask = ((torch.arange(dim) + parity) % 2 == 0).to(torch.get_default_dtype())
        self.register_buffer("mask", mask)
        self.nets = CouplingNet(dim, hidden)

    def scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(s, t)`` for ``x`` of shape ``(n, d)``, zero on the kept coordinates."""
        s, t = self.nets(x * self.mask)
        free = 1.0 - self.mask

        return s * free, t * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the coupling to ``x`` of shape ``(n, d)``."""
        s, t = self.scale_shift(x)

        return x * torch.exp(s) + t, s.sum(-1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the coupling for ``z`` of shape ``(n, d)``; kept coordinates stay as they are."""
        s, t = self.scale_shift(z)

        return (z - t) * torch.exp(-s), -s.sum(-1)

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}, mask={self.mask.int().tolist()}"


class BatchNormFlow(Bijection):
    r"""Batch norm flow :math:`y = (x - \mu) e^{\gamma} / \sqrt{\sigma^2 + \epsilon} + \beta`.

    Dinh, Sohl-Dickstein & Bengio (2017), "Density estimation using Real NVP", section 3.7.
    :math:`\log |\det| = \sum_i \gamma_i - \tfrac12 \log(\sigma_i^2 + \epsilon)`.

    In training mode :math:`\mu, \sigma^2` are the batch mean and the biased batch variance
    (divisor :math:`n`), the ones the map actually uses, and the running averages are updated
    as ``running = (1 - momentum) * running + momentum * batch`` with that same variance. In
    evaluation mode the running averages are used, so a point's log-density does not depend on
    the rest of its batch. The inverse in training mode uses the statistics of the last
    training batch.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``.
        momentum: the weight of the newest batch in the running averages.
        eps: added to the variance for stability.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")

        self.dim = dim
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("batch_mean", torch.zeros(dim))
        self.register_buffer("batch_var", torch.ones(dim))

    def _statistics(self, x: Tensor | None) -> tuple[Tensor, Tensor]:
        """Batch statistics in training mode (updating the running ones), else running ones."""
        if not self.training:
            return self.running_mean, self.running_var
        if x is None:
            return self.batch_mean, self.batch_var
        if x.shape[0] < 2:
            raise ValueError(
                "BatchNormFlow in training mode needs a batch of at least 2 points to estimate "
                f"its variance, got {x.shape[0]}; call .eval() to use the running statistics"
            )

        mean = x.mean(0)
        var = x.var(0, unbiased=False)
        with torch.no_grad():
            self.batch_mean.copy_(mean)
            self.batch_var.copy_(var)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)

        return mean, var

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise ``x`` of shape ``(n, d)``."""
        mean, var = self._statistics(x)
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        y = (x - mean) * torch.exp(log_scale) + self.beta

        return y, log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the normalisation for ``z`` of shape ``(n, d)``."""
        mean, var = self._statistics(None)
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        x = (z - self.beta) * torch.exp(-log_scale) + mean

        return x, (-log_scale.sum()).expand(z.shape[0])

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}, momentum={self.momentum}, eps={self.eps}"

"""Batch normalisation as an invertible layer (Dinh et al., 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from exactflow.bijections.base import Bijection


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

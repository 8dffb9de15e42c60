r"""A normalizing flow: a stack of bijections over a standard Gaussian base."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from exactflow.bijections import Bijection


def standard_normal_log_prob(z: Tensor) -> Tensor:
    r"""Return :math:`\log \mathcal N(z; 0, I)` summed over the last dimension."""
    return -0.5 * (z.square().sum(-1) + z.shape[-1] * math.log(2.0 * math.pi))


class Flow(nn.Module):
    r"""The density :math:`\log p(x) = \log \mathcal N(f(x); 0, I) + \sum_k \log |\det J_k|`.

    :math:`f = f_K \circ \dots \circ f_1` maps data to latent (``forward``); sampling runs the
    inverse pass from :math:`z \sim \mathcal N(0, I)`.

    Args:
        layers: the bijections :math:`f_1, \dots, f_K`, applied in that order to data.
        dim: the dimension :math:`d` of the data, shape ``(n, d)``.
    """

    def __init__(self, layers: Sequence[Bijection], dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dim = dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map data ``x`` of shape ``(n, d)`` to latent; return ``(z, log_det)``."""
        log_det = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            log_det = log_det + ld

        return x, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map latent ``z`` of shape ``(n, d)`` to data; return ``(x, log_det)`` of that map."""
        log_det = z.new_zeros(z.shape[0])
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z)
            log_det = log_det + ld

        return z, log_det

    def cast(self, x: Tensor | np.ndarray) -> Tensor:
        """Return ``x`` as a tensor of the model's dtype and device (float64 input included)."""
        reference = next(iter(self.parameters()), None)
        if reference is None:
            reference = next(iter(self.buffers()))

        return torch.as_tensor(x, dtype=reference.dtype, device=reference.device)

    def log_prob(self, x: Tensor | np.ndarray) -> Tensor:
        """Return the log-density of each row of ``x``; a single point ``(d,)`` gives a scalar.

        Input of another dtype (such as float64 from numpy) is cast to the model's dtype.
        """
        x = self.cast(x)
        if x.dim() == 1:
            return self.log_prob(x.unsqueeze(0)).squeeze(0)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"expected points with {self.dim} coordinates, got shape {tuple(x.shape)}"
            )

        z, log_det = self(x)

        return standard_normal_log_prob(z) + log_det

    def inverse_stages(self, z: Tensor) -> list[Tensor]:
        """Return ``z`` and its image after each inverse layer, ending in data space."""
        stages = [z]
        for layer in reversed(self.layers):
            z, _ = layer.inverse(z)
            stages.append(z)

        return stages

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples of shape ``(n, d)`` by the inverse pass, without gradients."""
        reference = self.cast(torch.zeros(()))
        z = torch.randn(n, self.dim, generator=generator, dtype=reference.dtype)
        z = z.to(reference.device)
        with torch.no_grad():
            x, _ = self.inverse(z)

        return x

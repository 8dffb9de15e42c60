"""Additive coupling and diagonal scaling, the two layers of NICE (Dinh et al., 2015)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from exactflow.bijections.base import Bijection, coupling_mask
from exactflow.nets import mlp


class AdditiveCoupling(Bijection):
    r"""Additive coupling :math:`y = x + m(x \odot b) \odot (1 - b)` for a binary mask :math:`b`.

    Dinh, Krueger & Bengio (2015), "NICE: Non-linear Independent Components Estimation". The
    coordinates where :math:`b = 1` are kept and read by the network :math:`m`; the others are
    shifted by its output. The Jacobian is unit triangular, so :math:`\log |\det| = 0` exactly
    and the layer preserves volume: a NICE stack ends in :class:`DiagonalScaling` to change it.
    Inverse: :math:`x = y - m(y \odot b) \odot (1 - b)`.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``; at least 2.
        parity: 0 for the even mask ``1, 0, 1, 0, ...``, 1 for its complement.
        hidden: the width of the two hidden layers of :math:`m`.
    """

    def __init__(self, dim: int, parity: int, hidden: int = 64) -> None:
        super().__init__()
        mask = coupling_mask(dim, parity, type(self).__name__)

        self.dim = dim
        self.parity = parity
        self.register_buffer("mask", mask)
        self.net = mlp(dim, hidden, dim)

    def shift(self, x: Tensor) -> Tensor:
        """Return the shift for ``x`` of shape ``(n, d)``, zero on the kept coordinates."""
        return self.net(x * self.mask) * (1.0 - self.mask)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the coupling to ``x`` of shape ``(n, d)``; the log-det is zero."""
        return x + self.shift(x), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the coupling for ``z`` of shape ``(n, d)``; the log-det is zero."""
        return z - self.shift(z), z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}, mask={self.mask.int().tolist()}"


class DiagonalScaling(Bijection):
    r"""Diagonal scaling :math:`y = x \odot e^{s}` with a learned log-scale :math:`s`.

    Dinh, Krueger & Bengio (2015), "NICE: Non-linear Independent Components Estimation",
    section 3.3: the final layer of NICE, which gives the stack of volume-preserving couplings
    its log-det :math:`\log |\det| = \sum_i s_i`, with :math:`s \in \mathbb{R}^d`. It starts as
    the identity, :math:`s = 0`.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"DiagonalScaling needs dim >= 1, got {dim}")

        self.dim = dim
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scale ``x`` of shape ``(n, d)``."""
        return x * torch.exp(self.log_scale), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the scaling for ``z`` of shape ``(n, d)``."""
        return z * torch.exp(-self.log_scale), (-self.log_scale.sum()).expand(z.shape[0])

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}"

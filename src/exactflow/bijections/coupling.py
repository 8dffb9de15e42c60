"""Affine coupling layers (Dinh et al., 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from exactflow.bijections.base import Bijection, coupling_mask
from exactflow.nets import CouplingNet


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
        mask = coupling_mask(dim, parity, type(self).__name__)

        self.dim = dim
        self.parity = parity
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

"""A fixed permutation of the coordinates, to interleave with autoregressive layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from exactflow.bijections.base import Bijection


class Permutation(Bijection):
    r"""Fixed permutation :math:`z_i = x_{\pi(i)}`, with :math:`\log |\det| = 0`.

    Papamakarios, Pavlakou & Murray (2017), "Masked Autoregressive Flow for Density
    Estimation", reverse the order of the coordinates between autoregressive layers, so that
    each coordinate is conditioned on the others in some layer. The layer has no parameters.

    Args:
        order: :math:`\pi` as the indices ``0, ..., d - 1`` in their new order; the inputs have
            shape ``(n, d)``.
    """

    def __init__(self, order: Sequence[int]) -> None:
        super().__init__()
        if not order or sorted(order) != list(range(len(order))):
            raise ValueError(
                f"order must hold each of 0, ..., d - 1 exactly once, got {list(order)}"
            )

        self.dim = len(order)
        order_tensor = torch.tensor(list(order), dtype=torch.long)
        self.register_buffer("order", order_tensor)
        self.register_buffer("inverse_order", torch.argsort(order_tensor))

    @classmethod
    def reverse(cls, dim: int) -> Permutation:
        """Return the permutation that reverses ``dim`` coordinates."""
        return cls(range(dim - 1, -1, -1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Permute the columns of ``x`` of shape ``(n, d)``."""
        return x[:, self.order], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the permutation for ``z`` of shape ``(n, d)``."""
        return z[:, self.inverse_order], z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}, order={self.order.tolist()}"

"""Neural networks that parametrise the flow layers."""

from __future__ import annotations

from torch import Tensor, nn


def mlp(in_features: int, hidden: int, out_features: int, slope: float = 0.2) -> nn.Sequential:
    """Return ``Linear(in, h) → LeakyReLU → Linear(h, h) → LeakyReLU → Linear(h, out)``."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.LeakyReLU(slope),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(slope),
        nn.Linear(hidden, out_features),
    )


class CouplingNet(nn.Module):
    """The scale and translation networks of an affine coupling layer.

    Both read the same masked input of shape ``(n, d)`` and return shape ``(n, d)``. The scale
    net ends in ``tanh``, which bounds each log-scale to ``[-1, 1]``.

    Args:
        dim: the input and output dimension ``d``.
        hidden: the width of the hidden layers.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.scale = nn.Sequential(mlp(dim, hidden, dim), nn.Tanh())
        self.shift = mlp(dim, hidden, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the log-scale ``s`` and shift ``t`` for ``x``."""
        return self.scale(x), self.shift(x)

"""The masked autoencoder (MADE) that parametrises the autoregressive layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed binary mask on every call.

    Args:
        mask: the mask of shape ``(out_features, in_features)``; entry ``(k, j)`` is 1 where
            output ``k`` may read input ``j``.
    """

    def __init__(self, mask: Tensor) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the masked affine map to ``x`` of shape ``(n, in_features)``."""
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    r"""An autoregressive network: output :math:`(p, i)` depends only on :math:`x_{<i}`.

    Germain, Gregor, Murray & Larochelle (2015), "MADE: Masked Autoencoder for Distribution
    Estimation". Inputs get the degrees :math:`1, \dots, d`, hidden units the degrees
    :math:`1, \dots, d - 1` in turn, and the outputs of coordinate :math:`i` the degree
    :math:`i`. A hidden unit reads the units of the layer below whose degree is at most its
    own, and an output reads the hidden units of strictly smaller degree, so no path joins
    :math:`x_j` to an output of coordinate :math:`i \le j`. The natural order is used; put a
    :class:`~exactflow.bijections.Permutation` between layers to vary it.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``; at least 2, since with
            one coordinate the outputs could read nothing.
        outputs: the number of outputs per coordinate.
        hidden: the width of the hidden layers.
        depth: the number of hidden layers, at least 1.
    """

    def __init__(self, dim: int, outputs: int, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(
                f"MADE needs dim >= 2 (the first coordinate's outputs read no input, so with "
                f"one coordinate the network would be a constant), got {dim}"
            )
        if depth < 1:
            raise ValueError(f"MADE needs depth >= 1, got {depth}")

        self.dim = dim
        self.outputs = outputs
        input_degrees = torch.arange(1, dim + 1)
        hidden_degrees = torch.arange(hidden) % (dim - 1) + 1
        output_degrees = input_degrees.repeat(outputs)

        layers: list[nn.Module] = []
        below = input_degrees
        for _ in range(depth):
            layers.append(MaskedLinear(hidden_degrees[:, None] >= below[None, :]))
            layers.append(nn.LeakyReLU(0.2))
            below = hidden_degrees
        layers.append(MaskedLinear(output_degrees[:, None] > below[None, :]))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return the outputs for ``x`` of shape ``(n, d)``, as shape ``(n, outputs, d)``."""
        return self.net(x).unflatten(-1, (self.outputs, self.dim))

r"""The contract every invertible layer follows.

Every layer here follows one contract, stated once:

* ``forward(x)`` maps data :math:`x` towards the latent space and returns
  ``(z, log_det)`` where ``log_det`` is :math:`\log |\det \partial z / \partial x|`, one value
  per sample.
* ``inverse(z)`` maps latent back to data and returns ``(x, log_det)`` where ``log_det`` is the
  log-abs-det of that inverse map, that is the negative of the forward value at ``x``.
"""

import torch
from torch import Tensor, nn


class Bijection(nn.Module):
    """An invertible map with a tractable log-abs-det Jacobian (see the module docstring)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map data to latent; return the image and the forward log-abs-det per sample."""
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map latent to data; return the preimage and the inverse log-abs-det per sample."""
        raise NotImplementedError


def coupling_mask(dim: int, parity: int, layer: str) -> Tensor:
    """Return the binary mask of a coupling layer: ``1, 0, 1, 0, ...`` or its complement.

    Raises:
        ValueError: for ``dim < 2`` (a coupling keeps one coordinate fixed and transforms
            another) or a ``parity`` other than 0 and 1; the message names ``layer``.
    """
    if dim < 2:
        raise ValueError(
            f"{layer} needs dim >= 2 (a coupling must keep at least one coordinate fixed and "
            f"transform another), got {dim}"
        )
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity}")

    return ((torch.arange(dim) + parity) % 2 == 0).to(torch.get_default_dtype())

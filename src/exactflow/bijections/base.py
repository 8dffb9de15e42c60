r"""The contract every invertible layer follows.

Every layer here follows one contract, stated once:

* ``forward(x)`` maps data :math:`x` towards the latent space and returns
  ``(z, log_det)`` where ``log_det`` is :math:`\log |\det \partial z / \partial x|`, one value
  per sample.
* ``inverse(z)`` maps latent back to data and returns ``(x, log_det)`` where ``log_det`` is the
  log-abs-det of that inverse map, that is the negative of the forward value at ``x``.
"""

from torch import Tensor, nn


class Bijection(nn.Module):
    """An invertible map with a tractable log-abs-det Jacobian (see the module docstring)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map data to latent; return the image and the forward log-abs-det per sample."""
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map latent to data; return the preimage and the inverse log-abs-det per sample."""
        raise NotImplementedError

"""Activation normalisation and the LU-factored invertible linear layer of Glow (2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from exactflow.bijections.base import Bijection


class ActNorm(Bijection):
    r"""Activation normalisation :math:`y = x \odot e^{s} + b`, initialised from data.

    Kingma & Dhariwal (2018), "Glow: Generative Flow with Invertible 1x1 Convolutions",
    section 3.1. :math:`\log |\det| = \sum_i s_i`. The first call of ``forward`` in training
    mode sets :math:`s = -\tfrac12 \log(\sigma^2 + \epsilon)` and :math:`b = -\mu e^{s}` from the
    mean :math:`\mu` and biased variance :math:`\sigma^2` of that batch, so the batch leaves the
    layer with zero mean and unit variance per coordinate; from then on :math:`s` and
    :math:`b` are ordinary parameters and no batch statistics are used. The boolean buffer
    ``initialized`` records this, so a loaded state is not initialised again. Before that first
    call the layer is the identity; ``inverse`` and evaluation mode never initialise it.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``.
        eps: added to the variance of the initialising batch for stability.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"ActNorm needs dim >= 1, got {dim}")

        self.dim = dim
        self.eps = eps
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))

    def _initialize(self, x: Tensor) -> None:
        """Set the scale and shift that standardise the batch ``x`` of shape ``(n, d)``."""
        if x.shape[0] < 2:
            raise ValueError(
                "ActNorm initialises from its first training batch and needs at least 2 points "
                f"to estimate a variance, got {x.shape[0]}"
            )

        with torch.no_grad():
            log_scale = -0.5 * torch.log(x.var(0, unbiased=False) + self.eps)
            self.log_scale.copy_(log_scale)
            self.shift.copy_(-x.mean(0) * torch.exp(log_scale))
            self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise ``x`` of shape ``(n, d)``, initialising from it on the first training call."""
        if self.training and not self.initialized:
            self._initialize(x)

        y = x * torch.exp(self.log_scale) + self.shift

        return y, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the normalisation for ``z`` of shape ``(n, d)``."""
        x = (z - self.shift) * torch.exp(-self.log_scale)

        return x, (-self.log_scale.sum()).expand(z.shape[0])

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}, eps={self.eps}, initialized={bool(self.initialized)}"


class LULinear(Bijection):
    r"""Invertible linear map :math:`z = W x` with :math:`W = P L (U + \operatorname{diag}(s))`.

    Kingma & Dhariwal (2018), "Glow: Generative Flow with Invertible 1x1 Convolutions",
    section 3.2 (LU decomposition). :math:`P` is a fixed permutation, :math:`L` is unit lower
    triangular, :math:`U` strictly upper triangular and :math:`s = \sigma \odot e^{\lambda}` with
    fixed signs :math:`\sigma`, so :math:`\log |\det W| = \sum_i \lambda_i`. Only the free
    entries are parameters: :math:`d (d - 1) / 2` each for :math:`L` and :math:`U`, and
    :math:`d` for :math:`\lambda`. The layer starts from the LU factors of a random rotation.
    Inverse: two triangular solves, no matrix inverse.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"LULinear needs dim >= 1, got {dim}")

        self.dim = dim
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim))
        permutation, lower, upper = torch.linalg.lu(rotation)
        rows, cols = torch.tril_indices(dim, dim, -1)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation.argmax(1))
        self.register_buffer("sign", torch.sign(diagonal))
        self.lower = nn.Parameter(lower[rows, cols])
        self.upper = nn.Parameter(upper[cols, rows])
        self.log_abs_diagonal = nn.Parameter(torch.log(diagonal.abs()))

    def factors(self) -> tuple[Tensor, Tensor]:
        r"""Return :math:`L` and :math:`U + \operatorname{diag}(s)`, each of shape ``(d, d)``."""
        reference = self.log_abs_diagonal
        rows, cols = torch.tril_indices(self.dim, self.dim, -1, device=reference.device)
        eye = torch.eye(self.dim, dtype=reference.dtype, device=reference.device)
        lower = eye.index_put((rows, cols), self.lower)
        diagonal = torch.diag(self.sign * torch.exp(self.log_abs_diagonal))
        upper = diagonal.index_put((cols, rows), self.upper)

        return lower, upper

    def weight(self) -> Tensor:
        """Return the matrix :math:`W = P L U` of shape ``(d, d)``."""
        lower, upper = self.factors()

        return (lower @ upper)[self.permutation]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply :math:`W` to each row of ``x`` of shape ``(n, d)``."""
        return x @ self.weight().T, self.log_abs_diagonal.sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Solve :math:`W x = z` for each row of ``z`` of shape ``(n, d)``."""
        lower, upper = self.factors()

        # In row form z = x U^T L^T P^T, so x U^T L^T = z P, whose columns are z's columns
        # reordered by the inverse permutation.
        permuted = z[:, torch.argsort(self.permutation)]
        y = torch.linalg.solve_triangular(
            lower.T, permuted, upper=True, left=False, unitriangular=True
        )
        x = torch.linalg.solve_triangular(upper.T, y, upper=False, left=False)

        return x, (-self.log_abs_diagonal.sum()).expand(z.shape[0])

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}"

"""Masked and inverse autoregressive flows: one affine map, used in either direction."""

from __future__ import annotations

import torch
from torch import Tensor

from exactflow.bijections.base import Bijection
from exactflow.made import MADE


class _AutoregressiveAffine(Bijection):
    r"""The map :math:`y = v \odot e^{s(v)} + t(v)`, :math:`s_i, t_i` read from :math:`v_{<i}`.

    Computing :math:`y` from :math:`v` takes one pass of the network (``_one_pass``); computing
    :math:`v` from :math:`y` takes :math:`d` passes (``_sequential``), since :math:`v_i` needs
    :math:`v_{<i}` first. The log-scale is soft-clamped,
    :math:`s = c \tanh(\tilde s / c)`, so each scale stays in :math:`[e^{-c}, e^{c}]`.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``; at least 2.
        hidden: the width of the hidden layers of the MADE network.
        depth: the number of its hidden layers.
        max_log_scale: the bound :math:`c` on :math:`|s_i|`.
    """

    def __init__(
        self, dim: int, hidden: int = 64, depth: int = 2, max_log_scale: float = 3.0
    ) -> None:
        super().__init__()
        if max_log_scale <= 0:
            raise ValueError(f"max_log_scale must be positive, got {max_log_scale}")

        self.dim = dim
        self.max_log_scale = max_log_scale
        self.made = MADE(dim, outputs=2, hidden=hidden, depth=depth)

    def scale_shift(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Return the log-scale ``s`` and shift ``t`` read from ``v``, each of shape ``(n, d)``."""
        raw_scale, shift = self.made(v).unbind(-2)
        log_scale = self.max_log_scale * torch.tanh(raw_scale / self.max_log_scale)

        return log_scale, shift

    def _one_pass(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``y`` for ``v`` of shape ``(n, d)`` and the log-abs-det of that map."""
        log_scale, shift = self.scale_shift(v)

        return v * torch.exp(log_scale) + shift, log_scale.sum(-1)

    def _sequential(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``v`` for ``y`` of shape ``(n, d)`` and the log-abs-det of that map."""
        # Pass k fixes coordinate k - 1, because its s and t read only coordinates already
        # fixed; after d passes every coordinate is exact, and so are the last s and t.
        v = y.new_zeros(y.shape)
        for _ in range(self.dim):
            log_scale, shift = self.scale_shift(v)
            v = (y - shift) * torch.exp(-log_scale)

        return v, -log_scale.sum(-1)

    def extra_repr(self) -> str:
        """Show the settings that define the layer's shape."""
        return f"dim={self.dim}, max_log_scale={self.max_log_scale}"


class MaskedAutoregressive(_AutoregressiveAffine):
    r"""Masked autoregressive flow :math:`z = x \odot e^{s(x)} + t(x)`, causal in :math:`x`.

    Papamakarios, Pavlakou & Murray (2017), "Masked Autoregressive Flow for Density
    Estimation". :math:`s_i, t_i` depend on :math:`x_{<i}` only and come, for all :math:`i` at
    once, from one pass of a MADE network (Germain et al., 2015). The Jacobian is triangular,
    :math:`\log |\det| = \sum_i s_i`. Density evaluation (``forward``) is one pass; sampling
    (``inverse``, :math:`x_i = (z_i - t_i) e^{-s_i}`) is sequential and takes :math:`d` passes.
    Each log-scale is soft-clamped to :math:`[-c, c]` by :math:`s = c \tanh(\tilde s / c)`.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``; at least 2.
        hidden: the width of the hidden layers of the MADE network.
        depth: the number of its hidden layers.
        max_log_scale: the bound :math:`c` on :math:`|s_i|`.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``x`` of shape ``(n, d)`` to latent in one pass."""
        return self._one_pass(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``z`` of shape ``(n, d)`` to data, one coordinate per pass."""
        return self._sequential(z)


class InverseAutoregressive(_AutoregressiveAffine):
    r"""Inverse autoregressive flow :math:`x = z \odot e^{s(z)} + t(z)`, causal in :math:`z`.

    Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), "Improved Variational
    Inference with Inverse Autoregressive Flow": the MADE network of
    :class:`MaskedAutoregressive` reads the latent side instead, so :math:`s_i, t_i` depend on
    :math:`z_{<i}` only. Sampling (``inverse``) is one
    pass with :math:`\log |\det \partial x / \partial z| = \sum_i s_i`; density evaluation
    (``forward``, :math:`z_i = (x_i - t_i) e^{-s_i}`) is sequential and takes :math:`d` passes.
    Each log-scale is soft-clamped to :math:`[-c, c]` by :math:`s = c \tanh(\tilde s / c)`.

    Args:
        dim: the dimension :math:`d` of the inputs, shape ``(n, d)``; at least 2.
        hidden: the width of the hidden layers of the MADE network.
        depth: the number of its hidden layers.
        max_log_scale: the bound :math:`c` on :math:`|s_i|`.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``x`` of shape ``(n, d)`` to latent, one coordinate per pass."""
        return self._sequential(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``z`` of shape ``(n, d)`` to data in one pass."""
        return self._one_pass(z)

"""A trained flow as a ``torch.distributions.Distribution``, in the data's own units."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from exactflow.data import Standardizer
from exactflow.flow import Flow


class FlowDistribution(Distribution):
    r"""The density :math:`p(x) = p_{\text{flow}}((x - \mu) / \sigma) / \prod_i \sigma_i`.

    Wraps a flow trained on standardized rows, with the standardization
    :math:`(x - \mu) / \sigma` it was trained with, so that ``log_prob`` and samples are in the
    data's own units and the object drops into code written for PyTorch distributions (and
    Pyro). Without a standardizer the flow's own coordinates are used. The flow is evaluated in
    whatever train/eval mode it is in; a loaded checkpoint is in evaluation mode.

    Args:
        flow: the trained flow over ``d``-dimensional rows.
        standardizer: the standardization fitted on the training data, or ``None``.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow: Flow, standardizer: Standardizer | None = None) -> None:
        self.flow = flow
        reference = flow.cast(torch.zeros(()))
        ones = torch.ones(flow.dim, dtype=reference.dtype, device=reference.device)
        if standardizer is None:
            self.loc, self.scale = ones.new_zeros(flow.dim), ones
        else:
            self.loc = torch.as_tensor(standardizer.mean).to(ones)
            self.scale = torch.as_tensor(standardizer.std).to(ones)
        super().__init__(event_shape=torch.Size([flow.dim]), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        """Return the log-density of ``value`` of shape ``(..., d)``, shape ``(...)``.

        The result is in the flow's dtype and differentiable in its weights.

        Raises:
            ValueError: when the last dimension of ``value`` is not ``d``.
        """
        value = self.flow.cast(value)
        if value.dim() == 0 or value.shape[-1] != self.flow.dim:
            raise ValueError(
                f"expected values with {self.flow.dim} coordinates in the last dimension, got "
                f"shape {tuple(value.shape)}"
            )
        batch = value.shape[:-1]
        x = ((value - self.loc) / self.scale).reshape(-1, self.flow.dim)
        log_p = self.flow.log_prob(x) - self.scale.log().sum()

        return log_p.reshape(batch)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Draw samples of shape ``sample_shape + (d,)`` differentiably in the flow's weights."""
        shape = torch.Size(sample_shape)
        z = torch.randn(shape.numel(), self.flow.dim, dtype=self.loc.dtype, device=self.loc.device)
        x, _ = self.flow.inverse(z)

        return (x * self.scale + self.loc).reshape(*shape, self.flow.dim)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Draw samples of shape ``sample_shape + (d,)`` without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape)

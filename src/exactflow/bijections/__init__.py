"""Invertible layers with exact log-determinants, one module per family."""

from exactflow.bijections.base import Bijection
from exactflow.bijections.batchnorm import BatchNormFlow
from exactflow.bijections.coupling import AffineCouplingLayer
from exactflow.bijections.planar import PlanarFlow

__all__ = ["AffineCouplingLayer", "BatchNormFlow", "Bijection", "PlanarFlow"]

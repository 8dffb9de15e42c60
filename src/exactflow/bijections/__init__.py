"""Invertible layers with exact log-determinants, one module per family."""

from exactflow.bijections.additive import AdditiveCoupling, DiagonalScaling
from exactflow.bijections.autoregressive import InverseAutoregressive, MaskedAutoregressive
from exactflow.bijections.base import Bijection
from exactflow.bijections.batchnorm import BatchNormFlow
from exactflow.bijections.coupling import AffineCouplingLayer
from exactflow.bijections.glow import ActNorm, LULinear
from exactflow.bijections.permutation import Permutation
from exactflow.bijections.planar import PlanarFlow
from exactflow.bijections.radial import RadialFlow
from exactflow.bijections.spline import RationalQuadraticCoupling

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCouplingLayer",
    "BatchNormFlow",
    "Bijection",
    "DiagonalScaling",
    "InverseAutoregressive",
    "LULinear",
    "MaskedAutoregressive",
    "Permutation",
    "PlanarFlow",
    "RadialFlow",
    "RationalQuadraticCoupling",
]

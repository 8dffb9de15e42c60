"""Named model builders: the reference architectures of the experiments."""

from __future__ import annotations

from collections.abc import Callable

from exactflow.bijections import AffineCouplingLayer, BatchNormFlow, Bijection, PlanarFlow
from exactflow.flow import Flow


def realnvp(dim: int = 2, blocks: int = 8, hidden: int = 64) -> Flow:
    """RealNVP: ``blocks`` × (affine coupling with alternating masks, then batch norm).

    With the defaults and ``dim = 2`` it has exactly 71,744 trainable parameters.
    """
    if blocks < 1:
        raise ValueError(f"realnvp needs blocks >= 1, got {blocks}")

    layers: list[Bijection] = []
    for k in range(blocks):
        layers.append(AffineCouplingLayer(dim, parity=k % 2, hidden=hidden))
        layers.append(BatchNormFlow(dim))

    return Flow(layers, dim)


def planar(dim: int = 2, K: int = 32) -> Flow:
    """A stack of ``K`` planar flows; with the defaults and ``dim = 2``, 160 parameters."""
    if K < 1:
        raise ValueError(f"planar needs K >= 1, got {K}")

    return Flow([PlanarFlow(dim) for _ in range(K)], dim)


MODELS: dict[str, Callable[..., Flow]] = {"realnvp": realnvp, "planar": planar}


def build(name: str, dim: int = 2, **options: int) -> Flow:
    """Build the model called ``name`` for data of dimension ``dim``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")

    return MODELS[name](dim, **options)


def count_parameters(flow: Flow) -> int:
    """Return the number of trainable parameters of ``flow``."""
    return sum(p.numel() for p in flow.parameters() if p.requires_grad)

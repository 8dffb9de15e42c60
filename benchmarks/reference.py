r"""A plain eager PyTorch reference of the two reference models and their training recipe.

Written from the layer definitions alone, without exactflow's layers, so that exactflow's speed
and results can be compared against straightforward PyTorch code:

* RealNVP for 2-D data, 8 blocks of (affine coupling, batch-norm flow): 71,744 parameters;
* a stack of 32 planar flows for 2-D data: 160 parameters.

Each model gives :math:`\log p(x) = \log \mathcal N(z; 0, I) + \sum_k \log |\det J_k|`, with
the data pushed through the layers in order. The models draw their initial weights in the same
order as exactflow's, so after the same ``torch.manual_seed`` both start from the same point.

This module has no command of its own: the benchmark scripts use it, and its
:func:`training_options` and :func:`train_in_processes` serve those that train runs.
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIM = 2
HIDDEN = 64
BLOCKS = 8
K = 32
PARAMETERS = {"realnvp": 71_744, "planar": 160}

LR = 1e-3
LR_MIN = 1e-5
BATCH_SIZE = 256
CLIP = 5.0


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """Return ``Linear(d, h), LeakyReLU(0.2), Linear(h, h), LeakyReLU(0.2), Linear(h, d)``."""
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, dim),
    )


class AffineCoupling(nn.Module):
    r"""Affine coupling :math:`y = x \odot e^{s} + t`, with log-det :math:`\sum_i s_i`.

    :math:`s = \tanh(S(x \odot m)) \odot (1 - m)` and :math:`t = T(x \odot m) \odot (1 - m)`,
    where the mask :math:`m` is 1 at the coordinates ``i`` with ``(i + parity) % 2 == 0``.

    Args:
        dim: the dimension ``d`` of the inputs, shape ``(n, d)``.
        parity: 0 or 1, which coordinates the mask keeps.
        hidden: the width of the hidden layers of ``S`` and ``T``.
    """

    def __init__(self, dim: int, parity: int, hidden: int) -> None:
        super().__init__()
        mask = (torch.arange(dim) + parity) % 2 == 0
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        self.scale = mlp(dim, hidden)
        self.shift = mlp(dim, hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)`` for ``x`` of shape ``(n, d)``."""
        kept = x * self.mask
        free = 1.0 - self.mask
        s = torch.tanh(self.scale(kept)) * free
        t = self.shift(kept) * free

        return x * torch.exp(s) + t, s.sum(-1)


class BatchNorm(nn.Module):
    r"""Batch-norm flow :math:`y = (x - \mu) e^{\gamma} / \sqrt{\sigma^2 + \epsilon} + \beta`.

    Log-det :math:`\sum_i \gamma_i - \frac12 \log(\sigma_i^2 + \epsilon)`. In training mode
    :math:`\mu, \sigma^2` are the batch mean and biased batch variance, and the running
    averages move towards them by ``momentum``; in evaluation mode the running averages are
    used.

    Args:
        dim: the dimension ``d`` of the inputs, shape ``(n, d)``.
        momentum: the weight of the newest batch in the running averages.
        eps: added to the variance.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)`` for ``x`` of shape ``(n, d)``."""
        if self.training:
            mean = x.mean(0)
            var = x.var(0, correction=0)
            with torch.no_grad():
                self.running_mean.mul_(1.0 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1.0 - self.momentum).add_(self.momentum * var)
        else:
            mean, var = self.running_mean, self.running_var

        y = (x - mean) * torch.exp(self.log_gamma) / torch.sqrt(var + self.eps) + self.beta
        log_det = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()

        return y, log_det.expand(x.shape[0])


class Planar(nn.Module):
    r"""Planar flow :math:`z' = z + \hat u \tanh(w^\top z + b)`.

    :math:`\hat u = u + (\operatorname{softplus}(w^\top u) - 1 - w^\top u)\, w / |w|^2` and
    log-det :math:`\log(1 + (1 - \tanh^2(w^\top z + b))\, w^\top \hat u)`. Initially
    :math:`w, b \sim U(-1/\sqrt d, 1/\sqrt d)` and
    :math:`u = \log(e - 1)\, w / |w|^2 + 0.01\, \mathcal N(0, I)`, drawn in the order
    :math:`w`, the noise of :math:`u`, :math:`b`.

    Args:
        dim: the dimension ``d`` of the inputs, shape ``(n, d)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        w = torch.empty(dim).uniform_(-bound, bound)
        noise = torch.randn(dim)
        b = torch.empty(1).uniform_(-bound, bound)
        self.w = nn.Parameter(w)
        self.u = nn.Parameter(math.log(math.e - 1.0) * w / w.dot(w) + 0.01 * noise)
        self.b = nn.Parameter(b)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(z', log_det)`` for ``z`` of shape ``(n, d)``."""
        wu = self.w.dot(self.u)
        u_hat = self.u + (F.softplus(wu) - 1.0 - wu) * self.w / self.w.dot(self.w)
        h = torch.tanh(z @ self.w + self.b)
        log_det = torch.log1p((1.0 - h.square()) * self.w.dot(u_hat))

        return z + h.unsqueeze(-1) * u_hat, log_det


class Flow(nn.Module):
    """A stack of layers over a standard Gaussian base; ``layers`` apply to data in order."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def log_prob(self, x: Tensor) -> Tensor:
        """Return the log-density of each row of ``x`` of shape ``(n, d)``."""
        log_det = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, layer_log_det = layer(x)
            log_det = log_det + layer_log_det
        base = -0.5 * (x.square().sum(-1) + x.shape[-1] * math.log(2.0 * math.pi))

        return base + log_det


def parameter_count(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def realnvp() -> Flow:
    """RealNVP for 2-D data: 8 blocks of (affine coupling with alternating masks, batch norm)."""
    layers: list[nn.Module] = []
    for k in range(BLOCKS):
        layers += [AffineCoupling(DIM, parity=k % 2, hidden=HIDDEN), BatchNorm(DIM)]
    model = Flow(layers)
    assert parameter_count(model) == PARAMETERS["realnvp"], "RealNVP has 71,744 parameters"

    return model


def planar() -> Flow:
    """A stack of 32 planar flows for 2-D data."""
    model = Flow([Planar(DIM) for _ in range(K)])
    assert parameter_count(model) == PARAMETERS["planar"], "the planar stack has 160 parameters"

    return model


def build(name: str) -> Flow:
    """Build the reference model ``name``, ``"realnvp"`` or ``"planar"``; seed torch first."""
    builders = {"realnvp": realnvp, "planar": planar}
    if name not in builders:
        raise ValueError(f"unknown reference model {name!r}; valid models: realnvp, planar")

    return builders[name]()


def as_rows(model: nn.Module, x: np.ndarray | Tensor) -> Tensor:
    """Return ``x`` as a tensor of the dtype and on the device of ``model``'s parameters."""
    reference = next(model.parameters())

    return torch.as_tensor(x, dtype=reference.dtype, device=reference.device)


def batches(n: int, generator: torch.Generator, batch_size: int = BATCH_SIZE) -> list[Tensor]:
    """Split a random permutation of ``range(n)`` into index batches of ``batch_size``.

    A last batch smaller than ``max(2, batch_size / 2)`` joins the one before it.
    """
    parts = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(parts) > 1 and len(parts[-1]) < max(2, batch_size / 2):
        parts[-2:] = [torch.cat(parts[-2:])]

    return parts


def step(model: Flow, optimizer: torch.optim.Optimizer, batch: Tensor) -> Tensor:
    """Take one Adam step on the mean NLL of ``batch``, clipped; return the detached loss."""
    optimizer.zero_grad()
    loss = -model.log_prob(batch).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()

    return loss.detach()


@torch.no_grad()
def mean_nll(model: Flow, x: np.ndarray | Tensor) -> float:
    """Return the mean NLL of the rows of ``x`` in evaluation mode; keep the model's mode."""
    was_training = model.training
    model.eval()
    nll = -model.log_prob(as_rows(model, x)).double().mean().item()
    model.train(was_training)

    return nll


def train(model: Flow, x_train: np.ndarray | Tensor, epochs: int, seed: int) -> Flow:
    """Train ``model`` on ``x_train`` by the reference recipe; return it on its best epoch.

    Adam at 1e-3, cosine-annealed per epoch to 1e-5 over ``epochs``; batches of 256 in a fresh
    order each epoch from one generator seeded with ``seed``; gradients clipped to norm 5. The
    best epoch has the lowest NLL on the whole training set in evaluation mode. The model ends
    in evaluation mode.
    """
    x = as_rows(model, x_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=LR_MIN)
    generator = torch.Generator().manual_seed(seed)
    best_nll, best_state = math.inf, copy.deepcopy(model.state_dict())

    for _ in range(epochs):
        # One pass over the data in a fresh order.
        model.train()
        for index in batches(len(x), generator):
            step(model, optimizer, x[index])
        scheduler.step()

        # Score the epoch on the training set; keep the best state.
        nll = mean_nll(model, x)
        if nll < best_nll:
            best_nll, best_state = nll, copy.deepcopy(model.state_dict())

    model.load_state_dict(best_state)
    model.eval()

    return model


def training_options(description: str) -> argparse.Namespace:
    """Read ``--epochs``, ``--seeds`` and ``--jobs`` of a script that trains runs by the recipe."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=1000, help="epochs (default 1000)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds from 0 (default 3)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2)")
    args = parser.parse_args()
    for name in ("epochs", "seeds", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    return args


def _one_thread() -> None:
    """Give a worker process one torch thread."""
    torch.set_num_threads(1)


def train_in_processes(
    train: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    jobs: int,
    describe: Callable[[Any], str],
) -> list[Any]:
    """Return ``train(*task)`` for every task, computed in ``jobs`` processes of one thread.

    Each result is reported on standard error as ``done`` and ``describe(result)`` when it
    arrives; the list keeps the order of ``tasks``.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_one_thread) as pool:
        futures = [pool.submit(train, *task) for task in tasks]
        for future in as_completed(futures):
            print(f"done {describe(future.result())}", file=sys.stderr)

    return [future.result() for future in futures]

"""Maximum-likelihood training of a flow on a fixed recipe."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from exactflow.flow import Flow


class TrainingDiverged(RuntimeError):
    """Raised when a loss or gradient becomes non-finite; names the epoch and step."""


@dataclass(frozen=True)
class Recipe:
    """The training recipe. The defaults are the reference recipe of the experiments.

    Adam at ``lr``, cosine-annealed per epoch to ``lr_min`` over ``epochs``, mini-batches of
    ``batch_size`` in a fresh random order each epoch, gradients clipped to norm ``clip``, loss
    the mean negative log-likelihood. After each epoch the model is scored on the whole training
    set in evaluation mode, and the best epoch's weights are kept.
    """

    epochs: int = 1000
    lr: float = 1e-3
    lr_min: float = 1e-5
    batch_size: int = 256
    clip: float = 5.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be in [0, lr], got {self.lr_min}")
        if self.batch_size < 2:
            raise ValueError(f"batch size must be at least 2, got {self.batch_size}")
        if not self.clip > 0:
            raise ValueError(f"clip norm must be positive, got {self.clip}")

    def as_dict(self) -> dict[str, float]:
        """Return the recipe as a plain dictionary."""
        return asdict(self)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield index batches of a random permutation of ``range(n)``.

    A last batch smaller than half of ``batch_size`` is merged into the one before it, so no
    batch is ever tiny (batch norm needs at least two points); with 4,000 points and batches of
    256 the last batch holds 160 points and stays on its own, giving 16 steps per epoch.
    """
    order = torch.randperm(n, generator=generator)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < batch_size / 2:
        starts.pop()
    ends = [*starts[1:], n]
    for start, end in zip(starts, ends, strict=True):
        yield order[start:end]


@torch.no_grad()
def evaluate_nll(flow: Flow, x: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """Return the per-point negative log-likelihood of ``x`` in evaluation mode.

    The model's train/eval flag is restored afterwards, so evaluation never changes the model.
    """
    was_training = flow.training
    flow.eval()
    try:
        nll = torch.cat([-flow.log_prob(part) for part in x.split(chunk)])
    finally:
        flow.train(was_training)

    return nll


def flatten_parameters(flow: Flow) -> torch.nn.Parameter:
    """Move the trainable parameters of ``flow`` into one flat buffer and return it.

    Each parameter, and its gradient, becomes a view into one contiguous vector, so that the
    optimizer step and gradient clipping are a handful of operations on one tensor instead of
    a few per parameter. Backward passes accumulate into the flat gradient in place. Undo with
    :func:`unflatten_parameters`.
    """
    parameters = [p for p in flow.parameters() if p.requires_grad]
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in parameters]))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in parameters:
        n = p.numel()
        p.data = flat.data[offset : offset + n].view_as(p)
        p.grad = flat.grad[offset : offset + n].view_as(p)
        offset += n

    return flat


def unflatten_parameters(flow: Flow) -> None:
    """Give every parameter of ``flow`` storage of its own again, and drop its gradient."""
    for p in flow.parameters():
        p.data = p.data.clone()
        p.grad = None


def _snapshot(flow: Flow) -> dict[str, torch.Tensor]:
    """Return a detached copy of the model's state."""
    return {name: value.detach().clone() for name, value in flow.state_dict().items()}


@dataclass
class TrainResult:
    """What a training run returns: the best epoch's NLL and the loss history."""

    best_epoch: int
    best_train_nll: float
    losses: list[float]
    seconds: float


def fit(
    flow: Flow,
    x: np.ndarray,
    recipe: Recipe,
    seed: int,
    progress: tqdm | None = None,
) -> TrainResult:
    """Train ``flow`` on the rows of ``x`` by ``recipe``; leave it with the best epoch's weights.

    Args:
        flow: the model, trained in place.
        x: training data of shape ``(n, d)``, already standardized.
        recipe: the training recipe.
        seed: seeds the batch order.
        progress: an optional progress bar advanced once per epoch.

    Returns:
        The best epoch (1-based), its training NLL in evaluation mode, the mean training loss of
        every epoch, and the wall time.

    Raises:
        TrainingDiverged: when a loss or gradient norm is not finite.
    """
    start = time.perf_counter()
    data = torch.as_tensor(x, dtype=torch.get_default_dtype())
    generator = torch.Generator().manual_seed(seed)
    flat = flatten_parameters(flow)
    optimizer = torch.optim.Adam([flat], lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=recipe.epochs, eta_min=recipe.lr_min
    )

    best_nll, best_epoch, best_state = math.inf, 0, _snapshot(flow)
    losses: list[float] = []
    for epoch in range(1, recipe.epochs + 1):
        # One pass over the data in a fresh order.
        flow.train()
        total = torch.zeros(())
        for step, index in enumerate(batches(len(data), recipe.batch_size, generator), 1):
            loss = -flow.log_prob(data[index]).mean()
            flat.grad.zero_()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(flat, recipe.clip)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                raise TrainingDiverged(
                    f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} "
                    f"at epoch {epoch}, step {step}"
                )
            optimizer.step()
            total += loss.detach() * len(index)
        scheduler.step()
        losses.append(total.item() / len(data))

        # Score the epoch in evaluation mode; keep the best weights.
        nll = evaluate_nll(flow, data).mean().item()
        if nll < best_nll:
            best_nll, best_epoch = nll, epoch
            best_state = _snapshot(flow)
        if progress is not None:
            progress.set_postfix(loss=f"{losses[-1]:.4f}", best=f"{best_nll:.4f}", refresh=False)
            progress.update()

    unflatten_parameters(flow)
    flow.load_state_dict(best_state)
    flow.eval()

    return TrainResult(best_epoch, best_nll, losses, time.perf_counter() - start)

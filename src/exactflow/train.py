"""Maximum-likelihood training of a flow: the recipe, the loop, its state for resuming."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from exactflow.flow import Flow
from exactflow.fused import FusedFlow, fuse, parameter_order
from exactflow.native import NativeFlow, adam, compile_flow


class TrainingDiverged(RuntimeError):
    """Raised when a loss or gradient becomes non-finite; names the epoch and step."""


class TrainingInterrupted(RuntimeError):
    """Raised at an epoch boundary when a stop was requested (for example by Ctrl-C)."""


@dataclass(frozen=True)
class Recipe:
    """The training recipe. The defaults are the reference recipe of the experiments.

    Adam at ``lr``, cosine-annealed per epoch to ``lr_min`` over ``epochs``, mini-batches of
    ``batch_size`` in a fresh random order each epoch, gradients clipped to norm ``clip``, loss
    the mean negative log-likelihood. A positive ``weight_decay`` shrinks every weight by
    ``lr * weight_decay`` of itself each step, apart from the gradient (AdamW); the reference
    recipe has none. After each epoch the model is scored on the whole training
    set in evaluation mode, and the best epoch's weights are kept.
    """

    epochs: int = 1000
    lr: float = 1e-3
    lr_min: float = 1e-5
    batch_size: int = 256
    clip: float = 5.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not 0 < self.lr <= 1:
            raise ValueError(f"learning rate must be in (0, 1], got {self.lr}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be in [0, lr], got {self.lr_min}")
        if self.batch_size < 2:
            raise ValueError(f"batch size must be at least 2, got {self.batch_size}")
        if not 0 < self.clip < math.inf:
            raise ValueError(f"clip norm must be positive and finite, got {self.clip}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight decay must be in [0, 1), got {self.weight_decay}")

    def learning_rate(self, epoch: int) -> float:
        r"""The learning rate after ``epoch`` finished epochs, by the cosine schedule.

        :math:`\eta_{\min} + (\eta - \eta_{\min}) (1 + \cos(\pi e / E)) / 2` for ``e = epoch``
        and ``E = epochs``: ``lr`` for the first epoch, falling to ``lr_min`` after the last.
        """
        return (
            self.lr_min
            + (self.lr - self.lr_min) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        )

    def as_dict(self) -> dict[str, float]:
        """Return the recipe as a plain dictionary."""
        return asdict(self)

    def describe(self) -> str:
        """Return the recipe's settings in one line of words."""
        text = (
            f"{self.epochs} epochs, Adam at {self.lr:g} cosine-annealed to {self.lr_min:g}, "
            f"batch {self.batch_size}, gradient norm clipped at {self.clip:g}"
        )
        if self.weight_decay:
            text += f", decoupled weight decay {self.weight_decay:g}"

        return text + ", best epoch kept"


#: The named recipes, for ``reproduce --recipe`` and ``zoo --recipe``. ``reference`` is the
#: recipe of the published figures. ``long`` is the same recipe over twice as many epochs:
#: RealNVP on Two Circles underfits after 1,000 epochs, and under the reference
#: recipe its seeds end far apart (README, "The reference experiments"). ``short`` is the
#: same recipe over 200 epochs, the default of ``zoo``: all seven models on all eight
#: datasets in 10 to 12 minutes on two cores (docs/benchmarks.md).
RECIPES: dict[str, Recipe] = {
    "reference": Recipe(),
    "long": Recipe(epochs=2000),
    "short": Recipe(epochs=200),
}


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield index batches of a random permutation of ``range(n)``.

    A last batch smaller than half of ``batch_size`` (or than two rows) is merged into the one
    before it, so no batch is ever tiny (batch norm needs at least two points); with 4,000
    points and batches of 256 the last batch holds 160 points and stays on its own, giving 16
    steps per epoch.
    """
    order = torch.randperm(n, generator=generator)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < max(2, batch_size / 2):
        starts.pop()
    ends = [*starts[1:], n]
    for start, end in zip(starts, ends, strict=True):
        yield order[start:end]


@torch.no_grad()
def evaluate_nll(
    flow: Flow,
    x: torch.Tensor,
    chunk: int = 2048,
    passes: NativeFlow | FusedFlow | None = None,
) -> torch.Tensor:
    """Return the per-point negative log-likelihood of ``x`` in evaluation mode.

    The model's train/eval flag is restored afterwards, so evaluation never changes the model.
    The rows are scored ``chunk`` at a time by the compiled passes where they apply
    (:func:`exactflow.native.compile_flow`), else by the fast passes
    (:func:`exactflow.fused.fuse`), else by the readable layers. ``passes`` gives the
    flow's passes when the caller already holds them (as :class:`Trainer` does, scoring every
    epoch); otherwise they are set up here.
    """
    x = flow.cast(x)
    if x.dim() != 2 or x.shape[-1] != flow.dim:
        passes = None
    elif passes is None:
        passes = compile_flow(flow) or fuse(flow)
    if isinstance(passes, NativeFlow):
        # The compiled passes take the mode as an argument, so the flow's flags stay as they are.
        return torch.cat([-passes.log_prob(part, training=False) for part in x.split(chunk)])

    was_training = flow.training
    flow.eval()
    log_prob = flow.log_prob if passes is None else passes.log_prob
    try:
        nll = torch.cat([-log_prob(part) for part in x.split(chunk)])
    finally:
        flow.train(was_training)

    return nll


def flatten_parameters(flow: Flow) -> torch.nn.Parameter:
    """Move the trainable parameters of ``flow`` into one flat buffer and return it.

    Each parameter, and its gradient, becomes a view into one contiguous vector, so that the
    optimizer step and gradient clipping are a handful of operations on one tensor instead of
    a few per parameter. Backward passes accumulate into the flat gradient in place. The order
    in the buffer is :func:`exactflow.fused.parameter_order`. Undo with
    :func:`unflatten_parameters`.
    """
    parameters = parameter_order(flow)
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


def _snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a detached copy of a model's state, given as its tensors by name."""
    return {name: value.detach().clone() for name, value in state.items()}


@dataclass
class Epoch:
    """What one epoch measured."""

    epoch: int
    loss: float
    train_nll: float
    val_nll: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    """What a training run returns: the best epoch and the per-epoch history."""

    best_epoch: int
    best_nll: float
    history: list[Epoch]
    seconds: float
    stopped_early: bool

    @property
    def losses(self) -> list[float]:
        """The mean training loss of every epoch."""
        return [e.loss for e in self.history]


class Trainer:
    """Train a flow by a recipe, one epoch at a time, with a state that can be saved and resumed.

    Each epoch takes one pass over the training rows in a fresh random order, then scores the
    model in evaluation mode on the training rows and, when given, the validation rows. The
    best epoch is the one with the lowest validation NLL, or training NLL without validation;
    its weights are kept. With ``patience``, training stops once that many epochs pass without
    a new best.

    The flow's parameters move into one flat buffer (see :func:`flatten_parameters`) until
    :meth:`best_flow`. Flows that compile (:func:`exactflow.native.compile_flow`) take their
    gradients from the compiled passes; others whose layers all have fast passes
    (:func:`exactflow.fused.fuse`) from those; the rest from autograd.

    Args:
        flow: the model, trained in place.
        x: training rows of shape ``(n, d)``, already standardized.
        recipe: the training recipe.
        seed: seeds the batch order.
        validation: optional validation rows of shape ``(m, d)``, standardized like ``x``.
        patience: optional early-stopping patience in epochs.
    """

    def __init__(
        self,
        flow: Flow,
        x: np.ndarray | torch.Tensor,
        recipe: Recipe,
        seed: int,
        validation: np.ndarray | torch.Tensor | None = None,
        patience: int | None = None,
    ) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be at least 1 epoch, got {patience}")

        reference = next(flow.parameters())

        def as_tensor(rows: np.ndarray | torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(rows, dtype=reference.dtype, device=reference.device)

        self.flow = flow
        self.recipe = recipe
        self.patience = patience
        self.data = as_tensor(x)
        self.validation = None if validation is None else as_tensor(validation)
        self.generator = torch.Generator().manual_seed(seed)
        names = {id(p): name for name, p in flow.named_parameters()}
        self.layout = [names[id(p)] for p in parameter_order(flow)]
        self.flat = flatten_parameters(flow)
        # The model's tensors by name, looked up once: the snapshots of every epoch copy them.
        self.state_tensors = flow.state_dict(keep_vars=True)
        self.native = compile_flow(flow)
        self.fused = None if self.native is not None else fuse(flow)
        self.optimizer = torch.optim.Adam(
            [self.flat],
            lr=recipe.lr,
            weight_decay=recipe.weight_decay,
            decoupled_weight_decay=True,
            fused=True,
        )
        # The compiled Adam step where it applies (exactflow.native.adam): the same update.
        self.optimizer_step = adam(self.optimizer) or self.optimizer.step
        self.epoch = 0
        self.best_nll = math.inf
        self.best_epoch = 0
        self.best_state = _snapshot(self.state_tensors)
        self.history: list[Epoch] = []
        self.seconds = 0.0

    @property
    def finished(self) -> bool:
        """Whether the run has done all its epochs or stopped early."""
        return self.epoch >= self.recipe.epochs or self.stopped_early

    @property
    def stopped_early(self) -> bool:
        """Whether ``patience`` epochs have passed without a new best."""
        return self.patience is not None and self.epoch - self.best_epoch >= self.patience

    @property
    def passes(self) -> NativeFlow | FusedFlow | None:
        """The compiled or fast passes this trainer scores and trains by, if any."""
        return self.native if self.native is not None else self.fused

    def step(self, batch: torch.Tensor) -> float:
        """Take one optimizer step on the rows ``batch``; return the mean loss.

        The flow must be in training mode. The gradient is clipped to the recipe's norm.

        Raises:
            TrainingDiverged: when the loss or the gradient norm is not finite.
        """
        if self.native is not None and self.native.trainable:
            loss, grad_norm = self.native.loss_backward(batch, self.recipe.clip)
        else:
            self.flat.grad.zero_()
            if self.fused is not None and self.fused.trainable:
                loss_tensor = self.fused.loss_backward(batch)
            else:
                loss_tensor = -self.flow.log_prob(batch).mean()
                loss_tensor.backward()
            norm = torch.linalg.vector_norm(self.flat.grad)
            self.flat.grad.mul_((self.recipe.clip / (norm + 1e-6)).clamp_(max=1.0))
            loss, grad_norm = loss_tensor.item(), norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise TrainingDiverged(f"non-finite {what}")
        self.optimizer_step()

        return loss

    def run_epoch(self) -> Epoch:
        """Train one epoch and score it.

        Raises:
            TrainingDiverged: when a loss or gradient norm is not finite.
        """
        start = time.perf_counter()
        self.epoch += 1
        lr = self.recipe.learning_rate(self.epoch - 1)
        self.optimizer.param_groups[0]["lr"] = lr

        # One pass over the data in a fresh order.
        if not self.flow.training:
            self.flow.train()
        total = 0.0
        for step, index in enumerate(
            batches(len(self.data), self.recipe.batch_size, self.generator), 1
        ):
            try:
                loss = self.step(self.data[index])
            except TrainingDiverged as error:
                raise TrainingDiverged(f"{error} at epoch {self.epoch}, step {step}") from None
            total += loss * len(index)

        # Score the epoch in evaluation mode; keep the best weights.
        train_nll = evaluate_nll(self.flow, self.data, passes=self.passes).mean().item()
        val_nll = math.nan
        if self.validation is not None:
            val_nll = evaluate_nll(self.flow, self.validation, passes=self.passes).mean().item()
        score = train_nll if self.validation is None else val_nll
        if score < self.best_nll:
            self.best_nll, self.best_epoch = score, self.epoch
            self.best_state = _snapshot(self.state_tensors)

        seconds = time.perf_counter() - start
        self.seconds += seconds
        record = Epoch(self.epoch, total / len(self.data), train_nll, val_nll, lr, seconds)
        self.history.append(record)

        return record

    def run(
        self, progress: tqdm | None = None, stop: Callable[[], bool] | None = None
    ) -> TrainResult:
        """Train until the recipe's last epoch or early stopping; end on the best weights.

        Args:
            progress: an optional progress bar advanced once per epoch.
            stop: an optional callable checked after every epoch; when it returns true the
                run raises :class:`TrainingInterrupted`, with this trainer still resumable.

        Raises:
            TrainingDiverged: when a loss or gradient norm is not finite.
            TrainingInterrupted: when ``stop`` asked for it.
        """
        while not self.finished:
            record = self.run_epoch()
            if progress is not None:
                shown = {"loss": f"{record.loss:.4f}", "best": f"{self.best_nll:.4f}"}
                if self.validation is not None:
                    shown["val"] = f"{record.val_nll:.4f}"
                shown["lr"] = f"{record.lr:.1e}"
                progress.set_postfix(shown, refresh=False)
                progress.update()
            if stop is not None and stop() and not self.finished:
                raise TrainingInterrupted(f"stopped after epoch {self.epoch}")

        return TrainResult(
            self.best_epoch, self.best_nll, self.history, self.seconds, self.stopped_early
        )

    def best_flow(self) -> Flow:
        """Give the parameters their own storage again and load the best epoch's weights."""
        unflatten_parameters(self.flow)
        self.flow.load_state_dict(self.best_state)
        self.flow.eval()

        return self.flow

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to resume this run exactly, as plain data and tensors."""
        return {
            "model": _snapshot(self.state_tensors),
            "layout": self.layout,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "best_nll": self.best_nll,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "history": [asdict(e) for e in self.history],
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`, so the run continues where it was.

        The state is checked against this trainer before anything is loaded: the same
        parameter layout, tensors of the same shapes and dtypes, the same optimizer settings,
        and counters that fit the recipe. The learning rate follows from the epoch and the
        recipe (:meth:`Recipe.learning_rate`).

        Raises:
            ValueError: when the state does not belong to this run or is damaged; the trainer
                is then left as it was.
        """
        if not isinstance(state, dict) or state.keys() != self.state_dict().keys():
            raise ValueError(
                "the training state is damaged or from another version of exactflow: its "
                "entries are not this trainer's"
            )
        if state["layout"] != self.layout:
            raise ValueError(
                "this training state orders the parameters differently from this version of "
                "exactflow, so its optimizer state cannot be resumed; start the run again"
            )
        problem = self._state_problem(state)
        if problem is not None:
            raise ValueError(f"the training state is damaged: {problem}")

        self.flow.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]
        self.best_nll = state["best_nll"]
        self.best_epoch = state["best_epoch"]
        self.best_state = state["best_state"]
        self.history = [Epoch(**e) for e in state["history"]]
        self.seconds = state["seconds"]

    def _state_problem(self, state: dict[str, Any]) -> str | None:
        """Say what in ``state`` does not fit this trainer, or return ``None``."""
        fresh = self.state_dict()
        for key in ("model", "best_state"):
            if not _same_tensors(state[key], fresh[key]):
                return f"its {key} does not match the model's tensors"
            if not all(torch.isfinite(t).all() for t in state[key].values()):
                return f"its {key} holds values that are not finite"
        if not _same_tensors({"g": state["generator"]}, {"g": fresh["generator"]}):
            return "its random generator state is not one"
        try:
            torch.Generator().set_state(state["generator"])
        except RuntimeError:
            return "its random generator state is not one"
        epoch, best = state["epoch"], state["best_epoch"]
        if not (_is_int(epoch) and 0 <= epoch <= self.recipe.epochs):
            return f"its epoch {epoch!r} is not a count within the recipe's {self.recipe.epochs}"
        if not (_is_int(best) and 0 <= best <= epoch):
            return f"its best epoch {best!r} is not within its {epoch} epochs"
        if not all(_is_number(state[key]) for key in ("best_nll", "seconds")):
            return "its best NLL or seconds are not numbers"
        if math.isnan(state["best_nll"]) or (best > 0) != math.isfinite(state["best_nll"]):
            return f"its best NLL {state['best_nll']!r} does not fit its best epoch {best}"
        names = {f.name for f in fields(Epoch)}
        history = state["history"]
        if not (
            isinstance(history, list)
            and len(history) == epoch
            and all(isinstance(e, dict) and e.keys() == names for e in history)
        ):
            return f"its history is not a record of its {epoch} epochs"

        optimizer, expected = state["optimizer"], fresh["optimizer"]
        if not (isinstance(optimizer, dict) and optimizer.keys() == expected.keys()):
            return "its optimizer state is not Adam's"
        groups = optimizer["param_groups"]
        if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)):
            return "its optimizer state is not Adam's"
        settings = {k: v for k, v in expected["param_groups"][0].items() if k != "lr"}
        if {k: v for k, v in groups[0].items() if k != "lr"} != settings:
            return "its optimizer settings differ from the run's recipe"
        # One parameter (the flat buffer): its moments under key 0 once a step was taken.
        moments = optimizer["state"]
        if not isinstance(moments, dict) or set(moments) != ({0} if epoch > 0 else set()):
            return "its optimizer state is not Adam's for its epochs"
        for moment in moments.values():
            like = {"exp_avg": self.flat, "exp_avg_sq": self.flat}
            if not (
                isinstance(moment, dict)
                and moment.keys() == {*like, "step"}
                and _same_tensors({k: moment[k] for k in like}, like)
                and all(moment[k].is_contiguous() for k in like)
                and isinstance(moment["step"], torch.Tensor)
                and moment["step"].numel() == 1
            ):
                return "its optimizer moments do not match the parameters"
            if (
                not all(torch.isfinite(moment[k]).all() for k in like)
                or (moment["exp_avg_sq"] < 0).any()
            ):
                return "its optimizer moments are not finite, or a squared moment is negative"
            step = moment["step"].item()
            if not (1 <= step <= 2**24 and step == int(step)):
                return f"its optimizer step count {step!r} is not a count of steps"

        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_tensors(given: Any, expected: dict[str, torch.Tensor]) -> bool:
    """Whether ``given`` maps the keys of ``expected`` to tensors of the same shapes and dtypes."""
    return (
        isinstance(given, dict)
        and given.keys() == expected.keys()
        and all(
            isinstance(given[k], torch.Tensor)
            and given[k].shape == v.shape
            and given[k].dtype == v.dtype
            for k, v in expected.items()
        )
    )


def fit(
    flow: Flow,
    x: np.ndarray,
    recipe: Recipe,
    seed: int,
    progress: tqdm | None = None,
) -> TrainResult:
    """Train ``flow`` on the rows of ``x`` by ``recipe``; leave it with the best epoch's weights.

    The best epoch is the one with the lowest training NLL in evaluation mode.

    Raises:
        TrainingDiverged: when a loss or gradient norm is not finite.
    """
    trainer = Trainer(flow, x, recipe, seed)
    try:
        result = trainer.run(progress)
    finally:
        trainer.best_flow()

    return result

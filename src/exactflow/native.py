r"""Compiled training and scoring passes for RealNVP, batch-norm and planar stacks on the CPU.

A training step of the reference models does about a hundred million floating-point operations
in a few hundred small tensor operations; eager PyTorch spends more time dispatching those than
computing them. The C extension ``exactflow._native`` does the whole step, forward and backward
through every layer, the gradient norm and its clipping, in one call: the matrix products of the
coupling nets run in register-blocked tiles with the bias and leaky ReLU fused in, and nothing
is allocated per step.

The layers in :mod:`exactflow.bijections` stay the source of truth; the tests hold these passes
to autograd through them (1e-10 in float64, 1e-5 in float32), as they hold
:mod:`exactflow.fused`, which covers more layer kinds and every device. Flows made only of
:class:`~exactflow.bijections.AffineCouplingLayer` (with the reference networks),
:class:`~exactflow.bijections.BatchNormFlow` and :class:`~exactflow.bijections.PlanarFlow`, with
float32 or float64 parameters on the CPU, compile; see :func:`compile_flow`.

Limitations:
    The extension is built when exactflow is installed, from C, and needs a C compiler then;
    where it could not be built, :func:`available` is false and training falls back to the
    passes of :mod:`exactflow.fused`. The program holds the addresses of the parameters, their
    gradients and the batch-norm buffers at compile time (and keeps those tensors alive): a
    parameter given new storage afterwards (``p.data = ...``) is not seen, so compile again.
    Where a coupling has one kept coordinate and a row lies exactly on the kink of a first-layer
    unit with a negative weight (``w x + c = 0`` with ``w < 0``), the gradient takes that
    unit's slope just below the kink, 1, where autograd takes the leaky ReLU's negative slope:
    both are one-sided derivatives, and the log-density is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from exactflow.bijections import AffineCouplingLayer, BatchNormFlow, PlanarFlow
from exactflow.flow import Flow
from exactflow.fused import reference_nets, shares_parameters

try:
    from exactflow import _native
except ImportError:
    _native = None

#: The int64 fields of one layer's record, as ``_native.c`` reads them.
RECORD = 44
PARAMETERS = 12
COUPLING, BATCHNORM, PLANAR = 1, 2, 3
#: Rows per block when scoring, as in ``_native.c``; a thread gets at least this many.
BLOCK = 256


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads, started on first use and kept for the process."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="exactflow")

    return _POOLS[threads]


def available() -> bool:
    """Whether the compiled extension was built and could be loaded."""
    return _native is not None


def _layer_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The layer's parameters in the order its record lists them."""
    if isinstance(layer, AffineCouplingLayer):
        return [
            getattr(net[i], name)
            for net in (layer.nets.scale[0], layer.nets.shift)
            for i in (0, 2, 4)
            for name in ("weight", "bias")
        ]
    if isinstance(layer, BatchNormFlow):
        return [layer.log_gamma, layer.beta]

    return [layer.w, layer.u, layer.b]


class NativeFlow:
    """The compiled passes of a flow (see :func:`compile_flow`).

    Args:
        flow: the flow; every layer a reference affine coupling, batch norm or planar layer.
        trainable: whether every parameter has a gradient tensor for :meth:`loss_backward` to
            write; without, the passes only score.
    """

    def __init__(self, flow: Flow, trainable: bool) -> None:
        reference = next(flow.parameters())
        self.flow = flow
        self.dim = flow.dim
        self.dtype = reference.dtype
        self.trainable = trainable
        self.segments = len(flow.layers)
        self.program = torch.zeros(self.segments, RECORD, dtype=torch.int64)
        self.constants = torch.zeros(self.segments, 3, dtype=torch.float64)
        # The tensors whose addresses the program holds, kept alive with it.
        self._keep: list[Tensor] = [self.program, self.constants]
        self._workspace = torch.empty(0, dtype=torch.uint8)

        for row, layer in enumerate(flow.layers):
            record = self.program[row]
            record[1] = flow.dim
            for k, p in enumerate(_layer_parameters(layer)):
                value = p.detach()
                record[4 + k] = value.data_ptr()
                record[4 + 2 * PARAMETERS + k] = value.numel()
                self._keep.append(value)
                if trainable:
                    record[4 + PARAMETERS + k] = p.grad.data_ptr()
                    self._keep.append(p.grad)
            if isinstance(layer, AffineCouplingLayer):
                record[0] = COUPLING
                record[2] = layer.nets.shift[2].weight.shape[0]
                record[3] = layer.parity
                self.constants[row, 0] = layer.nets.shift[1].negative_slope
            elif isinstance(layer, BatchNormFlow):
                record[0] = BATCHNORM
                buffers = [layer.running_mean, layer.running_var]
                buffers += [layer.batch_mean, layer.batch_var]
                for k, buffer in enumerate(buffers):
                    record[4 + 3 * PARAMETERS + k] = buffer.data_ptr()
                self._keep.extend(buffers)
                self.constants[row, 1] = layer.momentum
                self.constants[row, 2] = layer.eps
            else:
                record[0] = PLANAR

        self._batch_norms = [layer for layer in flow.layers if isinstance(layer, BatchNormFlow)]

    def _training(self, training: bool | None) -> bool:
        """``training``, or when ``None`` whether the batch-norm layers are in training mode."""
        if training is not None:
            return training
        modes = {layer.training for layer in self._batch_norms}
        if len(modes) > 1:
            raise RuntimeError("the flow's batch-norm layers are in different modes")

        return modes == {True}

    def _rows(self, x: Tensor, training: bool) -> Tensor:
        """``x`` as contiguous rows of the flow's dtype, checked."""
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected points with {self.dim} coordinates, got {tuple(x.shape)}")
        if training and self._batch_norms and x.shape[0] < 2:
            raise ValueError(
                "BatchNormFlow in training mode needs a batch of at least 2 points to estimate "
                f"its variance, got {x.shape[0]}"
            )

        return x.to(device="cpu", dtype=self.dtype).contiguous()

    def _arguments(self, x: Tensor) -> tuple[bool, int, int, int, int, int]:
        return (
            self.dtype == torch.float64,
            self.program.data_ptr(),
            self.constants.data_ptr(),
            self.segments,
            x.data_ptr(),
            x.shape[0],
        )

    def _workspace_of(self, nbytes: int) -> Tensor:
        """The kept workspace, grown to at least ``nbytes``."""
        if self._workspace.numel() < nbytes:
            self._workspace = torch.empty(nbytes, dtype=torch.uint8)

        return self._workspace

    @torch.no_grad()
    def log_prob(self, x: Tensor, training: bool | None = None) -> Tensor:
        """Return the log-density of each row of ``x`` of shape ``(n, d)``, without gradients.

        ``training`` says whether batch-norm layers use (and record) the statistics of ``x``
        or their running ones; by default, as the layers' own mode says. In evaluation mode the
        rows are scored in blocks, spread over ``torch.get_num_threads()`` threads when there
        are enough of them.
        """
        training = self._training(training)
        x = self._rows(x, training)
        n = x.shape[0]
        out = torch.empty(n, dtype=self.dtype)
        if n == 0:
            return out
        threads = 1 if training else max(1, min(torch.get_num_threads(), n // BLOCK))
        parts = list(zip(x.chunk(threads), out.chunk(threads), strict=True))

        def score(rows: Tensor, result: Tensor, kept: bool) -> None:
            arguments = self._arguments(rows)
            nbytes = _native.log_prob_workspace(*arguments, 0, 0, 0, training)
            if kept:
                workspace = self._workspace_of(nbytes)
            else:
                workspace = torch.empty(nbytes, dtype=torch.uint8)
            _native.log_prob(
                *arguments, result.data_ptr(), workspace.data_ptr(), workspace.numel(), training
            )

        if threads == 1:
            score(x, out, kept=True)
        else:
            pool = _pool(threads)
            for done in [pool.submit(score, rows, result, False) for rows, result in parts]:
                done.result()

        return out

    @torch.no_grad()
    def loss_backward(
        self, x: Tensor, clip: float = math.inf, training: bool | None = None
    ) -> tuple[float, float]:
        """Return the mean NLL of ``x`` and its gradient's norm; write the clipped gradient.

        Each parameter's gradient is overwritten with the gradient of the mean negative
        log-likelihood, scaled by ``min(1, clip / (norm + 1e-6))`` as
        :func:`torch.nn.utils.clip_grad_norm_` does. In training mode (``training``, by default
        the layers' own mode), batch-norm layers use and record the statistics of ``x``, as the
        readable layers do.

        Raises:
            RuntimeError: when the flow was compiled without gradients.
        """
        if not self.trainable:
            raise RuntimeError(
                "NativeFlow.loss_backward needs a flow compiled with its parameters' gradients"
            )
        training = self._training(training)
        x = self._rows(x, training)
        arguments = self._arguments(x)
        nbytes = _native.loss_backward_workspace(*arguments, 0, 0, training, clip)
        workspace = self._workspace_of(nbytes)

        return _native.loss_backward(
            *arguments, workspace.data_ptr(), workspace.numel(), training, clip
        )


def adam(optimizer: torch.optim.Adam) -> Callable[[], None] | None:
    """Return a compiled step of ``optimizer``, or ``None`` where it does not apply.

    It applies to an Adam optimizer of one parameter, a contiguous float32 or float64 tensor on
    the CPU, with decoupled weight decay (or none), without AMSGrad or maximisation. The step
    keeps its moments and count in the optimizer's own state, as
    :meth:`torch.optim.Adam.step` does, so the state saves and loads alike, and computes the
    same update in one pass over the parameters; the learning rate is read from the
    optimizer's group at each step, where a schedule sets it.
    """
    groups = optimizer.param_groups
    if _native is None or len(groups) != 1 or len(groups[0]["params"]) != 1:
        return None
    group = groups[0]
    param = group["params"][0]
    if (
        group["amsgrad"]
        or group["maximize"]
        or group["differentiable"]
        or (group["weight_decay"] and not group["decoupled_weight_decay"])
        or param.device.type != "cpu"
        or param.dtype not in (torch.float32, torch.float64)
        or not param.is_contiguous()
    ):
        return None

    def step() -> None:
        # Loading a state dict replaces the group, so it is looked up at every step.
        group = optimizer.param_groups[0]
        state = optimizer.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        moments = (state["exp_avg"], state["exp_avg_sq"])
        if not all(
            m.is_contiguous() and m.dtype == param.dtype and m.shape == param.shape
            for m in moments
        ):
            raise RuntimeError("Adam's moments are not contiguous tensors shaped like the weights")
        count = state["step"]
        count += 1
        beta1, beta2 = group["betas"]
        _native.adam(
            param.dtype == torch.float64,
            param.data_ptr(),
            param.grad.data_ptr(),
            moments[0].data_ptr(),
            moments[1].data_ptr(),
            param.numel(),
            int(count),
            group["lr"],
            beta1,
            beta2,
            group["eps"],
            group["weight_decay"],
        )

    return step


def compile_flow(flow: Flow) -> NativeFlow | None:
    """Return the compiled passes of ``flow``, or ``None`` where they do not apply.

    They apply when the extension is available and every layer is a reference affine coupling
    (leaky-ReLU nets, tanh on the scale; :func:`exactflow.fused.reference_nets`), a batch-norm
    flow or a planar flow, with contiguous float32 or float64 tensors on the CPU, and no
    parameter serves twice (:func:`exactflow.fused.shares_parameters`). They train
    when every parameter has a gradient tensor, as in :class:`~exactflow.train.Trainer`;
    otherwise they only score.
    """
    if _native is None or not flow.layers or shares_parameters(flow):
        return None
    for layer in flow.layers:
        if isinstance(layer, AffineCouplingLayer):
            if not reference_nets(layer):
                return None
        elif not isinstance(layer, BatchNormFlow | PlanarFlow):
            return None

    tensors = list(flow.parameters()) + list(flow.buffers())
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or not all(
        t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors
    ):
        return None
    grads = [p.grad for p in flow.parameters()]
    trainable = all(
        g is not None and g.dtype == dtype and g.is_contiguous() and g.device.type == "cpu"
        for g in grads
    )

    return NativeFlow(flow, trainable)

r"""Hand-derived training passes in PyTorch for planar, radial, Glow and RealNVP stacks.

The layers in :mod:`exactflow.bijections` are the source of truth: readable, one module per
family, differentiated by autograd. On the tiny networks of the reference experiments, autograd
and the per-operation overhead of eager PyTorch cost several times more than the arithmetic.
This module computes the same mathematics with far fewer operations, on any device, for flows
built from :class:`~exactflow.bijections.AffineCouplingLayer`,
:class:`~exactflow.bijections.BatchNormFlow`, :class:`~exactflow.bijections.ActNorm`,
:class:`~exactflow.bijections.LULinear`, :class:`~exactflow.bijections.PlanarFlow` and
:class:`~exactflow.bijections.RadialFlow`. On the CPU, :mod:`exactflow.native` goes further for
the layers it covers, with one compiled call per step. Here:

* the scale and shift networks of a coupling layer run as one batched product, and only the
  columns and rows that the mask lets matter are multiplied (the kept coordinates feed the
  first layer; only the free coordinates leave the last one);
* a run of planar layers does three operations per layer forward and three backward; the
  reparametrisation of :math:`\hat u`, the log-dets and the parameter gradients are computed
  for all layers at once;
* a run of radial layers computes per layer only the products with the offsets from the
  centres; the log-dets and all derivatives in the radii come for all layers at once;
* the backward pass of the mean negative log-likelihood is written out by hand and writes each
  gradient straight into the parameters' ``.grad``, without an autograd graph.

The weights are read, without copies, as strided views of the flat parameter buffer that
:class:`~exactflow.train.Trainer` builds, so optimizer steps show up at once. The tests check
every pass against autograd through the readable layers, to 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from exactflow.bijections import (
    ActNorm,
    AffineCouplingLayer,
    BatchNormFlow,
    Bijection,
    LULinear,
    PlanarFlow,
    RadialFlow,
)
from exactflow.flow import Flow, standard_normal_log_prob

_leaky_relu_backward = torch.ops.aten.leaky_relu_backward
_tanh_backward = torch.ops.aten.tanh_backward


def _stacked(tensors: Sequence[Tensor | None]) -> Tensor | None:
    """Return the tensors stacked along a new first axis, as a view when their storage allows.

    When the tensors lie at evenly spaced offsets of one storage with equal strides, as the
    parameters and gradients in a flat buffer do, the result is a view, so later in-place
    changes of either side show up in the other. Otherwise it is a copy. ``None`` when any
    tensor is ``None`` (a parameter without a gradient).
    """
    if any(t is None for t in tensors):
        return None
    first = tensors[0]
    offsets = [t.storage_offset() for t in tensors]
    spacing = offsets[1] - offsets[0] if len(tensors) > 1 else first.numel()
    shared = all(
        t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.shape == first.shape
        and t.stride() == first.stride()
        and offset == offsets[0] + k * spacing
        for k, (t, offset) in enumerate(zip(tensors, offsets, strict=True))
    )
    if shared and spacing > 0:
        return first.as_strided((len(tensors), *first.shape), (spacing, *first.stride()))

    return torch.stack(list(tensors))


class _Weights:
    """The stacked values of some parameters and, for training, their stacked gradients."""

    def __init__(self, parameters: Sequence[nn.Parameter]) -> None:
        self.value = _stacked([p.detach() for p in parameters])
        self.grad = _stacked([p.grad for p in parameters])
        self.live = self.value.data_ptr() == parameters[0].data_ptr() and (
            self.grad is not None and self.grad.data_ptr() == parameters[0].grad.data_ptr()
        )


class _Coupling:
    """An affine coupling layer: both nets in batched products, masked rows and columns skipped.

    Index 0 of every stacked weight is the scale net, index 1 the shift net.
    """

    def __init__(self, layer: AffineCouplingLayer) -> None:
        scale, shift = layer.nets.scale[0], layer.nets.shift
        self.layers = 1
        self.slope = scale[1].negative_slope
        self.kept = slice(layer.parity, layer.dim, 2)
        self.free = slice(1 - layer.parity, layer.dim, 2)
        depths = (0, 2, 4)
        self.w1, self.w2, self.w3 = (_Weights([scale[i].weight, shift[i].weight]) for i in depths)
        self.b1, self.b2, self.b3 = (_Weights([scale[i].bias, shift[i].bias]) for i in depths)
        self.live = all(w.live for w in (self.w1, self.w2, self.w3, self.b1, self.b2, self.b3))
        # Views into the weights read by the passes: the kept columns of the first layer, the
        # free rows of the last; as views of the flat buffer they follow the training.
        self.w1k = self.w1.value[:, :, self.kept]
        self.b1u = self.b1.value.unsqueeze(1)
        self.w2t = self.w2.value.mT
        self.b2u = self.b2.value.unsqueeze(1)
        self.w3j = self.w3.value[:, self.free, :]
        self.b3j = self.b3.value[:, self.free].unsqueeze(1)
        if self.live:
            self.grad_w1k = self.w1.grad[:, :, self.kept]
            self.grad_w3j = self.w3.grad[:, self.free, :]
            self.grad_b3j = self.b3.grad[:, self.free]

    @staticmethod
    def order(layer: AffineCouplingLayer) -> list[nn.Parameter]:
        """The layer's parameters in the order that makes every stacked weight contiguous."""
        scale, shift = layer.nets.scale[0], layer.nets.shift

        return [
            getattr(net[i], name)
            for i in (0, 2, 4)
            for name in ("weight", "bias")
            for net in (scale, shift)
        ]

    def forward(self, x: Tensor, save: bool) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)``; with ``save``, keep what the backward pass needs."""
        xk, xj = x[:, self.kept], x[:, self.free]
        w1k = self.w1k.mT.contiguous()
        if xk.shape[1] == 1:
            a1 = torch.addcmul(self.b1u, xk, w1k)
        else:
            a1 = torch.baddbmm(self.b1u, xk.expand(2, *xk.shape), w1k)
        h1 = torch.nn.functional.leaky_relu(a1, self.slope)
        h2 = torch.nn.functional.leaky_relu(torch.baddbmm(self.b2u, h1, self.w2t), self.slope)
        out = torch.baddbmm(self.b3j, h2, self.w3j.mT)
        s, t = torch.tanh(out[0]), out[1]
        scale = torch.exp(s)
        y = x.clone()
        y[:, self.free] = torch.addcmul(t, xj, scale)
        if save:
            self.saved = (xk, xj, w1k, h1, h2, s, scale)

        return y, s.sum(-1)

    def backward(self, grad_y: Tensor, grad_log_det: float) -> Tensor:
        """Write the parameter gradients; return the gradient with respect to the input."""
        xk, xj, w1k, h1, h2, s, scale = self.saved
        del self.saved

        grad_free = grad_y[:, self.free]
        grad_xj = grad_free * scale
        grad_s = grad_xj * xj + grad_log_det
        grad_out = torch.stack((_tanh_backward(grad_s, s), grad_free))
        self.grad_w3j.copy_(torch.bmm(grad_out.mT, h2))
        torch.sum(grad_out, 1, out=self.grad_b3j)

        grad_a2 = _leaky_relu_backward(torch.bmm(grad_out, self.w3j), h2, self.slope, True)
        torch.bmm(grad_a2.mT, h1, out=self.w2.grad)
        torch.sum(grad_a2, 1, out=self.b2.grad)

        grad_a1 = _leaky_relu_backward(torch.bmm(grad_a2, self.w2.value), h1, self.slope, True)
        self.grad_w1k.copy_(torch.bmm(grad_a1.mT, xk.expand(2, *xk.shape)))
        torch.sum(grad_a1, 1, out=self.b1.grad)

        grad_x = grad_y.clone()
        grad_x[:, self.kept] += torch.bmm(grad_a1, w1k.mT).sum(0)
        grad_x[:, self.free] = grad_xj

        return grad_x


class _BatchNorm:
    """A batch-norm flow layer, its backward pass including that of its log-det."""

    def __init__(self, layer: BatchNormFlow) -> None:
        self.layer = layer
        self.layers = 1
        self.log_gamma = _Weights([layer.log_gamma])
        self.beta = _Weights([layer.beta])
        self.live = self.log_gamma.live and self.beta.live

    def forward(self, x: Tensor, save: bool) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)``, updating the running statistics in training mode."""
        layer = self.layer
        if layer.training:
            mean, var = layer._statistics(x)
        else:
            mean, var = layer._statistics(None)
        inv_std = torch.rsqrt(var + layer.eps)
        x_hat = (x - mean) * inv_std
        gamma = torch.exp(self.log_gamma.value[0])
        y = torch.addcmul(self.beta.value[0], x_hat, gamma)
        if save:
            self.saved = (x_hat, inv_std, gamma)

        return y, (self.log_gamma.value[0] + torch.log(inv_std)).sum()

    def backward(self, grad_y: Tensor, grad_log_det: float) -> Tensor:
        r"""Write the parameter gradients; return the gradient with respect to the input.

        With training-mode statistics, the mean and variance depend on every row; the
        log-det term :math:`-\tfrac12 \log(\sigma^2 + \epsilon)` adds its own share.
        """
        x_hat, inv_std, gamma = self.saved
        del self.saved
        n = grad_y.shape[0]
        total_log_det = grad_log_det * n

        self.beta.grad[0].copy_(grad_y.sum(0))
        self.log_gamma.grad[0].copy_((grad_y * x_hat).sum(0) * gamma + total_log_det)
        grad_x_hat = grad_y * gamma
        centred = (grad_x_hat * x_hat).mean(0) + total_log_det / n

        return inv_std * (grad_x_hat - grad_x_hat.mean(0) - x_hat * centred)


class _ActNorm:
    """An actnorm layer; a first training batch initialises it, as in the readable layer."""

    def __init__(self, layer: ActNorm) -> None:
        self.layer = layer
        self.layers = 1
        self.log_scale = _Weights([layer.log_scale])
        self.shift = _Weights([layer.shift])
        self.live = self.log_scale.live and self.shift.live

    def forward(self, x: Tensor, save: bool) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)``; with ``save``, keep what the backward pass needs."""
        if self.layer.training and not self.layer.initialized:
            self.layer._initialize(x)
        log_scale = self.log_scale.value[0]
        scale = torch.exp(log_scale)
        if save:
            self.saved = (x, scale)

        return torch.addcmul(self.shift.value[0], x, scale), log_scale.sum()

    def backward(self, grad_y: Tensor, grad_log_det: float) -> Tensor:
        """Write the parameter gradients; return the gradient with respect to the input."""
        x, scale = self.saved
        del self.saved
        self.shift.grad[0].copy_(grad_y.sum(0))
        grad_log_scale = torch.linalg.vecdot(grad_y.mT, x.mT) * scale
        self.log_scale.grad[0].copy_(grad_log_scale + grad_log_det * grad_y.shape[0])

        return grad_y * scale


class _LULinear:
    r"""An LU-factored linear layer :math:`y = x W^\top`, :math:`W = P L U`, by hand both ways."""

    def __init__(self, layer: LULinear) -> None:
        self.layer = layer
        self.layers = 1
        self.lower = _Weights([layer.lower])
        self.upper = _Weights([layer.upper])
        self.log_abs_diagonal = _Weights([layer.log_abs_diagonal])
        self.live = self.lower.live and self.upper.live and self.log_abs_diagonal.live
        self.unpermutation = torch.argsort(layer.permutation)
        self.rows, self.cols = torch.tril_indices(
            layer.dim, layer.dim, -1, device=layer.log_abs_diagonal.device
        )

    def forward(self, x: Tensor, save: bool) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)``; with ``save``, keep what the backward pass needs."""
        lower, upper = self.layer.factors()
        weight = (lower @ upper)[self.layer.permutation]
        if save:
            self.saved = (x, lower, upper, weight)

        return x @ weight.T, self.layer.log_abs_diagonal.sum()

    def backward(self, grad_y: Tensor, grad_log_det: float) -> Tensor:
        """Write the parameter gradients; return the gradient with respect to the input."""
        x, lower, upper, weight = self.saved
        del self.saved
        # With M = L U and W = M[P]: dM = dW[P^-1], dL = dM U^T, dU = L^T dM.
        grad_product = (grad_y.T @ x)[self.unpermutation]
        grad_lower = grad_product @ upper.T
        grad_upper = lower.T @ grad_product
        self.lower.grad[0].copy_(grad_lower[self.rows, self.cols])
        self.upper.grad[0].copy_(grad_upper[self.cols, self.rows])
        diagonal = torch.diagonal(upper)
        grad_diagonal = torch.diagonal(grad_upper) * diagonal + grad_log_det * grad_y.shape[0]
        self.log_abs_diagonal.grad[0].copy_(grad_diagonal)

        return grad_y @ weight


class _PlanarStack:
    """A run of planar layers: three operations per layer each way, the rest for all at once."""

    def __init__(self, layers: Sequence[PlanarFlow]) -> None:
        self.layers = len(layers)
        self.w = _Weights([layer.w for layer in layers])
        self.u = _Weights([layer.u for layer in layers])
        self.b = _Weights([layer.b for layer in layers])
        self.live = self.w.live and self.u.live and self.b.live
        # One view per layer, taken once: as views they follow the training.
        self.w_rows = self.w.value.unbind(0)
        self.b_rows = self.b.value.unbind(0)

    def _u_hat(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Return ``u_hat``, ``c = w^T u_hat`` and what the backward pass of both needs."""
        w, u = self.w.value, self.u.value
        wu = (w * u).sum(1)
        ww = (w * w).sum(1)
        coefficient = (torch.nn.functional.softplus(wu) - 1.0 - wu) / ww
        u_hat = torch.addcmul(u, coefficient.unsqueeze(1), w)

        return u_hat, (w * u_hat).sum(1), wu, ww, coefficient

    def forward(self, x: Tensor, save: bool) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)``; with ``save``, keep what the backward pass needs."""
        u_hat, c, wu, ww, coefficient = self._u_hat()
        inputs, tanhs = [], []
        for w, b, u in zip(self.w_rows, self.b_rows, u_hat.unbind(0), strict=True):
            inputs.append(x)
            h = torch.tanh(torch.addmv(b, x, w))
            tanhs.append(h)
            x = torch.addr(x, h, u)
        h = torch.stack(tanhs)
        q = 1.0 - h.square()
        log_det = torch.log1p(q * c.unsqueeze(1)).sum(0)
        if save:
            self.saved = (torch.stack(inputs), h, q, u_hat, c, wu, ww, coefficient)

        return x, log_det

    def backward(self, grad_y: Tensor, grad_log_det: float) -> Tensor:
        """Write the parameter gradients; return the gradient with respect to the input."""
        inputs, h, q, u_hat, c, wu, ww, coefficient = self.saved
        del self.saved
        w, u = self.w.value, self.u.value

        # log_det_k = log(1 + q_k c_k) with q_k = 1 - h_k^2.
        d = torch.addcmul(torch.ones_like(q), q, c.unsqueeze(1))
        grad_h_log_det = (-2.0 * grad_log_det) * h * c.unsqueeze(1) / d
        grad_c = grad_log_det * (q / d).sum(1)

        grad_outputs, grad_a = [], []
        grad = grad_y
        layers = zip(
            self.w_rows, u_hat.unbind(0), q.unbind(0), grad_h_log_det.unbind(0), strict=True
        )
        for w_k, u_k, q_k, grad_h_k in reversed(list(layers)):
            grad_outputs.append(grad)
            g = torch.addmv(grad_h_k, grad, u_k) * q_k
            grad_a.append(g)
            grad = torch.addr(grad, g, w_k)
        grad_outputs = torch.stack(grad_outputs[::-1])
        grad_a = torch.stack(grad_a[::-1])

        grad_u_hat = torch.bmm(h.unsqueeze(1), grad_outputs).squeeze(1)
        grad_u_hat += grad_c.unsqueeze(1) * w
        grad_w = torch.bmm(grad_a.unsqueeze(1), inputs).squeeze(1)
        grad_w += grad_c.unsqueeze(1) * u_hat

        # u_hat = u + coefficient * w, coefficient = (softplus(wu) - 1 - wu) / ww.
        grad_coefficient = (grad_u_hat * w).sum(1)
        grad_wu = grad_coefficient * (torch.sigmoid(wu) - 1.0) / ww
        grad_ww = -grad_coefficient * coefficient / ww
        grad_w += coefficient.unsqueeze(1) * grad_u_hat
        grad_w += grad_wu.unsqueeze(1) * u + (2.0 * grad_ww).unsqueeze(1) * w

        self.w.grad.copy_(grad_w)
        self.u.grad.copy_(grad_u_hat + grad_wu.unsqueeze(1) * w)
        self.b.grad.copy_(grad_a.sum(1, keepdim=True))

        return grad


class _RadialStack:
    r"""A run of radial layers: six operations per layer forward, four backward.

    Layer :math:`k` maps :math:`x` to :math:`z_0 + s\,(x - z_0)` with :math:`r = \lVert x - z_0
    \rVert` and :math:`s = (c + r) / (a + r)`, where :math:`a = \alpha` and :math:`c = \alpha +
    \beta` (see :class:`~exactflow.bijections.RadialFlow`). Only the products with the offsets
    run per layer; the log-dets and every derivative in :math:`r`, :math:`a` and :math:`c` are
    computed for all layers at once.
    """

    def __init__(self, layers: Sequence[RadialFlow]) -> None:
        self.layers = len(layers)
        self.dim = layers[0].dim
        self.z0 = _Weights([layer.z0 for layer in layers])
        self.alpha_tilde = _Weights([layer.alpha_tilde for layer in layers])
        self.beta_tilde = _Weights([layer.beta_tilde for layer in layers])
        self.live = self.z0.live and self.alpha_tilde.live and self.beta_tilde.live
        self.z0_rows = self.z0.value.unbind(0)

    def forward(self, x: Tensor, save: bool) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)``; with ``save``, keep what the backward pass needs."""
        a = torch.nn.functional.softplus(self.alpha_tilde.value)
        c = torch.nn.functional.softplus(self.beta_tilde.value)
        offsets, radii = [], []
        for z0, a_k, c_k in zip(self.z0_rows, a.unbind(0), c.unbind(0), strict=True):
            offset = x - z0
            r = torch.linalg.vector_norm(offset, dim=1)
            offsets.append(offset)
            radii.append(r)
            x = torch.addcmul(z0, ((c_k + r) / (a_k + r)).unsqueeze(1), offset)
        r = torch.stack(radii)
        log_a_r = torch.log(a + r)
        along = torch.addcmul(a * c, r, 2.0 * a + r)
        log_det = (self.dim - 1) * (torch.log(c + r) - log_a_r) + torch.log(along) - 2.0 * log_a_r
        if save:
            self.saved = (torch.stack(offsets), r, a, c, along)

        return x, log_det.sum(0)

    def backward(self, grad_y: Tensor, grad_log_det: float) -> Tensor:
        """Write the parameter gradients; return the gradient with respect to the input."""
        offsets, r, a, c, along = self.saved
        del self.saved
        d = self.dim - 1
        inv_a_r = 1.0 / (a + r)
        inv_c_r = 1.0 / (c + r)
        s = (c + r) * inv_a_r
        # Per unit of offset: at r = 0 the offset is zero and so is its term, as in autograd.
        inv_r = 1.0 / r.clamp_min(torch.finfo(r.dtype).tiny)
        ds_dr = (a - c) * inv_a_r.square() * inv_r
        dlog_det_dr = d * (inv_c_r - inv_a_r) + 2.0 * (a + r) / along - 2.0 * inv_a_r
        radial_term = grad_log_det * dlog_det_dr * inv_r

        grads, dots = [grad_y], []
        grad = grad_y
        layers = zip(
            offsets.unbind(0), s.unbind(0), ds_dr.unbind(0), radial_term.unbind(0), strict=True
        )
        for offset, s_k, ds_dr_k, radial_k in reversed(list(layers)):
            dot = torch.linalg.vecdot(grad, offset)
            dots.append(dot)
            coefficient = torch.addcmul(radial_k, ds_dr_k, dot)
            grad = torch.addcmul(s_k.unsqueeze(1) * grad, coefficient.unsqueeze(1), offset)
            grads.append(grad)
        dots = torch.stack(dots[::-1])
        sums = torch.stack(grads[::-1]).sum(1)

        grad_a = (-dots * s * inv_a_r).sum(1, keepdim=True) + grad_log_det * (
            (-(d + 2.0) * inv_a_r + (2.0 * r + c) / along).sum(1, keepdim=True)
        )
        grad_c = (dots * inv_a_r).sum(1, keepdim=True) + grad_log_det * (
            (d * inv_c_r + a / along).sum(1, keepdim=True)
        )
        self.z0.grad.copy_(sums[1:] - sums[:-1])
        self.alpha_tilde.grad.copy_(grad_a * torch.sigmoid(self.alpha_tilde.value))
        self.beta_tilde.grad.copy_(grad_c * torch.sigmoid(self.beta_tilde.value))

        return grad


_Segment = _Coupling | _BatchNorm | _ActNorm | _LULinear | _PlanarStack | _RadialStack


class FusedFlow:
    """The fast passes of a flow whose layers all have one (see :func:`fuse`).

    Built on a model whose parameters lie in one flat buffer with gradients (as in
    :class:`~exactflow.train.Trainer`), it follows the weights as they train and can take
    gradients; built on any other model, it holds a copy of the weights and only evaluates.
    """

    def __init__(self, flow: Flow, segments: Sequence[_Segment]) -> None:
        self.flow = flow
        self.segments = list(segments)
        self.trainable = all(segment.live for segment in self.segments)

    def _forward(self, x: Tensor, save: bool) -> tuple[Tensor, Tensor]:
        """Return the log-density of each row of ``x`` and its image in the latent space."""
        log_det = x.new_zeros(x.shape[0])
        for segment in self.segments:
            x, ld = segment.forward(x, save)
            log_det = log_det + ld

        return standard_normal_log_prob(x) + log_det, x

    @torch.no_grad()
    def log_prob(self, x: Tensor) -> Tensor:
        """Return the log-density of each row of ``x`` of shape ``(n, d)``, without gradients."""
        log_p, _ = self._forward(x, save=False)

        return log_p

    @torch.no_grad()
    def loss_backward(self, x: Tensor) -> Tensor:
        """Return the mean negative log-likelihood of ``x``; write its gradient to ``.grad``.

        Each gradient is overwritten, not accumulated. In training mode, batch-norm layers use
        and record the statistics of ``x``, as the readable layers do.

        Raises:
            RuntimeError: when the parameters do not lie in one flat buffer with gradients.
        """
        if not self.trainable:
            raise RuntimeError(
                "FusedFlow.loss_backward needs the parameters in one flat buffer with "
                "gradients, as exactflow.train.Trainer arranges them"
            )
        log_p, z = self._forward(x, save=True)
        n = x.shape[0]
        grad = z / n
        for segment in reversed(self.segments):
            grad = segment.backward(grad, -1.0 / n)

        return -log_p.mean()


def shares_parameters(flow: Flow) -> bool:
    """Whether a parameter appears in more than one place of the flow (a layer used twice).

    Passes that write each layer's gradient into its parameters' ``.grad`` would overwrite
    where autograd adds, so such flows train through autograd.
    """
    seen = [
        id(p) for layer in flow.layers for _, p in layer.named_parameters(remove_duplicate=False)
    ]

    return len(seen) != len(set(seen))


def fuse(flow: Flow) -> FusedFlow | None:
    """Return the fast passes of ``flow``, or ``None`` when a layer has no fast form.

    Affine couplings (with the reference networks), batch-norm flows, actnorm, LU-factored
    linear layers, planar and radial layers have one; consecutive planar layers are fused into
    one stack, as are consecutive radial ones. A flow that uses a parameter in two places
    (:func:`shares_parameters`) has none.
    """
    if shares_parameters(flow):
        return None
    segments: list[_Segment] = []
    run: list[Bijection] = []
    for layer in [*flow.layers, None]:
        if run and type(layer) is not type(run[0]):
            stack = _PlanarStack if isinstance(run[0], PlanarFlow) else _RadialStack
            segments.append(stack(run))
            run = []
        if layer is None:
            break
        if isinstance(layer, PlanarFlow | RadialFlow):
            run.append(layer)
        elif isinstance(layer, AffineCouplingLayer) and reference_nets(layer):
            segments.append(_Coupling(layer))
        elif isinstance(layer, BatchNormFlow):
            segments.append(_BatchNorm(layer))
        elif isinstance(layer, ActNorm):
            segments.append(_ActNorm(layer))
        elif isinstance(layer, LULinear):
            segments.append(_LULinear(layer))
        else:
            return None

    return FusedFlow(flow, segments)


def parameter_order(flow: Flow) -> list[nn.Parameter]:
    """Return the trainable parameters of ``flow``, in the order the fast passes read best.

    Within each affine coupling the scale and shift nets' weights of one depth come together,
    so that their stacked views in a flat buffer are contiguous; all else keeps its order. A
    parameter serving in two places is listed once, where it first appears.
    """
    ordered: list[nn.Parameter] = []
    for layer in flow.layers:
        if isinstance(layer, AffineCouplingLayer) and reference_nets(layer):
            ordered.extend(_Coupling.order(layer))
        else:
            ordered.extend(layer.parameters())
    unique = list({id(p): p for p in ordered}.values())

    return [p for p in unique if p.requires_grad]


def reference_nets(layer: AffineCouplingLayer) -> bool:
    """Whether the coupling's nets are the reference ones: leaky-ReLU MLPs, tanh on the scale."""
    scale, shift = layer.nets.scale, layer.nets.shift
    shapes = [
        (type(m), getattr(m, "weight", torch.empty(0)).shape, getattr(m, "negative_slope", None))
        for m in (*scale[0], *shift)
    ]
    expected = [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear] * 2

    return (
        len(scale) == 2
        and isinstance(scale[1], nn.Tanh)
        and [kind for kind, _, _ in shapes] == expected
        and shapes[:5] == shapes[5:]
        and shapes[1][2] == shapes[3][2]
    )

"""The fast passes of exactflow.fused against autograd through the readable layers."""

from __future__ import annotations

import copy

import pytest
import torch

from exactflow.bijections import (
    ActNorm,
    AffineCouplingLayer,
    BatchNormFlow,
    LULinear,
    PlanarFlow,
    RadialFlow,
)
from exactflow.flow import Flow
from exactflow.fused import fuse, parameter_order
from exactflow.models import build
from exactflow.train import Recipe, Trainer, evaluate_nll, flatten_parameters


def mixed(dim: int) -> Flow:
    """Planar and radial runs around couplings and normalising layers: every kind of segment."""
    layers = [
        PlanarFlow(dim),
        PlanarFlow(dim),
        AffineCouplingLayer(dim, parity=1, hidden=16),
        ActNorm(dim),
        LULinear(dim),
        RadialFlow(dim),
        RadialFlow(dim),
        BatchNormFlow(dim),
        PlanarFlow(dim),
        RadialFlow(dim),
        AffineCouplingLayer(dim, parity=0, hidden=16),
    ]
    return Flow(layers, dim)


FLOWS = {
    "realnvp-2d": lambda: build("realnvp", 2),
    "realnvp-5d": lambda: build("realnvp", 5, blocks=3, hidden=16),
    "planar-2d": lambda: build("planar", 2),
    "planar-3d": lambda: build("planar", 3, K=5),
    "radial-2d": lambda: build("radial", 2),
    "radial-3d": lambda: build("radial", 3, K=5),
    # Eight perturbed glow blocks grow gradients to hundreds, past 1e-5 by float32 rounding.
    "glow-2d": lambda: build("glow", 2, blocks=3),
    "glow-4d": lambda: build("glow", 4, blocks=3, hidden=16),
    "mixed-2d": lambda: mixed(2),
    "mixed-3d": lambda: mixed(3),
}


def perturbed(name: str, dtype: torch.dtype) -> Flow:
    """The flow ``name`` with every parameter and batch statistic moved off its initial value."""
    torch.manual_seed(0)

    return perturb(FLOWS[name]().to(dtype))


def perturb(flow: Flow) -> Flow:
    """Move every parameter and batch statistic of ``flow`` off its initial value, in place."""
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for layer in flow.layers:
            if isinstance(layer, BatchNormFlow):
                layer.running_mean.normal_(0.0, 0.3)
                layer.running_var.uniform_(0.5, 2.0)
            if isinstance(layer, ActNorm):
                layer.initialized.fill_(True)

    return flow


def points(dim: int, dtype: torch.dtype, n: int = 96) -> torch.Tensor:
    return (1.5 * torch.randn(n, dim, generator=torch.Generator().manual_seed(1))).to(dtype)


def autograd_reference(flow: Flow, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss and gradients by autograd through the readable layers, in training mode."""
    flow.train()
    flow.zero_grad()
    loss = -flow.log_prob(x).mean()
    loss.backward()

    return loss.detach(), {name: p.grad.clone() for name, p in flow.named_parameters()}


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_loss_and_gradients_match_autograd(name, dtype, tolerance, one_thread):
    flow = perturbed(name, dtype)
    twin = copy.deepcopy(flow)
    x = points(flow.dim, dtype)
    loss, grads = autograd_reference(flow, x)

    flatten_parameters(twin)
    fused = fuse(twin)
    assert fused is not None and fused.trainable
    twin.train()
    fused_loss = fused.loss_backward(x)

    torch.testing.assert_close(fused_loss, loss, atol=tolerance, rtol=tolerance)
    for key, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, grads[key], atol=tolerance, rtol=tolerance, msg=key)
    # Batch statistics were recorded as the readable layers record them.
    for (key, mine), (_, theirs) in zip(twin.named_buffers(), flow.named_buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=tolerance, rtol=tolerance, msg=key)


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_segment_forward_values_and_log_dets_match(name, mode, one_thread):
    flow = perturbed(name, torch.float32)
    twin = copy.deepcopy(flow)
    flow.train(mode == "train")
    twin.train(mode == "train")
    fused = fuse(twin)
    x = points(flow.dim, torch.float32)

    readable = iter(flow.layers)
    y = x
    for segment in fused.segments:
        expected, expected_log_det = y, torch.zeros(len(x))
        with torch.no_grad():
            for _ in range(segment.layers):
                expected, ld = next(readable)(expected)
                expected_log_det = expected_log_det + ld
            got, got_log_det = segment.forward(y, save=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            got_log_det.expand(len(x)), expected_log_det, atol=1e-5, rtol=1e-5
        )
        y = expected


@pytest.mark.parametrize("name", FLOWS)
def test_evaluation_matches_the_readable_flow_without_flattening(name, one_thread):
    flow = perturbed(name, torch.float32)
    x = points(flow.dim, torch.float32, n=300)
    flow.eval()
    with torch.no_grad():
        expected = -flow.log_prob(x)

    # A flow whose parameters have storage of their own is evaluated on a copy of its weights.
    assert fuse(flow) is not None and not fuse(flow).trainable
    torch.testing.assert_close(evaluate_nll(flow, x, chunk=128), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="flat buffer"):
        fuse(flow).loss_backward(x)


def test_a_training_step_clips_the_same_gradient_as_the_readable_path(one_thread):
    """Trainer.step by the fast passes: the same loss and the same clipped flat gradient."""
    torch.manual_seed(3)
    flow = build("realnvp", 2)
    twin = copy.deepcopy(flow)
    x = 3.0 * points(2, torch.float32, n=256)
    fast = Trainer(flow, x, Recipe(clip=0.5), seed=0)
    slow = Trainer(twin, x, Recipe(clip=0.5), seed=0)
    # The fast passes, not the compiled ones (tests/test_native.py holds those).
    fast.native, fast.fused = None, fuse(flow)
    slow.native, slow.fused = None, None
    flow.train()
    twin.train()

    assert fast.step(x) == pytest.approx(slow.step(x), abs=1e-5, rel=1e-5)
    assert torch.linalg.vector_norm(slow.flat.grad) == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(fast.flat.grad, slow.flat.grad, atol=1e-6, rtol=1e-4)


def test_actnorm_initialises_from_the_first_batch_as_the_readable_layer_does(one_thread):
    torch.manual_seed(0)
    flow = build("glow", 3, blocks=2, hidden=8).double()
    twin = copy.deepcopy(flow)
    x = 2.0 * points(3, torch.float64) + 1.0
    loss, grads = autograd_reference(flow, x)

    flatten_parameters(twin)
    twin.train()
    torch.testing.assert_close(fuse(twin).loss_backward(x), loss, atol=1e-10, rtol=1e-10)
    assert all(bool(layer.initialized) for layer in twin.layers if isinstance(layer, ActNorm))
    for key, p in twin.named_parameters():
        torch.testing.assert_close(p, dict(flow.named_parameters())[key], msg=key)
        torch.testing.assert_close(p.grad, grads[key], atol=1e-10, rtol=1e-10, msg=key)


def test_layers_without_fast_passes_train_through_autograd(one_thread):
    flow = build("nsf", 2)
    assert fuse(flow) is None
    trainer = Trainer(flow, points(2, torch.float32), Recipe(epochs=1), seed=0)
    assert trainer.native is None and trainer.fused is None
    assert trainer.run_epoch().loss > 0


@pytest.mark.parametrize("name", ["realnvp", "planar", "radial", "glow", "nsf"])
def test_parameter_order_holds_every_parameter_once(name):
    flow = build(name, 3)
    ordered = parameter_order(flow)
    assert len(ordered) == len(list(flow.parameters()))
    assert {id(p) for p in ordered} == {id(p) for p in flow.parameters()}


def test_coupling_weights_are_contiguous_views_of_the_flat_buffer():
    flow = build("realnvp", 2)
    flat = flatten_parameters(flow)
    coupling = fuse(flow).segments[0]
    for weights in (coupling.w1, coupling.w2, coupling.w3, coupling.b1, coupling.b2):
        assert weights.value.is_contiguous()
        assert weights.value.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    with torch.no_grad():
        flat.add_(1.0)
    torch.testing.assert_close(coupling.w2.value[1], flow.layers[0].nets.shift[2].weight)

"""The compiled passes of exactflow.native against autograd through the readable layers."""

from __future__ import annotations

import copy

import pytest
import torch

from exactflow import native
from exactflow.bijections import AffineCouplingLayer, BatchNormFlow, PlanarFlow
from exactflow.flow import Flow
from exactflow.fused import fuse
from exactflow.models import build
from exactflow.train import Recipe, Trainer, evaluate_nll, flatten_parameters
from test_fused import autograd_reference, perturb, points


def mixed(dim: int) -> Flow:
    """Planar layers around couplings of odd widths and a batch norm."""
    layers = [
        PlanarFlow(dim),
        AffineCouplingLayer(dim, parity=1, hidden=20),
        BatchNormFlow(dim),
        PlanarFlow(dim),
        AffineCouplingLayer(dim, parity=0, hidden=37),
        BatchNormFlow(dim),
    ]
    return Flow(layers, dim)


# Widths and batch sizes off the tile sizes of the matrix products (6 rows, 8 or 16 columns),
# odd dimensions (more kept than free coordinates), and the reference models themselves.
FLOWS = {
    "realnvp-2d": lambda: build("realnvp", 2),
    "realnvp-5d": lambda: build("realnvp", 5, blocks=3, hidden=16),
    "realnvp-3d-wide": lambda: build("realnvp", 3, blocks=2, hidden=70),
    "planar-2d": lambda: build("planar", 2),
    "planar-3d": lambda: build("planar", 3, K=5),
    "mixed-3d": lambda: mixed(3),
}


def perturbed_flow(name: str, dtype: torch.dtype) -> Flow:
    """The flow ``name``, every parameter and batch statistic moved off its initial value."""
    torch.manual_seed(0)

    return perturb(FLOWS[name]().to(dtype))


def compiled_twin(flow: Flow) -> tuple[Flow, native.NativeFlow]:
    """A copy of ``flow`` with its parameters in a flat buffer, and its compiled passes."""
    twin = copy.deepcopy(flow)
    flatten_parameters(twin)
    passes = native.compile_flow(twin)
    assert passes is not None and passes.trainable

    return twin, passes


def test_the_extension_is_built():
    assert native.available(), "exactflow._native was not built; see the output of pip install"


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("rows", [2, 97, 256])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_loss_and_gradients_match_autograd(name, rows, dtype, tolerance, one_thread):
    flow = perturbed_flow(name, dtype)
    twin, passes = compiled_twin(flow)
    x = points(flow.dim, dtype, n=rows)
    loss, grads = autograd_reference(flow, x)

    twin.train()
    got_loss, norm = passes.loss_backward(x)

    assert got_loss == pytest.approx(loss.item(), abs=tolerance, rel=tolerance)
    expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()]))
    assert norm == pytest.approx(expected_norm.item(), rel=tolerance)
    for key, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, grads[key], atol=tolerance, rtol=tolerance, msg=key)
    # Batch statistics were recorded as the readable layers record them.
    for (key, mine), (_, theirs) in zip(twin.named_buffers(), flow.named_buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=tolerance, rtol=tolerance, msg=key)


@pytest.mark.parametrize("name", ["realnvp-2d", "mixed-3d"])
def test_evaluation_mode_gradients_use_the_running_statistics(name, one_thread):
    flow = perturbed_flow(name, torch.float64)
    twin, passes = compiled_twin(flow)
    x = points(flow.dim, torch.float64)
    flow.eval()
    flow.zero_grad()
    loss = -flow.log_prob(x).mean()
    loss.backward()

    twin.eval()
    got_loss, _ = passes.loss_backward(x)

    assert got_loss == pytest.approx(loss.item(), abs=1e-10, rel=1e-10)
    for key, p in twin.named_parameters():
        expected = dict(flow.named_parameters())[key].grad
        torch.testing.assert_close(p.grad, expected, atol=1e-10, rtol=1e-10, msg=key)


def test_clipping_scales_the_gradient_to_the_clip_norm(one_thread):
    flow = perturbed_flow("realnvp-2d", torch.float64)
    twin, passes = compiled_twin(flow)
    x = points(2, torch.float64)
    _, grads = autograd_reference(flow, x)

    twin.train()
    _, norm = passes.loss_backward(x, clip=0.25)

    assert norm > 0.25
    factor = 0.25 / (norm + 1e-6)
    for key, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, factor * grads[key], atol=1e-12, rtol=1e-10, msg=key)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in twin.parameters()]))
    assert clipped.item() == pytest.approx(0.25, rel=1e-5)


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_scores_match_the_readable_flow(name, threads, dtype, tolerance):
    """Evaluation mode in blocks of rows, over one or two threads; parameters unflattened."""
    flow = perturbed_flow(name, dtype).eval()
    x = points(flow.dim, dtype, n=1001)
    with torch.no_grad():
        expected = flow.log_prob(x)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        passes = native.compile_flow(flow)
        assert passes is not None and not passes.trainable
        got = passes.log_prob(x)
    finally:
        torch.set_num_threads(previous)

    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    with pytest.raises(RuntimeError, match="gradients"):
        passes.loss_backward(x)


def test_training_mode_scores_use_and_record_the_batch_statistics(one_thread):
    flow = perturbed_flow("mixed-3d", torch.float64).train()
    twin = copy.deepcopy(flow)
    x = points(3, torch.float64, n=300)
    with torch.no_grad():
        expected = flow.log_prob(x)

    got = native.compile_flow(twin).log_prob(x)

    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    for (key, mine), (_, theirs) in zip(twin.named_buffers(), flow.named_buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=1e-12, msg=key)


def test_evaluate_nll_scores_by_the_compiled_passes():
    flow = perturbed_flow("realnvp-2d", torch.float32)
    x = points(2, torch.float32, n=700)
    flow.eval()
    with torch.no_grad():
        expected = -flow.log_prob(x)

    torch.testing.assert_close(evaluate_nll(flow, x, chunk=300), expected, atol=1e-5, rtol=1e-5)


def test_a_trainer_steps_by_the_compiled_passes(one_thread):
    """Trainer.step: the same loss and the same clipped flat gradient as autograd."""
    torch.manual_seed(3)
    flow = build("realnvp", 2).double()
    twin = copy.deepcopy(flow)
    x = 3.0 * points(2, torch.float64, n=256)
    fast = Trainer(flow, x, Recipe(clip=0.5), seed=0)
    slow = Trainer(twin, x, Recipe(clip=0.5), seed=0)
    assert fast.native is not None and fast.passes is fast.native
    slow.native, slow.fused = None, None
    flow.train()
    twin.train()
    start = fast.flat.detach().clone()

    assert fast.step(x) == pytest.approx(slow.step(x), abs=1e-12, rel=1e-12)
    assert torch.linalg.vector_norm(slow.flat.grad) == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(fast.flat.grad, slow.flat.grad, atol=1e-12, rtol=1e-10)
    # Adam stepped: every weight with a gradient moved by about the learning rate.
    moved = (fast.flat - start).abs()[fast.flat.grad.abs() > 1e-4]
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), atol=0, rtol=1e-3)


@pytest.mark.parametrize("name", ["nsf", "glow", "radial", "maf", "nice"])
def test_other_layers_do_not_compile(name):
    assert native.compile_flow(build(name, 2)) is None


def test_other_coupling_nets_and_dtypes_do_not_compile():
    flow = build("realnvp", 2)
    flow.layers[0].nets.shift[1] = torch.nn.ReLU()
    assert native.compile_flow(flow) is None
    assert native.compile_flow(build("realnvp", 2).to(torch.bfloat16)) is None


def test_a_short_workspace_is_refused():
    flow = build("planar", 2)
    passes = native.compile_flow(flow)
    x = points(2, torch.float32)
    out = torch.empty(len(x))
    workspace = torch.empty(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="workspace of 16 bytes"):
        native._native.log_prob(
            False,
            passes.program.data_ptr(),
            passes.constants.data_ptr(),
            passes.segments,
            x.data_ptr(),
            len(x),
            out.data_ptr(),
            workspace.data_ptr(),
            workspace.numel(),
            False,
        )


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_the_compiled_adam_step_matches_torch(dtype, tolerance, weight_decay):
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(1000, generator=generator, dtype=dtype)
    gradients = [torch.randn(1000, generator=generator, dtype=dtype) for _ in range(30)]
    mine = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    options = {"lr": 1e-2, "weight_decay": weight_decay, "decoupled_weight_decay": True}
    compiled = torch.optim.Adam([mine], **options)
    reference = torch.optim.Adam([theirs], **options)
    step = native.adam(compiled)
    assert step is not None

    for k, gradient in enumerate(gradients):
        mine.grad, theirs.grad = gradient.clone(), gradient.clone()
        step()
        reference.step()
        # A learning-rate schedule sets the group's rate between steps.
        for optimizer in (compiled, reference):
            optimizer.param_groups[0]["lr"] = 1e-2 / (k + 2)

    torch.testing.assert_close(mine, theirs, atol=tolerance, rtol=tolerance)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(
            compiled.state[mine][key], reference.state[theirs][key], atol=tolerance, rtol=tolerance
        )
    assert compiled.state[mine]["step"].item() == reference.state[theirs]["step"].item() == 30


def test_adam_without_a_compiled_step():
    parameter = torch.nn.Parameter(torch.zeros(3))
    assert native.adam(torch.optim.Adam([parameter], amsgrad=True)) is None
    assert native.adam(torch.optim.Adam([parameter], weight_decay=0.1)) is None
    assert native.adam(torch.optim.Adam([parameter, torch.nn.Parameter(torch.zeros(2))])) is None
    assert native.adam(torch.optim.Adam([parameter.detach().half().requires_grad_()])) is None


def test_units_without_a_cut_tied_cuts_and_rows_on_a_cut_match_autograd(one_thread):
    """The piecewise-linear tables of a coupling with one kept coordinate, at their edges."""
    flow = perturb(Flow([AffineCouplingLayer(2, parity=0, hidden=12)], 2).double())
    with torch.no_grad():
        for net in (flow.layers[0].nets.scale[0], flow.layers[0].nets.shift):
            weight, bias = net[0].weight, net[0].bias
            weight[:3, 0] = 0.0  # no cut: always on (bias > 0) or always off
            bias[:3] = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
            # Two cuts tie at 0.25; a falling unit cuts at 0.5.
            weight[3:6, 0] = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
            bias[3:6] = torch.tensor([-0.25, -0.5, 0.5], dtype=torch.float64)
    twin, passes = compiled_twin(flow)
    x = points(2, torch.float64, n=40)
    x[:4, 0] = torch.tensor([0.25, -10.0, 10.0, 0.0], dtype=torch.float64)
    loss, grads = autograd_reference(flow, x)

    twin.train()
    got_loss, _ = passes.loss_backward(x)

    assert got_loss == pytest.approx(loss.item(), abs=1e-12, rel=1e-12)
    for key, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, grads[key], atol=1e-12, rtol=1e-10, msg=key)


def test_a_layer_used_twice_trains_through_autograd(one_thread):
    """Passes that write each layer's gradient would overwrite what autograd adds up."""
    planar, coupling = PlanarFlow(2), AffineCouplingLayer(2, parity=0, hidden=8)
    flow = Flow([planar, coupling, planar, coupling], 2)
    assert native.compile_flow(flow) is None
    assert fuse(flow) is None

    x = points(2, torch.float32)
    trainer = Trainer(flow, x, Recipe(clip=1e6), seed=0)
    assert trainer.flat.numel() == sum(p.numel() for p in flow.parameters())
    twin = copy.deepcopy(flow)
    _, grads = autograd_reference(twin, x)
    flow.train()
    trainer.step(x)
    for key, p in flow.named_parameters():
        torch.testing.assert_close(p.grad, grads[key], atol=1e-5, rtol=1e-5, msg=key)


def test_a_very_wide_planar_layer_needs_no_stack(one_thread):
    """Scratch lives in the workspace: three million coordinates exceed a thread's stack.

    The sums over the coordinates run in double, so the float32 passes are held to float64
    autograd (float32 autograd strays 1e-5 of the gradient's scale at this width).
    """
    torch.manual_seed(0)
    flow = build("planar", 3_000_000, K=1)
    twin, passes = compiled_twin(flow)
    x = points(3_000_000, torch.float32, n=2)
    loss, grads = autograd_reference(flow.double(), x.double())

    got_loss, _ = passes.loss_backward(x)

    assert got_loss == pytest.approx(loss.item(), rel=1e-6)
    for key, p in twin.named_parameters():
        scale = grads[key].abs().max().item()
        torch.testing.assert_close(p.grad.double(), grads[key], atol=1e-6 * scale, rtol=0, msg=key)

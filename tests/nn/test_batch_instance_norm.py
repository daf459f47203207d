"""Batch-Instance Normalization (Nam & Kim 2018): the gated mixture against the float64 oracle, ρ=1 is
BatchNorm and ρ=0 is InstanceNorm, and the gate stays in [0, 1] as the paper keeps it."""

import numpy as np
import pytest
import torch

import normkit as nk
from helpers import (
    assert_close,
    make_input,
    randomize_parameters,
    reference_directional_derivative,
)
from normkit import reference as R
from normkit.errors import BatchTooSmallError

SHAPES = [(4, 3, 5), (3, 4, 3, 5), (2, 3, 2, 3, 2), (3, 2, 2, 2, 2, 2)]
DTYPES = [torch.float32, torch.float64]


def _layer(channels, dtype=torch.float32, **kwargs):
    layer = nk.BatchInstanceNorm(channels, **kwargs).to(dtype)
    randomize_parameters(layer)
    with torch.no_grad():
        layer.rho.copy_(torch.linspace(0.0, 1.0, channels))  # from pure IN to pure BN
    return layer


def _numpy(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_and_eval_match_the_equation(shape, dtype, backend):
    layer = _layer(shape[1], dtype, momentum=0.3)
    mean, var = np.zeros(shape[1]), np.ones(shape[1])
    for step in range(2):
        x = make_input(shape, torch.float64, seed=step)
        expected = R.batch_instance_norm(
            x.numpy(), _numpy(layer.rho), _numpy(layer.weight), _numpy(layer.bias), layer.eps
        )
        mean, var = R.running_average(mean, var, x.numpy(), 0.3)
        assert_close(layer(x.to(dtype)), torch.tensor(expected), dtype, f"step {step}")
    assert_close(layer.running_mean, torch.tensor(mean), dtype, "running_mean")
    assert_close(layer.running_var, torch.tensor(var), dtype, "running_var")
    layer.eval()
    x = make_input(shape, torch.float64, seed=5)
    expected = R.batch_instance_norm(
        x.numpy(), _numpy(layer.rho), _numpy(layer.weight), _numpy(layer.bias), layer.eps,
        _numpy(layer.running_mean), _numpy(layer.running_var),
    )  # fmt: skip
    assert_close(layer(x.to(dtype)), torch.tensor(expected), dtype, "eval")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_match_the_oracle(training, backend):
    """<dL/dx, u>, <dL/drho, p> and <dL/dgamma, g> against central differences of the oracle."""
    shape = (3, 4, 3, 2)
    rng = np.random.default_rng(2)
    x, w = rng.normal(0.5, 2.0, shape), rng.normal(size=shape)
    rho, gamma, beta = rng.uniform(0.1, 0.9, 4), rng.normal(1.0, 0.3, 4), rng.normal(0, 0.3, 4)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2.0, 4)
    layer = nk.BatchInstanceNorm(4).double().train(training)
    with torch.no_grad():
        for p, value in ((layer.rho, rho), (layer.weight, gamma), (layer.bias, beta)):
            p.copy_(torch.tensor(value))
        layer.running_mean.copy_(torch.tensor(mean)), layer.running_var.copy_(torch.tensor(var))
    leaf = torch.tensor(x, requires_grad=True)
    (layer(leaf) * torch.tensor(w)).sum().backward()
    stats = (None, None) if training else (mean, var)
    oracle = lambda x_, rho_, gamma_: R.batch_instance_norm(x_, rho_, gamma_, beta, 1e-5, *stats)
    inputs = [x, rho, gamma]
    grads = [leaf.grad, layer.rho.grad, layer.weight.grad]
    for k, grad in enumerate(grads):
        directions = [np.zeros_like(a) for a in inputs]
        directions[k] = rng.normal(size=inputs[k].shape)
        expected = reference_directional_derivative(oracle, inputs, directions, w)
        got = (grad * torch.tensor(directions[k])).sum().item()
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-8), f"input {k}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gate_one_is_batch_norm_and_gate_zero_is_instance_norm(layout, backend):
    channels_last = layout == "channels_last"
    x = make_input((6, 4, 3, 5), channels_last=channels_last)
    ours = _layer(4)
    bn = torch.nn.BatchNorm2d(4)
    bn.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "rho"})
    with torch.no_grad():
        ours.rho.fill_(1.0)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_bn = ours(a), bn(b)
    assert_close(y, y_bn, what="rho=1 vs BatchNorm2d")
    (y * x).sum().backward(), (y_bn * x).sum().backward()
    assert_close(a.grad, b.grad, what="rho=1 input grad")
    assert_close(ours.running_mean, bn.running_mean, what="running_mean")
    assert_close(ours.running_var, bn.running_var, what="running_var")
    ours.eval(), bn.eval()
    assert_close(ours(x), bn(x), what="rho=1 eval")
    with torch.no_grad():
        ours.rho.fill_(0.0)
    instance = torch.nn.InstanceNorm2d(4, affine=True)
    instance.load_state_dict({"weight": ours.weight, "bias": ours.bias})
    for mode in (True, False):  # IN is the same in both modes
        assert_close(ours.train(mode)(x), instance(x), what=f"rho=0 vs InstanceNorm2d ({mode})")
    if channels_last:
        assert ours(x).is_contiguous(memory_format=torch.channels_last)


def test_gate_is_kept_in_range():
    layer = nk.BatchInstanceNorm(3)
    assert torch.equal(layer.rho, torch.ones(3))  # the paper's initialisation: pure BN
    x = make_input((4, 3, 5, 5))
    (layer(x) * x).sum().backward()
    assert layer.rho.grad.abs().min() > 0, "the gradient must pass at rho = 1"
    with torch.no_grad():
        layer.rho.copy_(torch.tensor([1.5, -0.5, 0.25]))  # an update overshot the range
    y_eval = layer.eval()(x)  # eval uses the clamp without changing the parameter
    assert torch.equal(layer.rho, torch.tensor([1.5, -0.5, 0.25]))
    with nk.frozen_running_stats(layer):  # (keep the running statistics for the comparison)
        layer.train()(x)  # training projects the parameter, as the paper's clip after each step
    assert torch.equal(layer.rho, torch.tensor([1.0, 0.0, 0.25]))
    assert torch.equal(layer.eval()(x), y_eval)


def test_needs_spatial_dims():
    with pytest.raises(BatchTooSmallError, match="spatial"):
        nk.BatchInstanceNorm(3)(torch.randn(4, 3, 1))
    with pytest.raises(nk.errors.ShapeError, match="at least 3 dimensions"):
        nk.BatchInstanceNorm(3)(torch.randn(4, 3))


def test_state_dict_has_batch_norm_keys_and_the_gate():
    layer = nk.BatchInstanceNorm(3)
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm2d(3).state_dict()) | {"rho"}

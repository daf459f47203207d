"""MovingAverageBatchNorm (MABN): every phase of the algorithm (the windows filling, the simple
moving averages in the forward and backward passes, the renormalization) against the float64 form
of Yan et al.'s algorithm over several steps; inference is BatchNorm's map with mean 0; a resumed
run continues exactly; non-finite batches are kept out."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters
from normkit import reference as R

# window 2, warm-up 3 steps, r = 1 for 4 steps: steps 1-2 batch-only, 3-4 SMA without r, 5+ all.
CONFIG = {"window": 2, "warmup_iters": 3, "renorm_iters": 4, "r_max": 1.5, "momentum": 0.3}


@pytest.mark.parametrize("backend_name", ["native", "reference"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (6, 4)], ids=["4d", "2d"])
def test_steps_match_the_algorithm(shape, backend_name):
    layer = nk.MovingAverageBatchNorm(4, **CONFIG).double()
    randomize_parameters(layer)
    c = shape[1]
    state = R.MABNState(np.zeros((2, c)), np.zeros((2, c)), np.ones(c))
    gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    for step in range(7):
        x = make_input(shape, torch.float64, seed=step, scale=1.0 + step).requires_grad_()
        with nk.backend(backend_name):
            y = layer(x)
        dy = make_input(shape, torch.float64, seed=100 + step)
        y.backward(dy)
        expected, cache = R.mabn_train(
            x.detach().numpy(), gamma, beta, state, layer.eps, 0.3, 3, 4, 1.5
        )
        dx, dgamma, dbeta = R.mabn_backward(dy.numpy(), cache, state)
        label = f"step {step + 1}"
        assert_close(y, torch.from_numpy(expected), torch.float64, f"{label} output")
        assert_close(x.grad, torch.from_numpy(dx), torch.float64, f"{label} input grad")
        assert_close(layer.weight.grad, torch.from_numpy(dgamma), torch.float64, f"{label} dgamma")
        assert_close(layer.bias.grad, torch.from_numpy(dbeta), torch.float64, f"{label} dbeta")
        layer.zero_grad()
        for name, value in (("running_var", state.running_var),
                            ("second_moments", state.second_moments),
                            ("gradient_moments", state.gradient_moments)):  # fmt: skip
            assert_close(getattr(layer, name), torch.from_numpy(value), torch.float64, name)
        assert int(layer.iteration) == state.step == step + 1
    assert (cache["r"] != 1).any(), "the renormalization never acted"


def test_inference_is_batch_norms_map_with_mean_zero():
    layer = nk.MovingAverageBatchNorm(4, window=2, warmup_iters=1)
    randomize_parameters(layer)
    for seed in range(4):
        layer(make_input((2, 4, 3, 3), seed=seed)).sum().backward()
    layer.eval()
    x = make_input((3, 4, 3, 3), seed=9)
    expected = torch.nn.functional.batch_norm(
        x, torch.zeros(4), layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
    )
    torch.testing.assert_close(layer(x), expected)


def test_a_resumed_run_continues_exactly():
    layer = nk.MovingAverageBatchNorm(4, **CONFIG)
    for seed in range(4):
        layer(make_input((2, 4, 3, 3), seed=seed)).sum().backward()
    resumed = nk.MovingAverageBatchNorm(4, **CONFIG)
    resumed.load_state_dict(copy.deepcopy(layer.state_dict()))
    for seed in range(4, 7):
        x = make_input((2, 4, 3, 3), seed=seed)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(a), resumed(b)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(a.grad, b.grad)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_non_finite_batch_is_kept_out():
    layer = nk.MovingAverageBatchNorm(4, window=2, warmup_iters=1)
    layer(make_input((2, 4, 3, 3))).sum().backward()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = make_input((2, 4, 3, 3), seed=1)
    x[0, 0, 0, 0] = float("inf")
    layer(x)
    torch.testing.assert_close(layer.running_var, before["running_var"])
    torch.testing.assert_close(layer.second_moments, before["second_moments"])
    assert int(layer.num_batches_skipped) == 1 and int(layer.num_batches_tracked) == 1


def test_configuration_errors():
    with pytest.raises(nk.errors.ConfigError, match="track_running_stats"):
        nk.MovingAverageBatchNorm(4, track_running_stats=False)
    with pytest.raises(nk.errors.ConfigError, match="r_max"):
        nk.MovingAverageBatchNorm(4, r_max=0.5)
    with pytest.raises(nk.errors.ConfigError, match="window"):
        nk.MovingAverageBatchNorm(4, window=0)
    assert "running_mean" not in nk.MovingAverageBatchNorm(4).state_dict()


def _penalty(layer, x, weights):
    """sum((d sum(y * weights) / dx)^2) through MABN's backward rule, and the input leaf."""
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad((layer(leaf) * weights).sum(), leaf, create_graph=True)
    return grad.square().sum(), leaf


@pytest.mark.parametrize(
    "steps", [0, 30, 40], ids=["batch statistics", "moving averages", "renormalized"]
)
def test_double_backward_differentiates_the_rule(steps):
    """Under create_graph=True the backward rule is itself differentiable: the gradient of a
    penalty on it equals central differences of that penalty (each evaluation from a copy of the
    same state, float64: agreement to ~1e-8 of the scale; 1e-6 allowed). While the window fills
    the rule is the true gradient, and so its derivative the true second derivative."""
    torch.manual_seed(0)
    dtype = torch.float64
    base = nk.MovingAverageBatchNorm(3, window=4, warmup_iters=5, renorm_iters=35).to(dtype)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
    for _ in range(steps):
        base(torch.randn(4, 3, 3, 3, dtype=dtype) * 1.3 + 0.2).sum().backward()
    x, weights = torch.randn(4, 3, 3, 3, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype)
    penalty, leaf = _penalty(copy.deepcopy(base), x, weights)
    (analytic,) = torch.autograd.grad(penalty, leaf)
    analytic = analytic.detach()
    h = 1e-6
    for index in [(0, 0, 0, 0), (1, 2, 1, 0), (3, 1, 2, 2)]:
        plus, minus = x.clone(), x.clone()
        plus[index] += h
        minus[index] -= h
        numeric = (
            _penalty(copy.deepcopy(base), plus, weights)[0]
            - _penalty(copy.deepcopy(base), minus, weights)[0]
        ) / (2 * h)
        scale = analytic.abs().max()
        assert abs(float(analytic[index] - numeric)) <= 1e-6 * float(scale), index
    if steps == 0:  # y = gamma * x / sqrt(mean(x^2) + eps) + beta, differentiated twice
        gamma, beta = base.weight.detach().view(1, -1, 1, 1), base.bias.detach().view(1, -1, 1, 1)
        leaf2 = x.clone().requires_grad_()
        y = gamma * leaf2 * torch.rsqrt(leaf2.square().mean((0, 2, 3), keepdim=True) + base.eps)
        (grad,) = torch.autograd.grad(((y + beta) * weights).sum(), leaf2, create_graph=True)
        (true,) = torch.autograd.grad(grad.square().sum(), leaf2)
        torch.testing.assert_close(analytic, true, rtol=1e-10, atol=1e-10)


def test_torch_func_grad_of_a_training_step_is_eager_modes():
    """torch.func.grad through functional_call, past the warm-up and with renormalization: the
    rule's gradients and the state (EMA, both windows, counters) of an eager step on a copy
    (float32, the same kernels in the same order: 1e-5 of the scale)."""
    torch.manual_seed(0)
    layer = nk.MovingAverageBatchNorm(3, window=4, warmup_iters=5, renorm_iters=8)
    for _ in range(12):
        layer(torch.randn(4, 3, 3, 3) * 1.3 + 0.2).sum().backward()
    twin = copy.deepcopy(layer)
    x, weights = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    buffers = dict(layer.named_buffers())

    def loss(p, inp):
        return (torch.func.functional_call(layer, (p, buffers), (inp,)) * weights).sum()

    grad_params, grad_x = torch.func.grad(loss, argnums=(0, 1))(params, x)
    leaf = x.clone().requires_grad_()
    (twin(leaf) * weights).sum().backward()
    assert_close(grad_x, leaf.grad, torch.float32, "input grad")
    for name, p in twin.named_parameters():
        assert_close(grad_params[name], p.grad, torch.float32, f"grad of {name}")
    for (name, mine), theirs in zip(layer.named_buffers(), twin.buffers(), strict=True):
        assert_close(mine.double(), theirs.double(), torch.float32, name)

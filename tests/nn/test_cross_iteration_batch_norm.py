"""CrossIterationBatchNorm (CBN): training steps with a convolution whose weights change between
them, against the float64 form of Yao et al.'s pooled, Taylor-compensated statistics (the
derivatives computed independently from the convolution's patches); BatchNorm exactly during the
burn-in; the backward against the float64 oracle's derivative; the compensation beating the naive
average; and how the producer is given."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters, reference_directional_derivative
from normkit import reference as R
from normkit.functional._cross_iteration_batch_norm import compensated_statistics


def _patch_derivatives(u: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, padding: int):
    """d mu_c / d W_c and d nu_c / d W_c of y = conv(u, W) (no bias), from the patches:
    mu_c = W_c . mean(patch), nu_c = mean(y_c^2) -> 2 mean(y_c * patch)."""
    patches = torch.nn.functional.unfold(u, weight.shape[2:], padding=padding)  # (N, J, L)
    patches = patches.double().numpy()
    count = patches.shape[0] * patches.shape[2]
    mean_patch = patches.sum((0, 2)) / count  # (J,)
    yc = y.double().flatten(2).numpy()  # (N, C, L)
    d_nu = 2 * np.einsum("ncl,njl->cj", yc, patches) / count
    channels = weight.shape[0]
    d_mu = np.broadcast_to(mean_patch, (channels, mean_patch.size))
    return d_mu.reshape(weight.shape), d_nu.reshape(weight.shape)


@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_steps_match_the_pooled_compensated_statistics(backend_name):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    cbn = nk.CrossIterationBatchNorm(4, window=3, burn_in=1, eps=1e-5).double().attach(conv)
    randomize_parameters(cbn)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.05)
    history = []  # (mu, nu, d_mu, d_nu, W) of the recorded steps, newest last
    for step in range(6):
        u = make_input((2, 3, 5, 5), torch.float64, seed=step)
        optimizer.zero_grad()
        x = conv(u)
        with nk.backend(backend_name):
            y = cbn(x)
        xs = x.detach().numpy()
        mu, nu = xs.mean((0, 2, 3)), (xs**2).mean((0, 2, 3))
        if step == 0:  # burn-in: BatchNorm
            mu_bar, sigma2 = mu, xs.var((0, 2, 3))
        else:
            past = history[-2:][::-1]  # the window keeps k - 1 = 2 earlier steps
            w_now = conv.weight.detach().numpy().copy()  # the optimizer writes in place
            d_mu, d_nu = _patch_derivatives(u, x.detach(), conv.weight.detach(), 1)
            entries = [(mu, nu, d_mu, d_nu, w_now), *past]
            mu_bar, sigma2 = R.cross_iteration_statistics(
                *[np.stack([e[i] for e in entries]) for i in range(5)], w_now
            )
            history.append(entries[0])
        gamma, beta = cbn.weight.detach().numpy(), cbn.bias.detach().numpy()
        expected = R.batch_norm_inference(xs, mu_bar, sigma2, gamma, beta, cbn.eps)
        assert_close(y, torch.from_numpy(expected), torch.float64, f"step {step}")
        y.square().mean().backward()
        optimizer.step()  # the weights change: the compensation has work to do
    assert int(cbn.history_size) == 2


def test_burn_in_and_window_one_are_batch_norm():
    for kwargs in ({"window": 1}, {"window": 4, "burn_in": 5}):
        cbn = nk.CrossIterationBatchNorm(4, **kwargs)
        bn = torch.nn.BatchNorm2d(4)
        randomize_parameters(cbn)
        bn.load_state_dict(cbn.state_dict(), strict=False)
        for seed in range(3):
            x = make_input((3, 4, 4, 4), seed=seed)
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = cbn(a), bn(b)
            ya.square().sum().backward()
            yb.square().sum().backward()
            assert_close(ya, yb)
            assert_close(a.grad, b.grad)
        assert_close(cbn.running_var, bn.running_var)
        assert int(cbn.history_size) == 0


@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_backward_is_the_derivative_of_the_pooled_normalization(backend_name):
    """With past statistics held (compensate=False: no producer needed), autograd's gradient equals
    the float64 oracle's derivative: the current batch's share 1/k of the pooled statistics."""
    cbn = nk.CrossIterationBatchNorm(3, window=3, compensate=False).double()
    randomize_parameters(cbn)
    for seed in range(2):  # two past iterations in the window
        cbn(make_input((4, 3, 2, 3), torch.float64, seed=seed, scale=1 + seed))
    past_mu = cbn.history_means.numpy().copy()
    past_var = cbn.history_vars.numpy().copy()
    x = make_input((4, 3, 2, 3), torch.float64, seed=7).requires_grad_()
    with nk.backend(backend_name):
        y = cbn(x)
    weights = make_input(x.shape, torch.float64, seed=8)
    (grad,) = torch.autograd.grad((y * weights).sum(), x)
    gamma, beta = cbn.weight.detach().numpy(), cbn.bias.detach().numpy()

    def f(x_):
        mu, nu = x_.mean((0, 2, 3)), (x_**2).mean((0, 2, 3))
        means = np.concatenate([mu[None], past_mu])
        nus = np.concatenate([nu[None], past_var + past_mu**2])
        zeros = np.zeros((3, 3, 1))
        mu_bar, sigma2 = R.cross_iteration_statistics(means, nus, zeros, zeros, zeros, zeros[0])
        return R.batch_norm_inference(x_, mu_bar, sigma2, gamma, beta, cbn.eps)

    direction = make_input(x.shape, torch.float64, seed=9)
    numeric = reference_directional_derivative(
        f, [x.detach().numpy()], [direction.numpy()], weights.numpy(), step=1e-5
    )
    assert abs(float((grad * direction).sum()) - numeric) <= 1e-8 * max(1.0, abs(numeric))


def test_compensation_beats_the_naive_average():
    """After a weight update, an old batch's compensated statistics are much closer to its true
    statistics under the new weights than the stored ones (first-order Taylor: error O(step^2))."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).double()
    u = make_input((4, 3, 6, 6), torch.float64, seed=1)
    x = conv(u)
    dims = (0, 2, 3)
    mean, var = x.detach().mean(dims), x.detach().var(dims, correction=0)
    from normkit.functional._cross_iteration_batch_norm import statistics_jacobians

    d_mu, d_nu = statistics_jacobians(x, conv.weight)
    old = conv.weight.detach().clone()
    with torch.no_grad():
        conv.weight.add_(0.001 * torch.randn_like(conv.weight))
        x_new = conv(u)
    true_mean, true_var = x_new.mean(dims), x_new.var(dims, correction=0)
    comp_mean, comp_var = compensated_statistics(
        mean[None], var[None], d_mu[None], d_nu[None], old[None], conv.weight.detach()
    )
    naive = (mean - true_mean).abs().max() + (var - true_var).abs().max()
    compensated = (comp_mean[0] - true_mean).abs().max() + (comp_var[0] - true_var).abs().max()
    assert compensated < naive / 20, (float(compensated), float(naive))


def test_the_producer_is_needed_and_checked():
    cbn = nk.CrossIterationBatchNorm(4, window=2)
    with pytest.raises(nk.errors.ConfigError, match="attach"):
        cbn(make_input((2, 4, 3, 3)))
    with pytest.raises(nk.errors.ConfigError, match="rows"):
        cbn.attach(torch.nn.Conv2d(3, 5, 1))
    with pytest.raises(nk.errors.ConfigError, match="rows"):
        cbn.attach(torch.nn.ConvTranspose2d(4, 4, 1))
    conv = torch.nn.Conv2d(3, 4, 1)
    cbn = nk.CrossIterationBatchNorm(4, window=2)
    y = cbn(conv(make_input((2, 3, 3, 3))), weight=conv.weight)  # given per call instead
    assert y.shape == (2, 4, 3, 3)
    assert "producer" not in str(sorted(cbn.attach(conv).state_dict()))


def test_convert_attaches_each_layer_to_its_convolution():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.BatchNorm2d(8)
    )
    new, replaced = nk.tools.convert(model, "cbn:4")
    assert isinstance(new[1], nk.CrossIterationBatchNorm) and new[1].producer is new[0]
    assert new[1].window == 4
    assert isinstance(new[3], torch.nn.BatchNorm2d)  # fed by a ReLU: left, with the reason
    assert [s.paths for s in replaced.skipped] == [["3"]]
    new.train()
    for seed in range(3):
        new(make_input((2, 3, 6, 6), seed=seed)).sum().backward()
    assert int(new[1].history_size) == 3  # window 4: three earlier steps kept


@pytest.mark.parametrize("compensate", [False, True], ids=["naive", "compensated"])
def test_double_backward_over_a_full_window(compensate):
    """A gradient penalty through a training step that pools k = 3 iterations: the ``native``
    backward under create_graph=True (pooled statistics as functions of this batch's mean and
    variance) against autograd twice through the ``reference`` form, float64 (the same maths
    in another order: 1e-10)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    cbn = nk.CrossIterationBatchNorm(4, window=3, compensate=compensate).double().attach(conv)
    randomize_parameters(cbn)
    for seed in range(3):  # the window fills
        cbn(conv(make_input((2, 3, 5, 5), torch.float64, seed=seed))).square().mean().backward()
    u = make_input((2, 3, 5, 5), torch.float64, seed=9)
    weights = make_input((2, 4, 5, 5), torch.float64, seed=10)
    results = []
    for backend in ("native", "reference"):
        layer = copy.deepcopy(cbn).attach(copy.deepcopy(conv))
        leaf = u.clone().requires_grad_()
        params = [leaf, *layer.parameters()]
        with nk.backend(backend):
            y = layer(layer.producer(leaf))
            first = torch.autograd.grad((y * weights).sum(), params, create_graph=True)
            penalty = sum(g.square().sum() for g in first)
            results.append(torch.autograd.grad(penalty, params, allow_unused=True))
        assert int(layer.history_size) == 2
    for i, (native, reference) in enumerate(zip(*results, strict=True)):
        if reference is None:
            assert native is None or not native.abs().max() > 0, i
            continue
        torch.testing.assert_close(native, reference, rtol=1e-10, atol=1e-10, msg=f"grad {i}")

"""normkit.reference, the float64 oracle: first checked itself, then used to check every backend.

The oracle's backward (Ioffe & Szegedy §3, equation by equation) must equal autograd of its forward
in float64; only then are the PyTorch implementations held to it.
"""

import numpy as np
import pytest
import torch

import normkit as nk
from helpers import assert_close
from normkit import reference as R

SHAPES = [(4, 3), (5, 3, 7), (3, 4, 5, 6), (2, 4, 3, 2, 3)]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _autograd_reference(x, axes, gamma, beta, eps, dy):
    """Autograd of the plain formula in float64, independent of normkit."""
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    mean = xt.mean(dim=axes, keepdim=True)
    var = ((xt - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (xt - mean) / torch.sqrt(var + eps) * gt + bt
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_oracle_backward_equals_autograd(shape):
    rng = _rng()
    x = rng.normal(2.0, 3.0, shape)
    axes = (0, *range(2, len(shape)))
    gamma = rng.normal(1.0, 0.5, (1, shape[1]) + (1,) * (len(shape) - 2))
    beta = rng.normal(0.0, 0.5, gamma.shape)
    dy = rng.normal(size=shape)
    y, cache = R.normalize_over(x, axes, gamma, beta, 1e-5)
    dx, dgamma, dbeta = R.normalize_backward(dy, cache)
    ty, tdx, tdgamma, tdbeta = _autograd_reference(x, axes, gamma, beta, 1e-5, dy)
    np.testing.assert_allclose(y, ty, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tdx, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dgamma, tdgamma, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dbeta, tdbeta, rtol=1e-10, atol=1e-10)


def test_oracle_batch_norm_semantics():
    """Algorithm 1 gives zero mean, unit variance per channel; Algorithm 2's affine inverts it."""
    x = _rng(1).normal(5.0, 2.0, (16, 3, 4, 4))
    y, cache = R.batch_norm_train(x, np.ones(3), np.zeros(3), eps=0.0)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, atol=1e-12)
    mean, var, m = R.batch_statistics(x)
    inference = R.batch_norm_inference(x, mean, var, np.ones(3), np.zeros(3), eps=0.0)
    np.testing.assert_allclose(inference, y, atol=1e-12)
    pop_mean, pop_var = R.population_statistics([x, x])
    np.testing.assert_allclose(pop_var, var * m / (m - 1))


# --- every backend against the oracle -----------------------------------------------------------

DTYPES = [torch.float32, torch.float64]


def _as(t, dtype):
    return torch.tensor(t, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_train_matches_algorithm_1(shape, dtype, backend):
    rng = _rng(2)
    x, dy = rng.normal(1.0, 2.0, shape), rng.normal(size=shape)
    gamma, beta = rng.normal(1.0, 0.3, shape[1]), rng.normal(0.0, 0.3, shape[1])
    expected, cache = R.batch_norm_train(x, gamma, beta)
    dx_expected, dgamma_expected, dbeta_expected = R.batch_norm_backward(dy, cache)

    xt = _as(x, dtype).requires_grad_()
    w, b = _as(gamma, dtype).requires_grad_(), _as(beta, dtype).requires_grad_()
    running_mean, running_var = (
        torch.zeros(shape[1], dtype=dtype),
        torch.ones(shape[1], dtype=dtype),
    )
    y = nk.functional.batch_norm(xt, running_mean, running_var, w, b, training=True, momentum=0.3)
    y.backward(_as(dy, dtype))
    assert_close(y, torch.tensor(expected), dtype, "output")
    assert_close(xt.grad, torch.tensor(dx_expected), dtype, "dx")
    assert_close(w.grad, torch.tensor(dgamma_expected), dtype, "dgamma")
    assert_close(b.grad, torch.tensor(dbeta_expected), dtype, "dbeta")
    new_mean, new_var = R.running_average(np.zeros(shape[1]), np.ones(shape[1]), x, 0.3)
    assert_close(running_mean, torch.tensor(new_mean), dtype, "running_mean")
    assert_close(running_var, torch.tensor(new_var), dtype, "running_var")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_eval_matches_algorithm_2(dtype, backend):
    rng = _rng(3)
    x = rng.normal(1.0, 2.0, (6, 4, 3, 3))
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2.0, 4)
    gamma, beta = rng.normal(1.0, 0.3, 4), rng.normal(0.0, 0.3, 4)
    expected = R.batch_norm_inference(x, mean, var, gamma, beta)
    y = nk.functional.batch_norm(
        _as(x, dtype), _as(mean, dtype), _as(var, dtype), _as(gamma, dtype), _as(beta, dtype)
    )
    assert_close(y, torch.tensor(expected), dtype, "eval output")


def test_cumulative_average_is_algorithm_2_population_statistics(backend):
    """momentum=None over k equal batches gives E[x] = E_B[mu_B], Var[x] = m/(m-1) E_B[sigma2_B]."""
    batches = [_rng(s).normal(s, 1.0 + s, (8, 3, 2, 2)) for s in range(5)]
    bn = nk.BatchNorm2d(3, momentum=None).double()
    for batch in batches:
        bn(torch.tensor(batch))
    mean, var = R.population_statistics(batches)
    assert_close(bn.running_mean, torch.tensor(mean), torch.float64, "E[x]")
    assert_close(bn.running_var, torch.tensor(var), torch.float64, "Var[x]")
    assert int(bn.num_batches_tracked) == 5


def _check_family(fn_ours, fn_oracle, x, dy, params, dtype):
    """Compare forward and all gradients of a normkit op with the oracle's forward and backward."""
    expected, cache = fn_oracle(x, *params)
    grads = R.normalize_backward(dy.reshape(cache.x.shape), cache)  # GN: the grouped view
    xt = _as(x, dtype).requires_grad_()
    pt = [_as(p, dtype).requires_grad_() for p in params]
    y = fn_ours(xt, *pt)
    y.backward(_as(dy, dtype))
    assert_close(y, torch.tensor(expected), dtype, "output")
    assert_close(xt.grad, torch.tensor(grads[0]).reshape(x.shape), dtype, "dx")
    for p, g, name in zip(pt, grads[1:], ("dgamma", "dbeta"), strict=False):
        assert_close(p.grad, torch.tensor(g).reshape(p.shape), dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_matches_ba_et_al(dtype, backend):
    rng = _rng(4)
    x, dy = rng.normal(1.0, 2.0, (3, 5, 4, 6)), rng.normal(size=(3, 5, 4, 6))
    gamma, beta = rng.normal(1.0, 0.3, (4, 6)), rng.normal(0.0, 0.3, (4, 6))
    _check_family(
        lambda x, g, b: nk.functional.layer_norm(x, (4, 6), g, b),
        lambda x, g, b: R.layer_norm(x, 2, g, b),
        x,
        dy,
        (gamma, beta),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_group_norm_matches_wu_and_he(groups, dtype, backend):
    rng = _rng(5)
    x, dy = rng.normal(1.0, 2.0, (3, 6, 4, 5)), rng.normal(size=(3, 6, 4, 5))
    gamma, beta = rng.normal(1.0, 0.3, 6), rng.normal(0.0, 0.3, 6)
    _check_family(
        lambda x, g, b: nk.functional.group_norm(x, groups, g, b),
        lambda x, g, b: R.group_norm(x, groups, g, b),
        x,
        dy,
        (gamma, beta),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_instance_norm_matches_ulyanov_et_al(dtype, backend):
    rng = _rng(6)
    x, dy = rng.normal(1.0, 2.0, (3, 4, 5, 6)), rng.normal(size=(3, 4, 5, 6))
    gamma, beta = rng.normal(1.0, 0.3, 4), rng.normal(0.0, 0.3, 4)
    _check_family(
        lambda x, g, b: nk.functional.instance_norm(x, weight=g, bias=b),
        R.instance_norm,
        x,
        dy,
        (gamma, beta),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_layer_norm_matches_oracle(dtype, backend):
    rng = _rng(7)
    x, dy = rng.normal(1.0, 2.0, (3, 6, 4, 5)), rng.normal(size=(3, 6, 4, 5))
    gamma, beta = rng.normal(1.0, 0.3, 6), rng.normal(0.0, 0.3, 6)
    _check_family(
        nk.functional.channel_layer_norm, R.channel_layer_norm, x, dy, (gamma, beta), dtype
    )

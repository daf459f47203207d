"""Switchable Normalization (Luo et al. 2018): the mixture against the float64 oracle, gradients to the
importance logits, and one-hot weights reducing the layer to IN, LN and BN."""

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
from normkit.errors import BatchTooSmallError, ConfigError

SHAPES = [(4, 3, 5), (3, 4, 3, 5), (2, 3, 2, 3, 2), (3, 2, 2, 2, 2, 2)]
DTYPES = [torch.float32, torch.float64]


def _numpy(t):
    return t.detach().double().numpy()


def _layer(channels, dtype=torch.float32, **kwargs):
    layer = nk.SwitchableNorm(channels, **kwargs).to(dtype)
    randomize_parameters(layer)  # also moves the logits away from equal weights
    return layer


def _expected(layer, x, stats=(None, None)):
    return R.switchable_norm(
        x.numpy(), _numpy(layer.mean_weight), _numpy(layer.var_weight), _numpy(layer.weight),
        _numpy(layer.bias), layer.eps, *stats,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_and_eval_match_the_equation(shape, dtype, backend):
    layer = _layer(shape[1], dtype, momentum=0.3)
    mean, var = np.zeros(shape[1]), np.ones(shape[1])
    for step in range(2):
        x = make_input(shape, torch.float64, seed=step)
        mean, var = R.running_average(mean, var, x.numpy(), 0.3)
        assert_close(layer(x.to(dtype)), torch.tensor(_expected(layer, x)), dtype, f"step {step}")
    assert_close(layer.running_mean, torch.tensor(mean), dtype, "running_mean")
    assert_close(layer.running_var, torch.tensor(var), dtype, "running_var")
    layer.eval()
    x = make_input(shape, torch.float64, seed=5)
    expected = _expected(layer, x, (_numpy(layer.running_mean), _numpy(layer.running_var)))
    assert_close(layer(x.to(dtype)), torch.tensor(expected), dtype, "eval")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_match_the_oracle(training, backend):
    """<dL/d.., direction> for x, both logit vectors and gamma, against the oracle."""
    shape = (3, 4, 3, 2)
    rng = np.random.default_rng(4)
    x, w = rng.normal(0.5, 2.0, shape), rng.normal(size=shape)
    lam, lam_var = rng.normal(size=3), rng.normal(size=3)
    gamma, beta = rng.normal(1.0, 0.3, 4), rng.normal(0, 0.3, 4)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2.0, 4)
    layer = nk.SwitchableNorm(4).double().train(training)
    with torch.no_grad():
        for p, value in zip(
            (layer.mean_weight, layer.var_weight, layer.weight, layer.bias),
            (lam, lam_var, gamma, beta),
            strict=True,
        ):
            p.copy_(torch.tensor(value))
        layer.running_mean.copy_(torch.tensor(mean)), layer.running_var.copy_(torch.tensor(var))
    leaf = torch.tensor(x, requires_grad=True)
    (layer(leaf) * torch.tensor(w)).sum().backward()
    stats = (None, None) if training else (mean, var)
    oracle = lambda x_, a, b, g: R.switchable_norm(x_, a, b, g, beta, 1e-5, *stats)
    inputs = [x, lam, lam_var, gamma]
    grads = [leaf.grad, layer.mean_weight.grad, layer.var_weight.grad, layer.weight.grad]
    for k, grad in enumerate(grads):
        directions = [np.zeros_like(a) for a in inputs]
        directions[k] = rng.normal(size=inputs[k].shape)
        expected = reference_directional_derivative(oracle, inputs, directions, w)
        got = (grad * torch.tensor(directions[k])).sum().item()
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-8), f"input {k}"


def _one_hot(layer, kind):
    logits = torch.full((3,), -60.0)  # softmax weight e^-120 ~ 1e-52 on the others
    logits[("IN", "LN", "BN").index(kind)] = 60.0
    with torch.no_grad():
        layer.mean_weight.copy_(logits), layer.var_weight.copy_(logits)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_one_hot_weights_reduce_to_each_normalizer(layout, backend):
    x = make_input((5, 4, 3, 3), channels_last=layout == "channels_last")
    layer = _layer(4)
    affine = {"weight": layer.weight, "bias": layer.bias}
    instance = torch.nn.InstanceNorm2d(4, affine=True)
    instance.load_state_dict(affine)
    _one_hot(layer, "IN")
    assert_close(layer(x), instance(x), what="IN")
    _one_hot(layer, "LN")
    ln = torch.nn.functional.layer_norm(x, x.shape[1:], eps=layer.eps)
    assert_close(layer(x), ln * layer.weight.view(4, 1, 1) + layer.bias.view(4, 1, 1), what="LN")
    _one_hot(layer, "BN")
    bn = torch.nn.BatchNorm2d(4)
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if "_weight" not in k})
    y = layer(x)
    assert_close(y, bn(x), what="BN")
    assert_close(layer.running_var, bn.running_var, what="BN running_var")
    layer.eval(), bn.eval()
    assert_close(layer(x), bn(x), what="BN eval")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_logits_and_importance():
    layer = nk.SwitchableNorm(3)
    assert layer.mean_weight.shape == (3,) and torch.equal(layer.var_weight, torch.ones(3))
    w, v = layer.importance()
    torch.testing.assert_close(w, torch.full((3,), 1 / 3))
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm2d(3).state_dict()) | {
        "mean_weight",
        "var_weight",
    }


def test_bad_input_is_refused():
    with pytest.raises(BatchTooSmallError, match="spatial"):
        nk.SwitchableNorm(3)(torch.randn(4, 3, 1, 1))
    with pytest.raises(ConfigError, match=r"shape \(3,\)"):
        nk.functional.switchable_norm(torch.randn(2, 3, 4), torch.ones(2), torch.ones(3))

"""Weight-standardized convolutions: StdConv2d and ScaledStdConv2d against the float64 oracle (Qiao et
al. eqs. 5-6; Brock et al. eq. 2) and numerically timm's, CenteredConv2d, drop-in for Conv2d,
the eval-mode weight computed once (and recomputed when the parameters change), to_conv2d,
torch.compile and torch.func."""

from __future__ import annotations

import copy

import pytest
import torch

import normkit as nk
import normkit.functional as nkf
from helpers import assert_close, make_input
from normkit import reference as R

BACKENDS = ["native", "reference"]


def _conv(cls, **kw):
    torch.manual_seed(0)
    layer = cls(6, 8, 3, padding=1, **kw)
    if isinstance(layer, nk.ScaledStdConv2d):
        with torch.no_grad():
            layer.gain.uniform_(0.5, 1.5)
    return layer


def _oracle_weight(layer):
    w = layer.weight.detach().numpy()
    if isinstance(layer, nk.ScaledStdConv2d):
        return R.standardized_weight(w, layer.eps, layer.gain.detach().numpy(), layer.scale)
    if isinstance(layer, nk.StdConv2d):
        return R.standardized_weight(w, layer.eps)
    return R.centered_weight(w)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("cls", [nk.StdConv2d, nk.ScaledStdConv2d, nk.CenteredConv2d])
def test_weight_and_gradients_against_the_oracle(cls, backend_name):
    layer = _conv(cls).double()
    with nk.backend(backend_name):
        w_hat = layer.transformed_weight()
    assert_close(w_hat, torch.from_numpy(_oracle_weight(layer)), torch.float64, "weight")
    # the output is the convolution with that weight, and its gradients flow through the transform
    x = make_input((2, 6, 5, 5), torch.float64, seed=1).requires_grad_()
    with nk.backend(backend_name):
        y = layer(x)
    plain = torch.nn.functional.conv2d(x, w_hat.detach(), layer.bias, padding=1)
    assert_close(y, plain, torch.float64, "output")
    params = list(layer.parameters())
    grads = torch.autograd.grad(y.square().sum(), params)
    probe = copy.deepcopy(layer)
    with nk.backend("reference"):
        expected = torch.autograd.grad(probe(x).square().sum(), list(probe.parameters()))
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, torch.float64, "parameter grad")


def test_standardized_rows_have_zero_mean_and_unit_variance():
    w = nk.StdConv2d(4, 5, 3, eps=1e-12).transformed_weight().flatten(1)
    assert_close(w.mean(1), torch.zeros(5), what="mean")
    assert_close(w.var(1, correction=0), torch.ones(5), what="variance")


timm_layers = pytest.importorskip(
    "timm.layers", reason="timm is in the dev extra's install (make test)"
)


@pytest.mark.parametrize("pair", ["std", "scaled"])
def test_equals_timm(pair):
    if pair == "std":
        ours = nk.StdConv2d(6, 8, 3, padding=1, bias=False, eps=1e-6)
        theirs = timm_layers.StdConv2d(6, 8, 3, padding=1, eps=1e-6)
    else:
        ours = nk.ScaledStdConv2d(6, 8, 3, padding=1, gamma=1.7, eps=1e-6)
        theirs = timm_layers.ScaledStdConv2d(6, 8, 3, padding=1, gamma=1.7, eps=1e-6)
    theirs.load_state_dict(ours.state_dict())
    x = make_input((2, 6, 7, 7), seed=3)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(a), theirs(b)
    ya.sum().backward()
    yb.sum().backward()
    assert_close(ya, yb, what="output")
    assert_close(a.grad, b.grad, what="input grad")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p.grad, q.grad, what=f"grad of {name}")


def test_drop_in_for_conv2d():
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
    ours = nk.StdConv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
    assert isinstance(ours, torch.nn.Conv2d)
    ours.load_state_dict(conv.state_dict())
    x = make_input((2, 3, 9, 9))
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), ours.transformed_weight(),
        ours.bias, stride=2,
    )  # fmt: skip
    torch.testing.assert_close(ours(x), expected)


def test_eval_weight_is_computed_once_and_follows_updates(monkeypatch):
    layer = nk.ScaledStdConv2d(3, 4, 3).eval()
    calls = []
    original = nk.ScaledStdConv2d.transformed_weight

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(nk.ScaledStdConv2d, "transformed_weight", counted)
    x = make_input((2, 3, 6, 6))
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
    assert len(calls) == 1 and torch.equal(first, second)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer(x).square().sum().backward()
    optimizer.step()  # in-place updates: the cached weight must not be reused
    layer.eval()
    with torch.no_grad():
        third = layer(x)
    fresh = torch.nn.functional.conv2d(x, original(layer), layer.bias)
    torch.testing.assert_close(third, fresh)
    with torch.no_grad():
        layer.gain.mul_(2)  # the gain alone changes too
        torch.testing.assert_close(
            layer(x), torch.nn.functional.conv2d(x, original(layer), layer.bias)
        )
    calls.clear()
    y = layer(x)  # recording gradients: computed every call, differentiable
    assert calls and y.requires_grad


def test_to_conv2d():
    layer = nk.StdConv2d(3, 4, 3, stride=2, padding=1)
    plain = layer.to_conv2d()
    assert type(plain) is torch.nn.Conv2d
    x = make_input((2, 3, 7, 7))
    torch.testing.assert_close(plain(x), layer(x))


@pytest.mark.parametrize("cls", [nk.StdConv2d, nk.ScaledStdConv2d, nk.CenteredConv2d])
def test_compile_and_torch_func(cls):
    layer = _conv(cls)
    x = make_input((2, 6, 5, 5), seed=4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
    params = dict(layer.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(
        params
    )
    expected = torch.autograd.grad(layer(x).square().sum(), list(params.values()))
    for (key, g), e in zip(grads.items(), expected, strict=True):
        assert_close(g, e, what=key)  # helpers' float32 tolerance: the two paths round differently


def test_functional_form():
    w = torch.randn(4, 3, 3, 3)
    x = make_input((2, 3, 6, 6))
    y = nkf.std_conv(x, w, None, 1, 1)
    torch.testing.assert_close(
        y, torch.nn.functional.conv2d(x, nkf.standardized_weight(w), padding=1)
    )
    with pytest.raises(nk.errors.ConfigError, match="gain"):
        nkf.standardized_weight(w, gain=torch.ones(3))

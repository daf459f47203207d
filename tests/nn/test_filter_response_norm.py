"""FilterResponseNorm + TLU: numerically timm's FilterResponseNormTlu2d (and its activation-free
FilterResponseNormAct2d), state_dicts both ways, the learned epsilon, (N, C) inputs, and the
TLU's threshold gradient against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters, reference_directional_derivative
from normkit import reference as R

timm_layers = pytest.importorskip(
    "timm.layers", reason="timm is in the dev extra's install (make test)"
)

BACKENDS = ["native", "reference"]


def _pair(tlu=True, eps=1e-5):
    ours = nk.FilterResponseNorm(8, eps=eps, tlu=tlu)
    randomize_parameters(ours)
    if tlu:
        with torch.no_grad():
            ours.tau.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
        theirs = timm_layers.FilterResponseNormTlu2d(8, eps=eps)
    else:
        theirs = timm_layers.FilterResponseNormAct2d(8, apply_act=False, eps=eps)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())  # the same keys both ways
    return ours, theirs


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tlu", [True, False])
def test_equals_timm(tlu, channels_last, backend_name):
    """float32 forward and every gradient within helpers' float32 tolerance (timm computes the
    statistic in float32 too)."""
    ours, theirs = _pair(tlu)
    x = make_input((4, 8, 7, 6), channels_last=channels_last, seed=2)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with nk.backend(backend_name):
        ya = ours(a)
    yb = theirs(b)
    dy = make_input(x.shape, seed=3)
    ya.backward(dy)
    yb.backward(dy)
    assert_close(ya, yb, what="output")
    assert_close(a.grad, b.grad, what="input grad")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p.grad, q.grad, what=f"grad of {name}")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_tlu_threshold_and_learned_eps_gradients(backend_name):
    """The gradients of tau (where the TLU clips) and of the learned epsilon against the float64
    oracle's derivative, on a 1x1 map where epsilon matters (the paper's §3.1 case)."""
    layer = nk.FilterResponseNorm(4, eps=1e-6, learnable_eps=True).double()
    randomize_parameters(layer)
    with torch.no_grad():
        layer.tau.fill_(0.8)
        layer.learned_eps.fill_(0.3)
    x = make_input((5, 4, 1, 1), torch.float64, seed=4).requires_grad_()
    with nk.backend(backend_name):
        y = layer(x)
    weights = make_input(x.shape, torch.float64, seed=5)
    grads = torch.autograd.grad((y * weights).sum(), [x, *layer.parameters()])
    names = [n for n, _ in layer.named_parameters()]
    generator = torch.Generator().manual_seed(6)
    directions = [torch.randn(t.shape, generator=generator, dtype=torch.float64)
                  for t in (x, *layer.parameters())]  # fmt: skip

    def f(x_, *params):
        p = dict(zip(names, params, strict=True))
        return R.filter_response_norm(
            x_, p["weight"], p["bias"], p["tau"], 1e-6 + abs(p["learned_eps"]).reshape(1, -1, 1, 1)
        )

    numeric = reference_directional_derivative(
        f, [t.detach().numpy() for t in (x, *layer.parameters())],
        [d.numpy() for d in directions], weights.numpy(), step=1e-5,
    )  # fmt: skip
    autograd = sum(float((g * d).sum()) for g, d in zip(grads, directions, strict=True))
    assert abs(autograd - numeric) <= 1e-7 * max(1.0, abs(numeric))
    assert (y.detach() >= 0.8).all() and (y.detach() == 0.8).any()  # the TLU at work


def test_two_dimensional_input_is_a_one_by_one_map():
    layer = nk.FilterResponseNorm(4, learnable_eps=True)
    x = make_input((3, 4), seed=1)
    torch.testing.assert_close(layer(x), layer(x[:, :, None, None])[:, :, 0, 0])


def test_samples_are_independent():
    layer = nk.FilterResponseNorm(8)
    x = make_input((6, 8, 5, 5), seed=7)
    torch.testing.assert_close(layer(x)[2:3], layer(x[2:3]))

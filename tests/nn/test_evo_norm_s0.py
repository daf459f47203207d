"""EvoNormS0: numerically timm's EvoNorm2dS0 (groups and group_size), its state_dict keys, the
gate-free form, per-sample independence and its group checks."""

from __future__ import annotations

import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters
from normkit import reference as R

timm_layers = pytest.importorskip(
    "timm.layers", reason="timm is in the dev extra's install (make test)"
)


@pytest.mark.parametrize("backend_name", ["native", "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("grouping", [{"groups": 4}, {"group_size": 2}, {"groups": 16}])
def test_equals_timm(grouping, channels_last, backend_name):
    ours = nk.EvoNormS0(16, **grouping)
    randomize_parameters(ours)
    theirs = timm_layers.EvoNorm2dS0(16, **grouping)
    theirs.load_state_dict(ours.state_dict())
    assert theirs.groups == ours.groups
    x = make_input((4, 16, 5, 6), channels_last=channels_last, seed=1)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with nk.backend(backend_name):
        ya = ours(a)
    yb = theirs(b)
    dy = make_input(x.shape, seed=2)
    ya.backward(dy)
    yb.backward(dy)
    assert_close(ya, yb, what="output")
    assert_close(a.grad, b.grad, what="input grad")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p.grad, q.grad, what=f"grad of {name}")


@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_without_the_gate(backend_name):
    layer = nk.EvoNormS0(8, groups=2, apply_act=False).double()
    randomize_parameters(layer)
    assert layer.v is None and "v" not in layer.state_dict()
    x = make_input((3, 8, 4, 4), torch.float64, seed=3).requires_grad_()
    with nk.backend(backend_name):
        y = layer(x)
    expected = R.evo_norm_s0(x.detach().numpy(), None, layer.weight.detach().numpy(),
                             layer.bias.detach().numpy(), 2, layer.eps)  # fmt: skip
    assert_close(y, torch.from_numpy(expected), torch.float64)
    y.sum().backward()  # the gate-free backward runs
    assert torch.isfinite(x.grad).all()


def test_samples_are_independent_and_groups_are_checked():
    layer = nk.EvoNormS0(8, groups=4)
    x = make_input((5, 8, 3, 3), seed=4)
    torch.testing.assert_close(layer(x)[1:2], layer(x[1:2]))
    with pytest.raises(nk.errors.ConfigError, match="divisible"):
        nk.EvoNormS0(10, groups=4)
    with pytest.raises(nk.errors.ConfigError, match="group_size"):
        nk.EvoNormS0(10, group_size=4)

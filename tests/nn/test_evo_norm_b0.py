"""EvoNormB0: numerically timm's EvoNorm2dB0 in training and eval (outputs, gradients, running
variance), timm's checkpoints load, BatchNorm's running-statistics conventions (momentum=None,
unbiased variance, the non-finite guard), and no running_mean."""

from __future__ import annotations

import numpy as np
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
def test_equals_timm_over_training_and_eval_steps(channels_last, backend_name):
    ours = nk.EvoNormB0(8, eps=1e-3, momentum=0.2)
    randomize_parameters(ours)
    theirs = timm_layers.EvoNorm2dB0(8, eps=1e-3, momentum=0.2)
    missing = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert missing.unexpected_keys == ["num_batches_tracked"] and not missing.missing_keys
    for step, training in enumerate((True, True, False)):
        ours.train(training)
        theirs.train(training)
        x = make_input((6, 8, 5, 4), channels_last=channels_last, seed=step)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        with nk.backend(backend_name):
            ya = ours(a)
        yb = theirs(b)
        dy = make_input(x.shape, seed=10 + step)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(ya, yb, what=f"step {step} output")
        assert_close(a.grad, b.grad, what=f"step {step} input grad")
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(p.grad, q.grad, what=f"step {step} grad of {name}")
            p.grad = q.grad = None
        assert_close(ours.running_var, theirs.running_var, what=f"step {step} running_var")
    assert int(ours.num_batches_tracked) == 2


def test_timm_checkpoint_loads_and_keys():
    theirs = timm_layers.EvoNorm2dB0(8)
    ours = nk.EvoNormB0(8)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    assert sorted(ours.state_dict()) == [
        "bias",
        "num_batches_tracked",
        "running_var",
        "v",
        "weight",
    ]
    assert ours.running_mean is None


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_variance_is_batch_norms_rule(momentum):
    layer = nk.EvoNormB0(4, momentum=momentum).double()
    expected = np.ones(4)
    for k in range(3):
        x = make_input((5, 4, 3, 3), torch.float64, seed=k)
        layer(x)
        _, var_b = R.evo_norm_b0(x.numpy(), np.ones(4), np.ones(4), np.zeros(4))
        m = x.numel() // 4
        factor = momentum if momentum is not None else 1.0 / (k + 1)
        expected = (1 - factor) * expected + factor * var_b * m / (m - 1)
        assert_close(layer.running_var, torch.from_numpy(expected), torch.float64)


def test_non_finite_batch_is_kept_out():
    layer = nk.EvoNormB0(4)
    before = layer.running_var.clone()
    x = make_input((4, 4, 3, 3))
    x[0, 1, 0, 0] = float("nan")
    layer(x)
    torch.testing.assert_close(layer.running_var, before)
    assert int(layer.num_batches_skipped) == 1 and int(layer.num_batches_tracked) == 0
    with pytest.raises(nk.errors.NonFiniteStatisticsError):
        nk.EvoNormB0(4, on_nonfinite="raise")(x)


def test_eval_without_running_statistics_uses_the_batch():
    layer = nk.EvoNormB0(4, track_running_stats=False).eval()
    x = make_input((4, 4, 3, 3))
    train_out = layer.train()(x)
    torch.testing.assert_close(layer.eval()(x), train_out)

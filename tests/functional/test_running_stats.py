"""Running statistics you can trust: the non-finite guard, undo and freeze, momentum conventions."""

import warnings

import pytest
import torch

import normkit as nk
from normkit.errors import ConfigError, NonFiniteStatisticsError
from normkit.functional._running_stats import _commit_on_device

STATEFUL = {
    "batch_norm": lambda **kw: nk.BatchNorm2d(3, **kw),
    "instance_norm": lambda **kw: nk.InstanceNorm2d(3, track_running_stats=True, **kw),
}


def _poisoned(value=float("nan"), dtype=torch.float32):
    x = torch.randn(4, 3, 5, 5, dtype=dtype)
    x[1, 2, 3, 3] = value
    return x


def _trained(make, **kw):
    layer = make(**kw)
    layer(torch.randn(4, 3, 5, 5) * 2 + 1)
    return layer


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("kind", list(STATEFUL))
def test_nonfinite_batch_is_skipped_and_counted(kind, bad, backend):
    layer = _trained(STATEFUL[kind])
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    y = layer(_poisoned(bad))
    assert not torch.isfinite(y).all()  # the output is what it is; the state is protected
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
    assert int(layer.num_batches_tracked) == 1 and int(layer.num_batches_skipped) == 1
    layer(torch.randn(4, 3, 5, 5))  # and the next good batch is taken as usual
    assert int(layer.num_batches_tracked) == 2 and not torch.equal(layer.running_mean, mean)


def test_float16_overflow_step_is_skipped(backend):
    """The case a GradScaler skips: float16 activations that overflow to Inf."""
    bn = nk.BatchNorm2d(3).half()
    x = torch.full((4, 3, 2, 2), 6e4, dtype=torch.float16)
    x[0] *= 2  # 1.2e5 overflows float16 to inf
    bn(x)
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert int(bn.num_batches_skipped) == 1


def test_skipped_step_still_backpropagates(backend):
    """A skipped update must not break backward (GradScaler needs the Inf gradients to see them)."""
    bn = nk.BatchNorm2d(3)
    x = _poisoned().requires_grad_()
    bn(x).sum().backward()
    assert x.grad is not None and bn.weight.grad is not None


def test_raise_policy_names_the_layer_and_leaves_state(backend):
    bn = _trained(STATEFUL["batch_norm"], on_nonfinite="raise")
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(NonFiniteStatisticsError, match=r"BatchNorm2d\(3.*not finite"):
        bn(_poisoned())
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert int(bn.num_batches_skipped) == 1


def test_warn_policy_warns_and_skips(backend):
    bn = _trained(STATEFUL["batch_norm"], on_nonfinite="warn")
    mean = bn.running_mean.clone()
    with pytest.warns(RuntimeWarning, match="not finite"):
        bn(_poisoned())
    assert torch.equal(bn.running_mean, mean)


def test_skip_policy_is_silent(backend):
    bn = _trained(STATEFUL["batch_norm"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(_poisoned())


@pytest.mark.parametrize("finite", [True, False])
def test_device_guard_selects_without_host_sync(finite):
    """The accelerator/captured path, run on CPU tensors: same decisions, made with torch.where."""
    mean, var = torch.zeros(3), torch.ones(3)
    tracked, skipped = torch.tensor(0), torch.tensor(0)
    new_mean = torch.full((3,), 0.5)
    new_var = torch.full((3,), 2.0 if finite else float("nan"))
    flag = torch.isfinite(new_var).all()
    _commit_on_device(mean, var, new_mean, new_var, flag, tracked, skipped, count=2)
    assert torch.equal(mean, torch.full((3,), 0.5 if finite else 0.0))
    assert torch.equal(var, torch.full((3,), 2.0 if finite else 1.0))
    assert (int(tracked), int(skipped)) == ((2, 0) if finite else (0, 1))


def test_functional_guard_protects_plain_buffers(backend):
    mean, var = torch.zeros(3), torch.ones(3)
    nk.functional.batch_norm(_poisoned(), mean, var, training=True)
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))


# --- undo and freeze ------------------------------------------------------------------------------


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        nk.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.BatchNorm2d(4),  # torch.nn's layers are covered too
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
        nk.BatchNorm1d(2, momentum=None),
    )


def test_snapshot_restore_undoes_updates():
    model = _model()
    model(torch.randn(8, 3, 5, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = nk.snapshot_running_stats(model)
    assert len(snapshot) == 3
    model(torch.randn(8, 3, 5, 5) * 3)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    snapshot.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_frozen_running_stats_keeps_batch_statistics_and_state():
    model = _model().train()
    x = torch.randn(8, 3, 5, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with nk.frozen_running_stats(model):
        y = model(x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(y, model(x))  # same batch statistics as an ordinary train forward
    assert model.training


# --- momentum conventions -------------------------------------------------------------------------


def test_decay_is_keras_momentum():
    assert nk.BatchNorm2d(3, decay=0.99).momentum == pytest.approx(0.01)
    assert nk.InstanceNorm1d(3, decay=0.9).momentum == pytest.approx(0.1)
    assert nk.momentum_from_decay(0.999) == pytest.approx(0.001)


def test_decay_and_momentum_together_is_an_error():
    with pytest.raises(ConfigError, match="either momentum .* or decay"):
        nk.BatchNorm2d(3, momentum=0.2, decay=0.9)


def test_keras_style_momentum_warns():
    with pytest.warns(UserWarning, match="decay=0.99"):
        nk.BatchNorm2d(3, momentum=0.99)


def test_running_stats_follow_pytorch_convention(backend):
    """running = (1 - m) running + m batch, variance unbiased (closed form after one step)."""
    bn = nk.BatchNorm1d(2, momentum=0.25)
    x = torch.tensor([[1.0, 10.0], [3.0, 20.0], [8.0, 60.0]])
    bn(x)
    expected_mean = 0.25 * x.mean(0)
    expected_var = 0.75 + 0.25 * x.var(0, unbiased=True)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)


def test_instance_norm_cumulative_average(backend):
    """momentum=None averages the batches (torch.nn's InstanceNorm leaves the statistics at init)."""
    layer = nk.InstanceNorm1d(2, momentum=None, track_running_stats=True)
    batches = [torch.randn(3, 2, 6) * (s + 1) + s for s in range(4)]
    for batch in batches:
        layer(batch)
    means = torch.stack([b.mean(2).mean(0) for b in batches])
    variances = torch.stack([b.var(2, unbiased=True).mean(0) for b in batches])
    torch.testing.assert_close(layer.running_mean, means.mean(0))
    torch.testing.assert_close(layer.running_var, variances.mean(0))
    assert int(layer.num_batches_tracked) == 4


@pytest.mark.parametrize("kind", list(STATEFUL))
def test_empty_batch_leaves_state(kind, backend):
    layer = _trained(STATEFUL[kind], momentum=None)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key

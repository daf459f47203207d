"""Batch Renormalization (Ioffe 2017): Algorithm 1 against the float64 oracle, its defining
properties (r_max=1, d_max=0 is BatchNorm; eval is BatchNorm eval), the schedule and its counter,
checkpoints, mixed precision."""

import numpy as np
import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters
from normkit import reference as R
from normkit.errors import ConfigError

SHAPES = [(6, 3), (5, 3, 7), (4, 3, 5, 6), (2, 3, 3, 2, 3), (3, 3, 2, 2, 2, 2)]
DTYPES = [torch.float32, torch.float64]


def _layer(shape, dtype, **kwargs):
    layer = nk.BatchRenorm(shape[1], **kwargs).to(dtype)
    randomize_parameters(layer)
    with torch.no_grad():  # running statistics away from the batch's, so r and d are not trivial
        layer.running_mean.copy_(torch.linspace(-1.0, 1.5, shape[1]))
        layer.running_var.copy_(torch.linspace(0.3, 6.0, shape[1]))
    return layer


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_matches_algorithm_1(shape, dtype, backend):
    """Output, gradients (r, d held constant) and the moving mean and deviation, over 3 steps with
    bounds that clip some channels and not others."""
    layer = _layer(shape, dtype, r_max=1.5, d_max=0.4, momentum=0.3)
    eps = layer.eps
    mu = layer.running_mean.double().numpy().copy()
    sigma = np.sqrt(layer.running_var.double().numpy() + eps)
    gamma, beta = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    rng = np.random.default_rng(0)
    clipped = []
    for step in range(3):
        x = rng.normal(0.5, 2.0, shape)
        dy = rng.normal(size=shape)
        expected, mu, sigma, r, d = R.batch_renorm_train(
            x, gamma, beta, mu, sigma, 1.5, 0.4, 0.3, eps
        )
        dx, dgamma, dbeta = R.batch_renorm_backward(dy, x, gamma, r, d, eps)
        leaf = torch.tensor(x, dtype=dtype, requires_grad=True)
        layer.zero_grad()
        y = layer(leaf)
        y.backward(torch.tensor(dy, dtype=dtype))
        label = f"step {step}"
        assert_close(y, torch.tensor(expected), dtype, f"{label} output")
        assert_close(leaf.grad, torch.tensor(dx), dtype, f"{label} dx")
        assert_close(layer.weight.grad, torch.tensor(dgamma), dtype, f"{label} dgamma")
        assert_close(layer.bias.grad, torch.tensor(dbeta), dtype, f"{label} dbeta")
        assert_close(layer.running_mean, torch.tensor(mu), dtype, f"{label} moving mean")
        # running_var holds sigma^2 - eps, so that sqrt(running_var + eps) is the moving sigma
        assert_close(layer.running_var, torch.tensor(sigma**2 - eps), dtype, f"{label} sigma")
        clipped.extend(np.isclose(np.abs(np.log(r)), np.log(1.5)) | np.isclose(np.abs(d), 0.4))
    assert any(clipped) and not all(clipped), "the bounds must clip some channels, not all"
    assert int(layer.renorm_step) == 3 and int(layer.num_batches_tracked) == 3


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_r_max_1_d_max_0_is_batch_norm(layout, backend):
    """Outputs and gradients are BatchNorm's exactly (to rounding), and eval is BatchNorm eval."""
    channels_last = layout == "channels_last"
    ours = nk.BatchRenorm2d(4, r_max=1.0, d_max=0.0, momentum=0.1)
    theirs = torch.nn.BatchNorm2d(4)
    randomize_parameters(ours)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    for seed in range(3):
        x = make_input((6, 4, 5, 5), channels_last=channels_last, seed=seed)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = make_input(x.shape, seed=10 + seed, scale=1.0, shift=0.0)
        ours.zero_grad(), theirs.zero_grad()
        y_ours, y_theirs = ours(a), theirs(b)
        y_ours.backward(dy), y_theirs.backward(dy)
        torch.testing.assert_close(y_ours, y_theirs)
        torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
        if channels_last:
            assert y_ours.is_contiguous(memory_format=torch.channels_last)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "renorm_step"})
    x = make_input((3, 4, 5, 5), channels_last=channels_last, seed=9)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_eval_is_batch_norm_eval_with_the_running_statistics(backend):
    layer = _layer((4, 3, 4, 4), torch.float64, r_max=2.0, d_max=1.0)
    for seed in range(2):
        layer(make_input((4, 3, 4, 4), torch.float64, seed=seed))
    layer.eval()
    x = make_input((2, 3, 4, 4), torch.float64, seed=5)
    expected = R.batch_norm_inference(
        x.numpy(), layer.running_mean.numpy(), layer.running_var.numpy(),
        layer.weight.detach().numpy(), layer.bias.detach().numpy(), layer.eps,
    )  # fmt: skip
    assert_close(layer(x), torch.tensor(expected), torch.float64, "eval")
    assert int(layer.renorm_step) == 2  # eval does not advance the schedule


def test_ramp_schedule_values():
    ramp = nk.RenormRamp.paper_r_max()
    assert [ramp(s) for s in (0, 4999, 5000, 22500, 40000, 10**7)] == [1, 1, 1, 2, 3, 3]
    d = nk.RenormRamp.paper_d_max()
    assert [d(s) for s in (0, 5000, 15000, 25000)] == [0, 0, 2.5, 5]
    steps = torch.tensor([0, 5000, 15000, 25000, 30000])
    torch.testing.assert_close(d(steps), torch.tensor([0, 0, 2.5, 5, 5], dtype=torch.float64))


def test_default_schedule_is_plain_batch_norm_at_first_and_ramps_with_the_step():
    x = make_input((8, 3, 4, 4))
    layer = nk.BatchRenorm2d(3)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.running_mean.fill_(5.0)  # far from the batch: any correction would show
    torch.testing.assert_close(layer(x), bn(x))  # step 0: r_max = 1, d_max = 0
    layer.renorm_step.fill_(40000)  # r_max = 3, d_max = 5: the correction applies
    assert not torch.allclose(layer(x), bn(x), atol=1e-3)
    assert int(layer.renorm_step) == 40001


def test_callable_schedule_gets_the_step():
    seen = []

    def r_max(step):
        seen.append(step)
        return 1.0 + step

    layer = nk.BatchRenorm1d(3, r_max=r_max, d_max=0.0)
    for _ in range(3):
        layer(torch.randn(5, 3))
    assert seen == [0, 1, 2]
    layer.r_max = lambda step: 0.5
    with pytest.raises(ConfigError, match="r_max schedule's value at step 3"):
        layer(torch.randn(5, 3))


def test_state_dict_has_batch_norms_keys_and_the_step_round_trips():
    """The keys are exactly BatchNorm2d's, so a Batch Renorm checkpoint loads strictly into
    torch.nn.BatchNorm2d (issue 20, item 9); the schedule's step comes back from the batches the
    running statistics have seen."""
    layer = nk.BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    for seed in range(4):
        layer(make_input((4, 3, 2, 2), seed=seed))
    state = layer.state_dict()
    assert set(state) == set(torch.nn.BatchNorm2d(3).state_dict())
    torch.nn.BatchNorm2d(3).load_state_dict(state)  # strict
    other = nk.BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    other.load_state_dict(state)
    assert int(other.renorm_step) == 4
    for key, value in state.items():
        assert torch.equal(other.state_dict()[key], value), key


def test_older_checkpoints_with_the_step_still_load():
    layer = nk.BatchRenorm2d(3)
    old = {**layer.state_dict(), "renorm_step": torch.tensor(123)}
    other = nk.BatchRenorm2d(3)
    other.load_state_dict(old)  # strict
    assert int(other.renorm_step) == 123


def test_batch_norm_checkpoint_starts_the_schedule_at_its_batch_count():
    bn = torch.nn.BatchNorm2d(3)
    for seed in range(7):
        bn(make_input((4, 3, 2, 2), seed=seed))
    layer = nk.BatchRenorm2d(3)
    layer.load_state_dict(bn.state_dict())  # strict: the missing counter is filled in
    assert int(layer.renorm_step) == 7
    old = bn.state_dict()
    del old["num_batches_tracked"]
    old._metadata = {"": {"version": 1}}
    fresh = nk.BatchRenorm2d(3)
    fresh.load_state_dict(old)
    assert int(fresh.renorm_step) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_keep_float32_statistics(dtype, backend):
    """Values whose variance overflows float16 (|x| ~ 300: x^2 ~ 9e4 > 65504) normalize without NaN:
    the statistics are float32, and the output is the float64 result rounded once."""
    layer = nk.BatchRenorm1d(3, r_max=2.0, d_max=1.0, momentum=0.5)
    x64 = make_input((16, 3, 8), torch.float64, scale=300.0, shift=50.0)
    exact = nk.BatchRenorm1d(3, r_max=2.0, d_max=1.0, momentum=0.5).double()
    for _ in range(2):
        y = layer(x64.to(dtype))
        expected = exact(x64.to(dtype).double())
        assert torch.isfinite(y).all() and y.dtype == dtype
        assert_close(y, expected, dtype, "half output")
        assert_close(layer.running_var, exact.running_var, dtype, "running_var")


def test_bad_configuration_is_refused():
    with pytest.raises(ConfigError, match="track_running_stats=True"):
        nk.BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ConfigError, match="r_max must be a number >= 1"):
        nk.BatchRenorm2d(3, r_max=0.5)
    with pytest.raises(ConfigError, match="d_max must be a number >= 0"):
        nk.BatchRenorm2d(3, d_max=-1.0)
    with pytest.raises(ConfigError, match="end_step"):
        nk.RenormRamp(1.0, 3.0, 100, 10)
    with pytest.raises(ConfigError, match="r_max"):
        nk.BatchRenorm2d(3, r_max=nk.RenormRamp(0.5, 3.0, 0, 10))
    with pytest.raises(ConfigError, match="running_mean and running_var"):
        nk.functional.batch_renorm(torch.randn(4, 3), None, None, training=True)


def test_decay_is_accepted_in_place_of_the_paper_momentum():
    layer = nk.BatchRenorm1d(3, decay=0.99)
    assert layer.momentum == pytest.approx(0.01)

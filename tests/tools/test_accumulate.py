"""nk.accumulate against one training pass over the concatenated batch, in float64: the running
statistics of every taking-part layer after k micro-batches equal the large batch's, over several
optimizer steps, whatever ends the step (a count, the optimizer, step(), leaving the block); Ghost
BN, MABN and CBN keep their own rules; other layers with running statistics refuse; non-finite
micro-batches skip the step; whole_batch=True gives the large batch's forward exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters
from normkit import reference as R

LAYERS = {
    "torch_bn": lambda: torch.nn.BatchNorm2d(6),
    "torch_bn_momentum_none": lambda: torch.nn.BatchNorm2d(6, momentum=None),
    "nk_bn": lambda: nk.BatchNorm2d(6, momentum=0.3),
    "nk_bn_momentum_none": lambda: nk.BatchNorm2d(6, momentum=None),
    "batch_norm_act": lambda: nk.BatchNormAct(6, activation="silu"),
    "inplace_abn": lambda: nk.InPlaceABN(6),
    "batch_renorm": lambda: nk.BatchRenorm2d(6, r_max=1.5, d_max=0.5, momentum=0.2),
    "sync_bn_one_process": lambda: nk.SyncBatchNorm(6),
}


def _model(layer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), layer).double()
    randomize_parameters(model[1])
    with torch.no_grad():  # running statistics away from their initial values
        if model[1].running_mean is not None:
            model[1].running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
        model[1].running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
    return model


def _batch(step, n=12):
    return make_input((n, 3, 6, 6), torch.float64, seed=step, scale=1.0 + step, shift=step)


def _assert_same_state(model, large, what):
    for (key, value), expected in zip(
        model.state_dict().items(), large.state_dict().values(), strict=True
    ):
        if value.is_floating_point():
            assert_close(value, expected, torch.float64, f"{what}: {key}")
        else:
            assert torch.equal(value, expected), f"{what}: {key} {value} != {expected}"


@pytest.mark.parametrize("name", list(LAYERS))
def test_running_statistics_are_the_concatenated_batchs(name):
    model = _model(LAYERS[name]())
    large = copy.deepcopy(model)
    for step in range(3):
        batch = _batch(step)
        with nk.accumulate(model, micro_batches=3):
            for micro in batch.split([5, 4, 3]):  # uneven micro-batches
                model(micro.clone()).square().mean().backward()
        large(batch.clone()).square().mean().backward()
        _assert_same_state(model, large, f"{name} step {step}")
    assert int(model[1].num_batches_tracked) == 3


def test_against_the_float64_reference():
    """The closed form: one exponential-average step on the concatenation (Chan's merge of the
    micro-batches equals the statistics of their union)."""
    model = torch.nn.BatchNorm2d(4, momentum=0.25).double()
    micro = [make_input((n, 4, 3, 3), torch.float64, seed=n, shift=n) for n in (2, 5, 3)]
    mean, var = model.running_mean.numpy().copy(), model.running_var.numpy().copy()
    with nk.accumulate(model, micro_batches=3):
        for x in micro:
            model(x)
    expected = R.accumulated_running_average(mean, var, [x.numpy() for x in micro], 0.25)
    assert_close(model.running_mean, torch.from_numpy(expected[0]), torch.float64)
    assert_close(model.running_var, torch.from_numpy(expected[1]), torch.float64)


def test_the_step_ends_by_optimizer_by_step_and_on_exit():
    model = _model(nk.BatchNorm2d(6))
    large = copy.deepcopy(model)
    # lr 0: the optimizer steps (and ends the accumulation step) without moving the weights, which
    # the micro-batches' gradients would move differently from the large batch's
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    large_optimizer = torch.optim.SGD(large.parameters(), lr=0.0)
    with nk.accumulate(model, optimizer=optimizer) as acc:  # accelerate/Lightning: the optimizer
        for step in range(2):
            batch = _batch(step)
            for micro in batch.chunk(4):
                model(micro).square().mean().backward()
            assert acc.pending == {"1": 4}
            for p in model.parameters():
                p.grad /= 4
            optimizer.step()
            optimizer.zero_grad()
            assert acc.pending == {}
            large(batch).square().mean().backward()
            large_optimizer.step()
            large_optimizer.zero_grad()
            _assert_same_state(model, large, f"optimizer step {step}")
    with nk.accumulate(model) as acc:  # by hand
        batch = _batch(5)
        for micro in batch.chunk(2):
            model(micro)
        acc.step()
        large(batch)
        _assert_same_state(model, large, "step()")
    with nk.accumulate(model, micro_batches=4):  # leaving the block ends a partial step
        batch = _batch(6, n=6)
        for micro in batch.chunk(2):
            model(micro)
    large(batch)
    _assert_same_state(model, large, "exit")
    assert "forward" not in model[1].__dict__  # the layers are as they were


def test_own_rules_and_eval_are_untouched():
    """Ghost BN, MABN and CBN update per micro-batch exactly as without nk.accumulate; eval-mode
    calls and frozen BatchNorm are passed through."""
    layers = [nk.GhostBatchNorm(6, virtual_batch_size=2), nk.MovingAverageBatchNorm(6, window=2),
              nk.CrossIterationBatchNorm(6, window=2, compensate=False)]  # fmt: skip
    for layer in layers:
        plain = _model(layer)
        inside = copy.deepcopy(plain)
        batch = _batch(0)
        with nk.accumulate(inside, micro_batches=3):
            for micro in batch.chunk(3):
                inside(micro).sum().backward()
        for micro in batch.chunk(3):
            plain(micro).sum().backward()
        _assert_same_state(inside, plain, type(layer).__name__)
    model = _model(nk.BatchNorm2d(6)).eval()
    before = copy.deepcopy(model.state_dict())
    with nk.accumulate(model, micro_batches=2):
        model(_batch(0))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "layer",
    [nk.InstanceNorm2d(6, track_running_stats=True), nk.EvoNormB0(6), nk.SwitchableNorm(6)],
    ids=["instance_norm", "evonorm_b0", "switchable"],
)
def test_layers_that_cannot_take_part_refuse(layer):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), layer).double()
    before = copy.deepcopy(model.state_dict())
    with (
        pytest.raises(nk.errors.ConfigError, match="cannot make"),
        nk.accumulate(model, micro_batches=2),
    ):
        model(_batch(0))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert "forward" not in model[1].__dict__
    model.eval()
    with nk.accumulate(model, micro_batches=2):
        model(_batch(0))  # eval: nothing to accumulate, no error


def test_a_non_finite_micro_batch_skips_the_step():
    model = _model(nk.BatchNorm2d(6))
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    with nk.accumulate(model, micro_batches=2):
        bad = _batch(0, n=4)
        bad[0, 0, 0, 0] = float("nan")
        model(bad)
        model(_batch(1, n=4))
    torch.testing.assert_close(model[1].running_mean, before["running_mean"])
    torch.testing.assert_close(model[1].running_var, before["running_var"])
    assert int(model[1].num_batches_tracked) == int(before["num_batches_tracked"])
    assert int(model[1].num_batches_skipped) == 1


def test_whole_batch_forward_is_the_large_batchs():
    """whole_batch=True: every output equals the large batch's (the forward is exact); the
    running statistics too; the passes are one per BatchNorm depth plus one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3), nk.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(16, 2),
    ).double()  # fmt: skip
    large = copy.deepcopy(model)
    batch = _batch(0)
    micro = list(batch.split([4, 5, 3]))
    with nk.accumulate(model, micro_batches=3, whole_batch=True) as acc:
        assert acc.prepare(micro) == 3
        outputs = [model(x) for x in micro]
    expected = large(batch)
    assert_close(torch.cat(outputs), expected, torch.float64, "outputs")
    _assert_same_state(model, large, "whole batch")
    with (
        pytest.raises(nk.errors.ConfigError, match="prepare"),
        nk.accumulate(model, whole_batch=True),
    ):
        model(micro[0])


def test_whole_batch_gradient_is_closer_to_the_large_batchs():
    """whole_batch=True: the parameters' gradients are closer to the large batch's than plain
    accumulation's (which normalizes with each micro-batch's statistics), yet not equal (the
    gradient statistics come from each micro-batch)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6),
                                torch.nn.ReLU(), torch.nn.Conv2d(6, 2, 4)).double()  # fmt: skip
    batch = _batch(0, n=16)
    target = make_input((16, 2, 1, 1), torch.float64, seed=3)

    def gradients(whole: bool | None):
        m = copy.deepcopy(model)
        if whole is None:
            torch.nn.functional.mse_loss(m(batch), target, reduction="sum").backward()
        else:
            with nk.accumulate(m, micro_batches=4, whole_batch=whole) as acc:
                if whole:
                    acc.prepare(list(batch.chunk(4)))
                for x, t in zip(batch.chunk(4), target.chunk(4), strict=True):
                    torch.nn.functional.mse_loss(m(x), t, reduction="sum").backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    exact, whole, plain = gradients(None), gradients(True), gradients(False)
    error_whole = float((whole - exact).norm() / exact.norm())
    error_plain = float((plain - exact).norm() / exact.norm())
    assert error_whole < error_plain, (error_whole, error_plain)
    assert error_whole > 1e-6  # not the large batch's gradient: the cross terms are missing


def test_argument_errors():
    model = _model(nk.BatchNorm2d(6))
    with pytest.raises(nk.errors.ConfigError, match="micro_batches"):
        nk.accumulate(model, micro_batches=0)
    with pytest.raises(nk.errors.ConfigError, match="optimizer"):
        nk.accumulate(model, optimizer=object())
    acc = nk.accumulate(model)
    with acc, pytest.raises(nk.errors.ConfigError, match="already active"):
        acc.__enter__()
    assert np.isfinite(float(model[1].running_var.sum()))

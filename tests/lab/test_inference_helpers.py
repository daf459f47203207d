"""The pieces part 4 of the lab is built from: the extra EMAs, freezing BN late in training, the
batch-statistics error, and the variance of the normalized activations."""

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.lab.datasets import Dataset
from normkit.lab.evaluation import accuracy_and_loss, error_percent, on_test_set
from normkit.lab.experiments.train_test_gap import FreezeBatchNorm
from normkit.lab.experiments.variance_bias import _biased, normalized_variance
from normkit.lab.population import (
    EmaTracker,
    batch_norm_layers,
    batch_statistics,
    error_rate,
    precise,
    training_batches,
)


def _net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nk.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8, bias=False), nk.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


def _train(model, steps, batch=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, 1, 8, 8, generator=generator) * 2 + 1
        y = torch.randint(0, 3, (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_ema_tracker_at_the_layers_momentum_equals_the_layers_running_statistics():
    torch.manual_seed(0)
    tracker = EmaTracker(_net(), momenta=(0.1, 0.01))
    _train(tracker, 12)
    assert int(tracker.steps) == 12
    for path, layer in batch_norm_layers(tracker.net).items():
        mean, var = tracker.ema(0)[path]  # uncorrected, as the layer keeps it
        torch.testing.assert_close(mean, layer.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, layer.running_var, rtol=1e-5, atol=1e-6)
        slow_mean, _ = tracker.ema(1)[path]
        assert not torch.allclose(slow_mean, layer.running_mean)  # the 0.01 EMA lags behind
    assert any(name.startswith("ema1_") for name in tracker.state_dict())  # resumable


def test_bias_corrected_ema_averages_the_batch_statistics_alone():
    """Adam's correction (Kingma & Ba 2015, §3): after t updates at momentum m the EMA is
    λᵗ·initial + Σᵢ m λ^(t−i) bᵢ (λ = 1 − m); corrected, it is Σᵢ m λ^(t−i) bᵢ / (1 − λᵗ), whose
    weights sum to 1, so the initial (0, 1) no longer counts. After one update it is that batch's."""
    torch.manual_seed(0)
    tracker = EmaTracker(_net(), momenta=(0.01, 0.3))
    layer = tracker.net[1]
    seen = []

    def record(module, args):
        if module.training:
            seen.append(args[0].detach().double())

    layer.register_forward_pre_hook(record)
    for t in (1, 5):
        _train(tracker, t - len(seen), seed=t)
        for k, m in enumerate(tracker.momenta):
            lam = 1 - m
            weights = [m * lam ** (t - 1 - i) for i in range(t)]
            means = [x.mean((0, 2, 3)) for x in seen]
            variances = [x.var((0, 2, 3), unbiased=True) for x in seen]
            expected_mean = sum(w * b for w, b in zip(weights, means, strict=True)) / (1 - lam**t)
            expected_var = sum(w * b for w, b in zip(weights, variances, strict=True)) / (1 - lam**t)
            mean, var = tracker.ema(k, corrected=True)["1"]
            torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=1e-5)
            raw_mean, raw_var = tracker.ema(k)["1"]  # uncorrected: still λᵗ of the initial (0, 1)
            close = {"rtol": 1e-4, "atol": 1e-5}
            torch.testing.assert_close(raw_mean.double(), (1 - lam**t) * expected_mean, **close)
            torch.testing.assert_close(raw_var.double(), lam**t + (1 - lam**t) * expected_var, **close)
    snapshot = tracker.use(0, corrected=True)
    torch.testing.assert_close(layer.running_mean, tracker.ema(0, corrected=True)["1"][0])
    snapshot.restore()


def test_ema_tracker_use_swaps_and_restores_and_eval_passes_do_not_update():
    torch.manual_seed(0)
    tracker = EmaTracker(_net(), momenta=(0.5,))
    _train(tracker, 3)
    saved = {k: v.clone() for k, v in tracker.state_dict().items()}
    tracker.eval()
    snapshot = tracker.use(0)
    layer = tracker.net[1]
    assert torch.equal(layer.running_mean, tracker.ema(0)["1"][0])
    snapshot.restore()
    precise(tracker.net, [torch.randn(16, 1, 8, 8) for _ in range(3)])  # hooks run on a copy
    error_rate(tracker, torch.randn(20, 1, 8, 8), torch.randint(0, 3, (20,)))
    for key, value in tracker.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_freeze_batch_norm_calls_the_hook_once_then_keeps_statistics_fixed():
    torch.manual_seed(0)
    calls = []
    model = FreezeBatchNorm(_net(), freeze_at=4, before_freeze=lambda net: calls.append(1))
    _train(model, 4)
    assert calls == [] and not model.frozen
    stats = {k: v.clone() for k, v in model.net.state_dict().items() if "running" in k}
    _train(model, 3, seed=1)
    assert calls == [1] and model.frozen and int(model.steps) == 7
    for key, value in stats.items():
        assert torch.equal(model.net.state_dict()[key], value), key
    # Frozen training forwards are eval-mode forwards: population statistics.
    model.train()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        frozen = model(x)
        model.eval()
        torch.testing.assert_close(frozen, model(x))
    assert FreezeBatchNorm(_net(), None).frozen is False


def test_batch_statistics_error_uses_batch_statistics_and_changes_nothing():
    """``batch_statistics`` (train mode, running statistics frozen) with the error on chunks."""
    torch.manual_seed(0)
    net = _net()
    _train(net, 5)
    net.eval()
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(64, 1, 8, 8) * 2 + 1, torch.randint(0, 3, (64,))
    with batch_statistics(net):
        error = error_rate(net, x, y, chunk=16)
    expected = []
    with nk.frozen_running_stats(net):
        net.train()
        with torch.no_grad():
            for i in range(0, 64, 16):
                expected.append((net(x[i : i + 16]).argmax(1) != y[i : i + 16]).float())
        net.eval()
    assert error == pytest.approx(float(torch.cat(expected).mean()))
    assert not net.training and all(not m.training for m in net.modules())
    for key, value in net.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_normalized_variance_is_the_closed_form_and_biased_scales_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nk.BatchNorm1d(5)).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.arange(5.0))
        model[1].running_var.copy_(torch.linspace(0.5, 2.0, 5))
    x = torch.randn(3000, 5) * 3 + 1
    expected = (x.double().var(0, unbiased=False) / (model[1].running_var.double() + 1e-5)).mean()
    assert normalized_variance(model, x)["1"] == pytest.approx(float(expected), rel=1e-9)
    biased = _biased(model, 4)
    torch.testing.assert_close(biased[1].running_var, model[1].running_var * 0.75)
    ratio = normalized_variance(biased, x)["1"] / normalized_variance(model, x)["1"]
    assert ratio == pytest.approx(4 / 3, rel=1e-4)


def test_training_batches_are_seeded_and_nested():
    x = torch.arange(100.0).unsqueeze(1)
    big = training_batches(x, 8, 64, seed=3)
    assert len(big) == 8 and all(b.shape == (8, 1) for b in big)
    assert all(
        torch.equal(a, b) for a, b in zip(training_batches(x, 8, 16, seed=3), big, strict=False)
    )
    assert len(torch.cat(big).unique()) == 64  # without replacement within a permutation
    assert len(training_batches(x, 8, 1, seed=3)) == 1


def test_on_test_set_is_a_rows_accuracy_or_error_and_loss_on_the_first_test_images():
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    data = Dataset("toy", x, y, x, y, 3, "test")
    model = nn.Linear(4, 3)
    accuracy, loss = accuracy_and_loss(model, x[:20], y[:20])
    assert on_test_set(model, data, 20) == {"test_accuracy": accuracy, "test_loss": loss}
    assert on_test_set(model, data, 20, error=True) == {"test_error": error_percent(accuracy),
                                                        "test_loss": loss}
    assert on_test_set(model, data)["test_accuracy"] == accuracy_and_loss(model, x, y)[0]

"""The protocol ``batch-size`` and ``switchable`` share (issue 17): the normalization batch is a
setting of its own inside a fixed gradient batch, and the hidden fully connected layer has no
normalizer by default."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab import get_experiment, load_dataset
from normkit.lab.plan import Trial
from normkit.lab.small_batch import (
    NORMALIZATION_BATCH_PRESETS,
    NormalizationBatchSettings,
    PerMicrobatch,
    batch_statistics_accuracy,
    small_cnn,
    switchable_importance,
)

SHAPE, CLASSES = (1, 12, 12), 4


def model(normalizer, norm_batch, **options):
    g = torch.Generator().manual_seed(0)
    return small_cnn(SHAPE, CLASSES, normalizer, g, channels=(4, 8), hidden=8, groups=2,
                     hidden_norm=False, norm_batch=norm_batch, **options)  # fmt: skip


@pytest.mark.parametrize("normalizer", ["bn", "brn", "sn", "evo_b0", "mabn", "cbn"])
def test_each_run_of_b_samples_is_normalized_on_its_own(normalizer):
    """In training mode a sample's output depends only on the B samples of its run: changing the
    rest of the gradient batch leaves the first run's outputs alone; without ``norm_batch`` the
    statistics are the whole batch's and they change. (Fresh copies for each call: Batch Renorm's
    correction reads the running statistics a forward updates.)"""
    x = torch.randn(8, *SHAPE)
    y = x.clone()
    y[2:] = torch.randn(6, *SHAPE) * 3 + 1
    per_two = model(normalizer, 2).train()
    torch.testing.assert_close(copy.deepcopy(per_two)(x)[:2], per_two(y)[:2], rtol=1e-5, atol=1e-6)
    whole = model(normalizer, None).train()
    assert not torch.allclose(copy.deepcopy(whole)(x)[:2], whole(y)[:2], atol=1e-3)


def test_a_normalization_batch_of_the_whole_batch_is_plain_batch_norm():
    x = torch.randn(8, *SHAPE)
    per_eight, plain = model("bn", 8).train(), model("bn", None).train()
    torch.testing.assert_close(per_eight(x), plain(x), rtol=1e-5, atol=1e-5)


def test_per_sample_normalizers_ignore_the_normalization_batch():
    for normalizer in ("gn", "ln", "in", "ws_gn", "frn", "evo_s0"):
        assert not any(isinstance(m, (PerMicrobatch, nk.GhostBatchNorm))
                       for m in model(normalizer, 2).modules())  # fmt: skip


LAYERS = {"ws_gn": (nk.StdConv2d, nn.GroupNorm), "frn": (nn.Conv2d, nk.FilterResponseNorm),
          "evo_s0": (nn.Conv2d, nk.EvoNormS0), "evo_b0": (nn.Conv2d, nk.EvoNormB0),
          "mabn": (nk.CenteredConv2d, nk.MovingAverageBatchNorm),
          "cbn": (nn.Conv2d, nk.CrossIterationBatchNorm)}  # fmt: skip


@pytest.mark.parametrize("normalizer", list(LAYERS))
def test_the_small_batch_remedies_are_built_as_their_papers_use_them(normalizer):
    """Issue 18's arms: WS + GN standardizes the convolutions, MABN centres them, CBN is attached
    to the convolution that feeds it; FRN and EvoNorm replace the ReLU after them; the
    batch-dependent ones see each run of B samples (PerMicrobatch); MABN's warm-up scales with the
    run's forwards as Batch Renorm's does."""
    conv, norm = LAYERS[normalizer]
    net = model(normalizer, 2, renorm_steps=1000)
    for index in (1, 2):
        layer = getattr(net, f"norm{index}")
        assert isinstance(layer, PerMicrobatch) == (normalizer in ("evo_b0", "mabn", "cbn"))
        layer = layer.layer if isinstance(layer, PerMicrobatch) else layer
        assert type(getattr(net, f"conv{index}")) is conv and isinstance(layer, norm)
        activating = normalizer in ("frn", "evo_b0", "evo_s0")
        assert isinstance(getattr(net, f"act{index}"), nn.Identity) == activating
        if normalizer == "mabn":
            assert layer.warmup_iters == layer.renorm_iters == 35  # 3.5% of 1000
        if normalizer == "ws_gn":
            assert layer.num_groups == 2
        if normalizer == "cbn":
            assert layer.producer is getattr(net, f"conv{index}")
    x, y = torch.randn(8, *SHAPE), torch.randint(0, CLASSES, (8,))
    nn.functional.cross_entropy(net(x), y).backward()  # trains (CBN: its producer is attached)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    accuracy = batch_statistics_accuracy(net, x, y, 2)  # CBN needs autograd in its forward
    assert 0.0 <= accuracy <= 1.0


def test_no_normalizer_on_the_hidden_layer_by_default_and_sn_weights_keep_their_names():
    assert not NormalizationBatchSettings().hidden_norm
    sn = model("sn", 2)
    assert isinstance(sn.norm3, nn.Identity) and isinstance(sn.linear3, nn.Linear)
    assert sn.linear3.bias is not None
    assert isinstance(sn.norm1, PerMicrobatch) and sn.norm1.size == 2
    assert set(switchable_importance(sn)) == {"norm1", "norm2"}


def test_settings_refuse_a_normalization_batch_that_does_not_divide_the_gradient_batch():
    with pytest.raises(ConfigError, match="divide"):
        NormalizationBatchSettings(batch_sizes=(64, 3), gradient_batch=64)
    for preset in NORMALIZATION_BATCH_PRESETS.values():  # every preset is valid
        fields = {f.name for f in dataclasses.fields(NormalizationBatchSettings)}
        NormalizationBatchSettings(**{k: v for k, v in preset.items() if k in fields})


def test_batch_size_puts_bn_on_the_hidden_layer_only_in_its_bn_fc_arm():
    experiment = get_experiment("batch-size")
    settings = experiment.settings("tiny", {"dataset": "digits"})
    data = experiment.prepare_data(settings, load_dataset("digits"))
    hidden = {}
    for normalizer in ("bn", "bn-fc"):
        params = {"arm": normalizer, "normalizer": normalizer, "processes": 1,
                  "batch_per_device": 2, "replicate": 0}  # fmt: skip
        trial = Trial(f"{normalizer}/batch_per_device=2/seed=0", params, 4, 2, 0)
        hidden[normalizer] = experiment.setup(trial, settings, data, torch.Generator()).model.norm3
    assert isinstance(hidden["bn"], nn.Identity)
    assert isinstance(hidden["bn-fc"], nk.GhostBatchNorm) and hidden["bn-fc"].virtual_batch_size == 2


@pytest.mark.parametrize("normalizer", ["frn", "evo_b0", "evo_s0"])
def test_frn_and_evonorm_leave_the_hidden_layer_to_layer_norm(normalizer):
    """EvoNorm needs spatial dims and FRN on one value per feature is about sign(x): with
    ``hidden_norm`` their networks use LN on the fully connected layer, as IN's and SN's do."""
    g = torch.Generator().manual_seed(0)
    net = small_cnn(SHAPE, CLASSES, normalizer, g, channels=(4, 8), hidden=8, groups=2,
                    hidden_norm=True, norm_batch=2)  # fmt: skip
    hidden = net.norm3.layer if isinstance(net.norm3, PerMicrobatch) else net.norm3
    assert isinstance(hidden, nk.LayerNorm) and isinstance(net.act3, nn.ReLU)
    net(torch.randn(4, *SHAPE)).sum().backward()


def test_batch_size_warms_up_the_learning_rate_of_frn_and_evonorm_only():
    """FRN and EvoNorm collapsed to chance in 3 of 12 quick trials without a warm-up: their rate
    grows linearly over ``warmup_steps``; every other arm keeps the protocol's constant rate."""
    experiment = get_experiment("batch-size")
    settings = experiment.settings("tiny", {"dataset": "digits", "warmup_steps": 4})
    data = experiment.prepare_data(settings, load_dataset("digits"))
    for normalizer in ("frn", "evo_s0", "evo_b0", "bn", "mabn", "cbn", "ws_gn"):
        params = {"arm": normalizer, "normalizer": normalizer, "processes": 1,
                  "batch_per_device": 2, "replicate": 0}  # fmt: skip
        trial = Trial(f"{normalizer}/batch_per_device=2/seed=0", params, 4, 2, 0)
        factor = experiment.setup(trial, settings, data, torch.Generator()).lr_factor
        if normalizer in ("frn", "evo_s0", "evo_b0"):
            assert [factor(t) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0], normalizer
        else:
            assert factor is None, normalizer


def test_cbn_is_plain_batch_norm_during_its_burn_in():
    """CBN's first ``burn_in`` forwards use the batch alone (BN); the experiment sets it to
    ``warmup_steps`` updates' worth of forwards of B."""
    cbn = model("cbn", 2, burn_in=12)
    assert all(m.layer.burn_in == 12 for m in (cbn.norm1, cbn.norm2))
    experiment = get_experiment("batch-size")
    settings = experiment.settings("tiny", {"dataset": "digits", "warmup_steps": 3})
    data = experiment.prepare_data(settings, load_dataset("digits"))
    params = {"arm": "cbn", "normalizer": "cbn", "processes": 1, "batch_per_device": 2, "replicate": 0}
    trial = Trial("cbn/batch_per_device=2/seed=0", params, 4, 2, 0)
    built = experiment.setup(trial, settings, data, torch.Generator()).model
    assert built.norm1.layer.burn_in == 3 * settings.gradient_batch // 2

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
    small_cnn,
    switchable_importance,
)

SHAPE, CLASSES = (1, 12, 12), 4


def model(normalizer, norm_batch, **options):
    g = torch.Generator().manual_seed(0)
    return small_cnn(SHAPE, CLASSES, normalizer, g, channels=(4, 8), hidden=8, groups=2,
                     hidden_norm=False, norm_batch=norm_batch, **options)  # fmt: skip


@pytest.mark.parametrize("normalizer", ["bn", "brn", "sn"])
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
    for normalizer in ("gn", "ln", "in"):
        assert not any(isinstance(m, (PerMicrobatch, nk.GhostBatchNorm))
                       for m in model(normalizer, 2).modules())  # fmt: skip


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

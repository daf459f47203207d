"""nk.tools.remove_redundant_bias: the bias before a BatchNorm goes, the outputs stay (train and eval).

Outputs are compared in float32 with the float32 tolerance of tests/helpers.py against the original
model computed in float64: removing b and subtracting it from the running mean changes rounding only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_architectures import SharedNorm, exact, trained
from torch import nn

import normkit as nk
from helpers import assert_close
from normkit.errors import ConfigError
from normkit.tools import absorb_bias, remove_redundant_bias


def _with_biases():
    """Every producer has a bias: a Conv before nk BN, a grouped Conv before torch BN, a Linear
    before BN1d, and a Conv before GroupNorm (whose bias is not redundant)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nk.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.GroupNorm(2, 8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.BatchNorm1d(10),
    )


def _randomize_biases(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 2)


def test_absorb_bias_is_the_shifted_mean():
    running_mean = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    out = absorb_bias(torch.tensor([0.5, -1.0, 3.0]), running_mean)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([0.5, 3.0, 0.0], dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match="one per channel"):
        absorb_bias(torch.zeros(2), running_mean)


def test_removing_biases_keeps_eval_and_training_outputs():
    model = _with_biases()
    _randomize_biases(model)
    model = trained(model, (4, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6) * 2 + 0.5
    cleaned, report = remove_redundant_bias(model, x)
    assert [(r.layer, r.norm) for r in report.removed] == [("0", "1"), ("3", "4"), ("9", "10")]
    assert cleaned[0].bias is None and cleaned[3].bias is None and cleaned[9].bias is None
    assert cleaned[6].bias is not None  # before GroupNorm: not redundant, not touched
    assert "0.bias" not in cleaned.state_dict() and "0.bias" in model.state_dict()
    with torch.no_grad():
        assert_close(cleaned(x), exact(model, x), torch.float32, what="eval")
    # training mode: the batch mean cancels the bias; running statistics move the same way
    train_model, train_cleaned = copy.deepcopy(model).double().train(), cleaned.train()
    with torch.no_grad():
        assert_close(train_cleaned(x), train_model(x.double()), torch.float32, what="train")
    for name in ("1", "4", "10"):
        bias = model.get_submodule(str(int(name) - 1)).bias.double()
        assert_close(
            train_cleaned.get_submodule(name).running_mean,
            train_model.get_submodule(name).running_mean - bias,
            torch.float32,
            what=f"running mean {name}",
        )


def test_linear_bias_needs_example_inputs():
    model = trained(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (8, 5))
    cleaned, report = remove_redundant_bias(model)
    assert not report.removed and cleaned[0].bias is not None
    assert "example_inputs" in report.kept[0].reason


def test_shared_norm_keeps_both_biases():
    """One BN after two convs cannot absorb two different biases into one running mean."""
    model = trained(SharedNorm(), (4, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    cleaned, report = remove_redundant_bias(model, x)
    assert not report.removed
    assert {k.layer for k in report.kept} == {"conv1", "conv2"}
    assert all("called 2 times" in k.reason for k in report.kept)
    with torch.no_grad():
        assert_close(cleaned(x), exact(model, x), torch.float32)


def test_inplace_and_copy():
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (4, 3, 6, 6))
    copy_, _ = remove_redundant_bias(model)
    assert copy_ is not model and model[0].bias is not None
    same, report = remove_redundant_bias(model, inplace=True)
    assert same is model and model[0].bias is None and len(report.removed) == 1


def test_untraceable_model_uses_sequential_neighbours():
    from test_fold import Untraceable

    model = trained(Untraceable(), (4, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    cleaned, report = remove_redundant_bias(model, x)
    assert not report.traced and [r.layer for r in report.removed] == ["features.0"]
    assert cleaned.conv.bias is not None  # outside a Sequential: its producer is not known
    with torch.no_grad():
        assert_close(cleaned(x), exact(model, x), torch.float32)

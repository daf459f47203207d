"""The tools and the small-batch layers: convert's 'ws_gn', 'mabn' and 'cbn' (convolutions and
BatchNorms in one call), fold through weight-standardized convolutions and MABN, recalibrate's
refusal for MABN, and the doctor's small-batch advice."""

from __future__ import annotations

import pytest
import torch

import normkit as nk
from helpers import make_input


def _net(bias=False):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=bias), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, groups=2, bias=bias), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
    )  # fmt: skip


def test_ws_gn_standardizes_every_convolution_and_swaps_batch_norm_for_group_norm():
    model = _net(bias=True)
    new, replaced = nk.tools.convert(model, "ws_gn")
    assert [type(m).__name__ for m in new] == ["StdConv2d", "GroupNorm", "ReLU"] * 2
    assert new[1].num_groups == 8 and new[4].num_groups == 8  # 32 fitted to 8 and 16 channels
    assert nk.tools.convert(model, "ws_gn:4")[0][4].num_groups == 4
    for index in (0, 3):  # the convolutions keep their configuration and weights
        torch.testing.assert_close(new[index].weight, model[index].weight)
        torch.testing.assert_close(new[index].bias, model[index].bias)
        assert new[index].groups == model[index].groups
    sources = sorted((r.source, r.target) for r in replaced)
    assert sources.count(("nn.Conv2d", "nk.StdConv2d")) == 2
    assert isinstance(model[0], torch.nn.Conv2d) and type(model[0]) is torch.nn.Conv2d  # a copy
    x = make_input((2, 3, 9, 9))
    expected = model[2](torch.nn.functional.group_norm(
        torch.nn.functional.conv2d(x, new[0].transformed_weight(), model[0].bias), 8,
        new[1].weight, new[1].bias,
    ))  # fmt: skip
    torch.testing.assert_close(new[:3](x), expected)


def test_mabn_centres_the_convolutions():
    new, _ = nk.tools.convert(_net(), "mabn")
    assert [type(m).__name__ for m in new] == ["CenteredConv2d", "MovingAverageBatchNorm",
                                               "ReLU"] * 2  # fmt: skip
    new.train()
    new(make_input((2, 3, 9, 9))).sum().backward()


def test_fold_through_weight_standardized_convolutions_and_mabn():
    model = torch.nn.Sequential(
        nk.StdConv2d(3, 8, 3), nk.BatchNorm2d(8), torch.nn.ReLU(),
        nk.ScaledStdConv2d(8, 8, 3, gamma=1.7), torch.nn.BatchNorm2d(8),
        nk.CenteredConv2d(8, 4, 3), nk.MovingAverageBatchNorm(4, window=2, warmup_iters=1),
    )  # fmt: skip
    for seed in range(3):
        model(make_input((4, 3, 11, 11), seed=seed)).sum().backward()
    model.eval()
    x = make_input((2, 3, 11, 11), seed=9)
    folded, report = nk.tools.fold_batchnorm(model, x)
    assert [f.norm for f in report.folded] == ["1", "4", "6"] and not report.left
    assert all("plain Conv2d" in f.note for f in report.folded)
    assert [type(m).__name__ for m in folded] == [
        "Conv2d", "Identity", "ReLU", "Conv2d", "Identity", "Conv2d", "Identity"
    ]  # fmt: skip
    assert "gain" not in folded.state_dict().keys().__repr__()
    assert report.max_relative_error < 1e-5


def test_recalibrate_refuses_mabn_and_accepts_cbn():
    from normkit.tools._norms import batch_statistics_obstacle

    assert "second moment" in batch_statistics_obstacle(nk.MovingAverageBatchNorm(4))
    assert batch_statistics_obstacle(nk.CrossIterationBatchNorm(4)) is None


def test_doctor_knows_the_small_batch_layers():
    small = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False), nk.MovingAverageBatchNorm(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, bias=False), nk.FilterResponseNorm(8),
        torch.nn.Conv2d(8, 8, 3, bias=False), nk.CrossIterationBatchNorm(8), torch.nn.ReLU(),
    )  # fmt: skip
    report = nk.tools.doctor(small, make_input((2, 3, 12, 12)), batch_size=2)
    assert "small-batch" not in report.codes()  # the remedies are not what it warns about
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8))
    finding = next(
        f for f in nk.tools.doctor(plain, batch_size=2).findings if f.code == "small-batch"
    )
    assert "'ws_gn'" in finding.fix and "nk.accumulate" in finding.fix


def test_convert_all_skips_layers_with_a_built_in_activation():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nk.FilterResponseNorm(8), nk.RMSNorm2d(8))
    new, replaced = nk.tools.convert(model, "group:4", which="all")
    assert type(new[1]) is nk.FilterResponseNorm  # its TLU would be lost
    assert [s.paths for s in replaced.skipped] == [["1"]]
    assert isinstance(new[2], torch.nn.GroupNorm)


@pytest.mark.parametrize("spec", ["ws_gn:0", "cbn:x"])
def test_bad_numbers(spec):
    with pytest.raises(nk.errors.ConfigError):
        nk.tools.convert(_net(), spec)

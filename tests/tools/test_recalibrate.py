"""nk.tools.recalibrate (PreciseBN) and nk.tools.adapt (AdaBN) against the float64 reference
(normkit.reference.precise_statistics / domain_statistics), plus what they must leave alone.

A one-layer model is used for the exact checks: its BatchNorm's input is the data itself, so the
reference statistics can be computed from the batches directly. Statistics are accumulated in float64
from float32 per-batch moments (ATen accumulates float32 reductions in double on the CPU), so the
float32 running buffers are held to the float32 tolerance of tests/helpers.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_architectures import build
from torch import nn

import normkit as nk
from helpers import assert_close
from normkit import reference
from normkit.errors import ConfigError
from normkit.tools import adapt, recalibrate


def _batches(shapes, seed=0, scale=3.0, shift=1.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale + shift for shape in shapes]


def _single_bn(layer):
    """A model whose BatchNorm reads the data itself, and a dropout that must stay off."""
    return nn.Sequential(layer, nn.Dropout(0.5))


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(3), nk.BatchNorm2d(3)], ids=["torch", "normkit"])
def test_precise_bn_is_the_equal_weight_average_of_batch_statistics(layer):
    # unequal batch sizes: each batch still has weight 1/N (the last batch of a loader is smaller)
    batches = _batches([(8, 3, 4, 4)] * 5 + [(3, 3, 4, 4)])
    model = _single_bn(layer).eval()
    recalibrated, report = recalibrate(model, batches, progress=False)
    mean, var = reference.precise_statistics([b.numpy() for b in batches])
    bn = recalibrated[0]
    assert_close(bn.running_mean, torch.from_numpy(mean), torch.float32, what="mean")
    assert_close(bn.running_var, torch.from_numpy(var), torch.float32, what="var")
    assert int(bn.num_batches_tracked) == 6 and report.batches == 6
    assert not recalibrated.training and not bn.training and not recalibrated[1].training
    # the user's model is untouched
    assert torch.equal(model[0].running_mean, torch.zeros(3))


def test_precise_bn_equals_algorithm_2_for_equal_batches():
    batches = _batches([(16, 4)] * 4)
    recalibrated, _ = recalibrate(nn.Sequential(nn.BatchNorm1d(4)), batches, progress=False)
    mean, var = reference.population_statistics([b.numpy() for b in batches])
    assert_close(recalibrated[0].running_mean, torch.from_numpy(mean), torch.float32)
    assert_close(recalibrated[0].running_var, torch.from_numpy(var), torch.float32)


def test_adabn_is_the_pooled_statistics_of_the_target_domain():
    batches = _batches([(8, 3, 4, 4)] * 3 + [(2, 3, 4, 4)], scale=0.5, shift=-2.0)
    model = _single_bn(nk.BatchNorm2d(3))
    adapted, report = adapt(model, batches, progress=False)
    mean, var = reference.domain_statistics([b.numpy() for b in batches])
    assert_close(adapted[0].running_mean, torch.from_numpy(mean), torch.float32)
    assert_close(adapted[0].running_var, torch.from_numpy(var), torch.float32)
    assert report.method == "AdaBN" and report.layers[0].mean_shift > 1.0


def test_loader_style_batches_and_num_batches():
    data = [(x, torch.zeros(len(x))) for x in _batches([(8, 4)] * 10)]
    recalibrated, report = recalibrate(nn.Sequential(nn.BatchNorm1d(4)), data, 3, progress=False)
    mean, _ = reference.precise_statistics([x.numpy() for x, _ in data[:3]])
    assert report.batches == 3
    assert_close(recalibrated[0].running_mean, torch.from_numpy(mean), torch.float32)


def test_modes_parameters_and_other_buffers_are_restored():
    model, x = build("resnet")
    model.train()
    model[1].eval()  # a mixed state that must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    recalibrated, report = recalibrate(model, [x, x * 0.5], progress=False)
    assert {name: m.training for name, m in recalibrated.named_modules()} == modes
    for (name, p), q in zip(model.named_parameters(), recalibrated.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert len(report.layers) == 6 and report.batches == 2


def test_an_error_mid_way_leaves_the_model_as_it_was():
    model, x = build("mlp")
    before = copy.deepcopy(model.state_dict())

    def batches():
        yield x
        raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        recalibrate(model, batches(), inplace=True, progress=False)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_nonfinite_batches_are_skipped_and_counted():
    batches = _batches([(8, 4)] * 3)
    bad = batches[1].clone()
    bad[0, 0] = float("nan")
    recalibrated, report = recalibrate(
        nn.Sequential(nk.BatchNorm1d(4)), [batches[0], bad, batches[2]], progress=False
    )
    assert report.skipped_batches == 1
    mean, var = reference.precise_statistics([batches[0].numpy(), batches[2].numpy()])
    assert_close(recalibrated[0].running_mean, torch.from_numpy(mean), torch.float32)
    assert_close(recalibrated[0].running_var, torch.from_numpy(var), torch.float32)


def test_precise_bn_is_closer_to_the_population_than_the_ema():
    """The point of PreciseBN (Wu & Johnson 2021, §3): after training-mode passes with momentum 0.1
    the EMA is dominated by the last batches; the equal-weight average of 64 batches is closer to
    the population variance of the data."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 8, generator=g) * 2 + 1 for _ in range(64)]
    model = nn.Sequential(nn.BatchNorm1d(8))
    for b in batches[:8]:  # a short EMA history
        model(b)
    ema_error = (model[0].running_var - 4).abs().mean()
    recalibrated, _ = recalibrate(model.eval(), batches, num_batches=None, progress=False)
    precise_error = (recalibrated[0].running_var - 4).abs().mean()
    assert precise_error < ema_error / 2


def test_adapt_recovers_the_normalization_on_a_shifted_domain():
    """AdaBN: after adapting to a shifted, rescaled domain, eval-mode outputs on it are normalized."""
    model, _ = build("mlp")
    g = torch.Generator().manual_seed(5)
    target = [torch.randn(32, 20, generator=g) * 5 - 3 for _ in range(8)]
    adapted, report = adapt(model, target, progress=False)
    hidden = nn.Sequential(*adapted[:2]).eval()
    with torch.no_grad():
        h = torch.cat([hidden(b) for b in target])
    bn = adapted[1]
    normalized = (h - bn.bias) / bn.weight
    assert normalized.mean(0).abs().max() < 0.05
    assert (normalized.var(0) - 1).abs().max() < 0.05
    assert max(s.std_ratio_max for s in report.layers) > 2


def test_layers_that_cannot_be_reestimated_are_reported():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False))
    _, report = recalibrate(model, _batches([(8, 4)] * 2), progress=False)
    assert [s.path for s in report.layers] == ["0"]
    assert "track_running_stats=False" in report.untouched["1"]
    with pytest.raises(ConfigError, match="no BatchNorm"):
        recalibrate(nn.Sequential(nn.LayerNorm(4)), _batches([(8, 4)]), progress=False)
    with pytest.raises(ConfigError, match="num_batches"):
        recalibrate(model, [], 0, progress=False)
    with pytest.raises(ConfigError, match="no batch"):
        recalibrate(model, [], progress=False)
    with pytest.raises(ConfigError, match="a batch must be"):
        recalibrate(model, [3.0], progress=False)


def test_progress_bar_runs():
    _, report = recalibrate(nn.Sequential(nn.BatchNorm1d(4)), _batches([(8, 4)] * 2), progress=True)
    assert report.batches == 2
    assert "PreciseBN" in str(report)


# --- torch.distributed: two processes on gloo ------------------------------------------------------


def _worker(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # rank r gets 2 + r batches of its own, with a rank-dependent shift
        batches = _batches([(6, 3)] * (2 + rank), seed=10 + rank, shift=rank * 2.0)
        results = {}
        for name, tool in (("precise", recalibrate), ("population", adapt)):
            new, report = tool(nn.Sequential(nk.BatchNorm1d(3)), batches, progress=False)
            results[name] = {
                "mean": new[0].running_mean,
                "var": new[0].running_var,
                "n": report.layers[0].batches,
            }
        torch.save(results, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_are_combined_under_torch_distributed(tmp_path):
    """Each rank re-estimates on its own batches; every rank ends with the statistics of all of
    them (PreciseBN: equal weight per batch over both ranks; AdaBN: pooled over both ranks)."""
    init_file, result_file = tmp_path / "init", tmp_path / "result"
    mp.spawn(_worker, args=(2, str(init_file), str(result_file)), nprocs=2, join=True)
    everything = [
        b.numpy() for r in range(2) for b in _batches([(6, 3)] * (2 + r), 10 + r, shift=r * 2.0)
    ]
    references = {
        "precise": reference.precise_statistics(everything),
        "population": reference.domain_statistics(everything),
    }
    for rank in range(2):
        got = torch.load(f"{result_file}.{rank}", weights_only=True)
        for method, (mean, var) in references.items():
            what = f"rank {rank} {method}"
            assert got[method]["n"] == 5, what
            assert_close(got[method]["mean"], torch.from_numpy(mean), torch.float32, what=what)
            assert_close(got[method]["var"], torch.from_numpy(var), torch.float32, what=what)


class BatchNormDrop(nn.BatchNorm2d):
    """A BatchNorm with a dropout child after it, as timm's BatchNormAct2d(drop_layer=...) has."""

    def __init__(self, channels):
        super().__init__(channels)
        self.drop = nn.Dropout(0.5)
        self.drop.modes = []  # the dropout's mode at each call (copied with the model)
        self.drop.register_forward_pre_hook(lambda m, args: m.modes.append(m.training))

    def forward(self, x):
        return self.drop(super().forward(x))


@pytest.mark.parametrize("tool", [nk.tools.recalibrate, nk.tools.adapt])
def test_only_the_batch_norm_itself_runs_in_training_mode(tool):
    """Dropout stays off while statistics are gathered, also inside a BatchNorm's children:
    otherwise every layer after it would see dropped activations."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormDrop(4), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).eval()  # fmt: skip
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    new, _ = tool(model, batches, progress=False)
    assert new[1].drop.modes == [False, False, False]

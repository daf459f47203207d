"""nk.tools.doctor: each mistake, built into a model on purpose, is found (with its module, severity,
why and fix); a clean model produces no finding; the report renders as a table and as JSON; the
advice table answers as the guideline says."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from rich.console import Console
from test_architectures import mlp, resnet, trained
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.tools import ADVICE_TABLE, advise, doctor, guess_task

SHAPE = (8, 3, 16, 16)


def _data(n=6, shift=0.5, scale=2.0, seed=11, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale + shift for _ in range(n)]


def clean_model() -> nn.Module:
    """A ResNet-style model as it should be: no bias before BN, trained statistics, eval mode."""
    torch.manual_seed(0)
    return trained(resnet(), SHAPE, steps=12)


def _finding(report, code):
    found = [f for f in report.findings if f.code == code]
    assert found, f"{code} not in {report.codes()}"
    return found[0]


def test_a_clean_model_has_no_findings():
    model = clean_model()
    before = copy.deepcopy(model.state_dict())
    report = doctor(model, torch.randn(SHAPE), batch_size=64, data=_data())
    assert report.findings == [], str(report)
    assert report.task == "vision" and report.advice.spec == "batch"
    after = model.state_dict()  # the doctor changes nothing
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_bias_before_batch_norm():
    model = trained(nn.Sequential(nn.Conv2d(3, 8, 3), nk.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)), SHAPE)  # fmt: skip
    report = doctor(model, torch.randn(SHAPE))
    finding = _finding(report, "bias-before-norm")
    assert finding.path == "0" and finding.severity == "warning"
    assert "Ioffe & Szegedy 2015" in finding.why and "remove_redundant_bias" in finding.fix
    assert report.codes().count("bias-before-norm") == 1


@pytest.mark.parametrize("batch_size, severity", [(2, "error"), (4, "error"), (8, "warning")])
def test_small_per_device_batch(batch_size, severity):
    report = doctor(clean_model(), batch_size=batch_size)
    finding = _finding(report, "small-batch")
    # Channels 8 and 16: Wu & He's 32 groups divide neither; 8 is the largest count that fits both.
    assert finding.severity == severity and "'group:8'" in finding.fix
    assert "Wu & He 2018" in finding.why and "5 other" in finding.message
    assert report.advice.spec == "group:8" and report.advice.layer == "GroupNorm(8)"
    converted, _ = nk.tools.convert(clean_model(), report.advice.spec)  # the advice applies
    assert all(m.num_channels % m.num_groups == 0 for m in converted.modules()
               if isinstance(m, nn.GroupNorm))  # fmt: skip


@pytest.mark.parametrize(
    "channels, spec", [((64, 128), "group:32"), ((16, 16), "group:16"), ((24, 48), "group:24"),
                       ((3, 5), "group:1")],
)  # fmt: skip
def test_every_proposed_group_count_divides_the_channels(channels, spec):
    model = nn.Sequential(*(nk.BatchNorm2d(c) for c in channels))
    report = doctor(model, batch_size=2, task="vision")
    assert report.advice.spec == spec and f"'{spec}'" in _finding(report, "small-batch").fix


def test_small_batch_does_not_apply_to_sync_or_group_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nk.SyncBatchNorm(4), nn.GroupNorm(2, 4))
    assert "small-batch" not in doctor(model, batch_size=2).codes()


def test_batch_norm_after_the_final_layer():
    model = trained(nn.Sequential(*mlp(), nn.BatchNorm1d(4)), (8, 20))
    finding = _finding(doctor(model, torch.randn(8, 20)), "norm-after-final-layer")
    assert finding.path == "7"


class RecurrentWithBatchNorm(nn.Module):
    """An RNN cell unrolled in forward, one BatchNorm used at every time step."""

    def __init__(self):
        super().__init__()
        self.input = nn.Linear(5, 8, bias=False)
        self.hidden = nn.Linear(8, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x: (N, T=4, 5)
        h = x.new_zeros((x.shape[0], 8))
        for t in range(4):
            h = torch.tanh(self.bn(self.input(x[:, t]) + self.hidden(h)))
        return self.head(h)


def test_batch_norm_inside_a_recurrent_loop():
    model = trained(RecurrentWithBatchNorm(), (8, 4, 5))
    report = doctor(model, torch.randn(8, 4, 5))
    finding = _finding(report, "norm-reused")
    assert finding.path == "bn" and "4 times" in finding.message
    # the same without an example input: counted from the traced graph
    assert "norm-reused" in doctor(model).codes()


def test_layers_in_the_wrong_mode():
    model = clean_model()
    model[1].train()
    model.get_submodule("3").relu = nn.Sequential(nn.ReLU(), nn.Dropout(0.2).train())
    report = doctor(model)
    wrong = [f for f in report.findings if f.code == "wrong-mode"]
    assert {(f.path, f.severity) for f in wrong} == {("1", "error"), ("3.relu.1", "error")}
    assert not model.training and model[1].training  # the doctor leaves every mode as it was
    training = clean_model().train()
    training[1].eval()
    (finding,) = [f for f in doctor(training).findings if f.code == "wrong-mode"]
    assert finding.severity == "warning" and "nk.tools.freeze" in finding.fix


def test_nonfinite_running_statistics():
    model = clean_model()
    with torch.no_grad():
        model[1].running_var[2] = float("nan")
        model.get_submodule("3.bn1").running_var[0] = -1.0
    report = doctor(model)
    paths = {f.path for f in report.findings if f.code == "nonfinite-running-stats"}
    assert paths == {"1", "3.bn1"} and report.findings[0].severity == "error"


def test_statistics_never_updated():
    model = resnet().eval()
    report = doctor(model)
    never = [f for f in report.findings if f.code == "never-updated"]
    assert len(never) == 6 and all(f.severity == "error" for f in never)
    assert "never-updated" not in doctor(resnet().train()).codes()  # training has not started


def test_running_statistics_far_from_the_data():
    model = clean_model()
    shifted = _data(shift=4.0, scale=0.5)
    report = doctor(model, data=shifted)
    finding = _finding(report, "train-test-discrepancy")
    assert "nk.tools.adapt" in finding.fix and "Wu & Johnson 2021" in finding.why
    # after AdaBN on that data, the discrepancy is gone
    adapted, _ = nk.tools.adapt(model, shifted, progress=False)
    assert "train-test-discrepancy" not in doctor(adapted, data=shifted).codes()


def test_dead_channels_and_zero_initialised_gamma():
    model = clean_model()
    with torch.no_grad():
        model[1].weight[:3] = 0.0
    finding = _finding(doctor(model), "dead-channels")
    assert finding.path == "1" and finding.severity == "warning" and "3 of 8" in finding.message
    fresh = resnet()
    nn.init.zeros_(fresh.get_submodule("3.bn2").weight)  # zero-init residual (Goyal et al.)
    finding = _finding(doctor(fresh), "dead-channels")
    assert finding.severity == "info" and "Goyal" in finding.why


def test_eps_zero_and_momentum_that_looks_like_a_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=0.0, momentum=0.99))
    report = doctor(model)
    assert _finding(report, "eps-not-positive").severity == "error"
    assert "momentum=0.01" in _finding(report, "momentum-looks-like-decay").fix


def test_a_forward_that_fails_is_a_finding_not_a_crash():
    report = doctor(clean_model(), torch.randn(2, 5))
    finding = _finding(report, "forward-failed")
    assert finding.severity == "error" and "input" in finding.fix


def test_normalizer_choice_for_a_sequence_model():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(8 * 3, 8), nn.BatchNorm1d(8))
    report = doctor(trained_sequence(model))
    assert report.task == "sequence" and report.advice.spec == "layer"
    finding = _finding(report, "normalizer-choice")
    assert finding.severity == "info" and "'layer'" in finding.fix


def trained_sequence(model):
    with torch.no_grad():
        model.train()(torch.randint(0, 10, (8, 3)))
    return model.eval()


def test_report_as_json_and_as_a_table():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nk.BatchNorm2d(8), nn.ReLU())
    report = doctor(model, torch.randn(2, 3, 8, 8), batch_size=4)
    data = json.loads(report.to_json())
    assert data["summary"] == {"error": 1, "warning": 1, "info": 0}
    assert {f["code"] for f in data["findings"]} == {"small-batch", "bias-before-norm"}
    assert set(data["findings"][0]) == {"code", "path", "severity", "message", "why", "fix"}
    assert data["advice"]["spec"] == "group:8"  # 8 channels: 32 groups would not divide them
    console = Console(file=io.StringIO(), width=120, record=True)
    report.print(console)
    text = console.export_text()
    for word in ("small-batch", "bias-before-norm", "why:", "fix:", "advice for vision"):
        assert word in text


def test_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        doctor(nn.BatchNorm1d(3), batch_size=0)
    with pytest.raises(ConfigError, match="unknown task"):
        doctor(nn.BatchNorm1d(3), task="poetry")
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        doctor(None)


# --- the advice table -------------------------------------------------------------------------------


def test_advice_follows_the_guideline():
    assert advise("vision", 64).spec == "batch"
    assert advise("vision", 16).spec == "batch"
    assert advise("vision", 15).spec == "group:32"
    assert advise("detection", 2).spec == "group:32"
    assert advise("sequence").spec == "layer" and advise("text", 1).spec == "layer"
    assert advise("style").spec == "instance"
    assert {row.task for row in ADVICE_TABLE} == {"vision", "sequence", "style"}
    assert all(row.reason and row.source for row in ADVICE_TABLE)
    for row in ADVICE_TABLE:  # every spec is one nk.create_norm builds
        nk.create_norm(row.spec, 64)
    with pytest.raises(ConfigError, match="batch size"):
        advise("vision")


def test_task_is_guessed_from_the_layers():
    assert guess_task(resnet()) == "vision"
    assert guess_task(nn.LSTM(4, 4)) == "sequence"
    assert guess_task(mlp()) is None

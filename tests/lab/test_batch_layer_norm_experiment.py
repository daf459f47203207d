"""batch-layer-norm (Ziaee & Çano 2022) end to end in its tiny preset on the digits: the grid of
normalizers × batch sizes, BLN's inference configurations, the claims computed from the rows, and
the report."""

import copy
import re

import pytest
import torch

import normkit as nk
from normkit.lab import RunRecord, get_experiment, load_dataset, run_experiment
from normkit.lab.small_batch import RefusalRecorder

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment("batch-layer-norm", "tiny", {"dataset": "digits"},
                          out=tmp_path_factory.mktemp("lab") / "batch-layer-norm")  # fmt: skip


def cells(run):
    return {(r["normalizer"], r["batch_size"]): r for r in run.finals().values()}


def test_every_planned_trial_ran_once_and_the_report_renders(run):
    directory = run.directory
    experiment = get_experiment("batch-layer-norm")
    settings = experiment.settings("tiny", {"dataset": "digits"})
    data = experiment.prepare_data(settings, load_dataset("digits"))
    assert list(run.finals()) == [t.key for t in experiment.trials(settings, data, run.finals())]
    assert RunRecord.load(directory).rows == run.rows
    figures = sorted((directory / "figures").glob("*.png"))
    assert figures and all(f.read_bytes().startswith(PNG) for f in figures)
    markdown = (directory / "report.md").read_text()
    assert "## Claims" in markdown and "BLN's inference configurations" in markdown
    page = (directory / "report.html").read_text()
    assert len(re.findall("data:image/png;base64,", page)) == len(figures)


def test_every_inference_configuration_and_batch_statistics(run):
    found = cells(run)
    assert set(found) == {(n, b) for n in ("bn", "ln", "bln", "bln-nosqrt") for b in (8, 1)}
    for (normalizer, _), row in found.items():
        assert 0 <= row["test_error"] <= 100
        if normalizer.startswith("bln"):
            assert len(row["configurations"]) == 4
            assert all(0 <= v <= 100 for v in row["configurations"].values())
        else:
            assert "configurations" not in row
    assert 0 <= found["bn", 8]["batch_stat_error"] <= 100


def test_claims_are_computed_from_the_final_rows(run):
    error = {key: row["test_error"] for key, row in cells(run).items()}
    claims = {c["name"]: c for c in run.summary["claims"]}
    near_ln, near_bn = abs(error["bln", 1] - error["ln", 1]), abs(error["bln", 8] - error["bn", 8])
    assert claims["bln-near-ln-small"]["ours"]["mean"] == pytest.approx(near_ln)
    assert claims["bln-near-bn-large"]["ours"]["mean"] == pytest.approx(near_bn)
    assert claims["bn-fails-small"]["published"]["unverified"]
    for claim in claims.values():  # one seed in the tiny preset: never a confident verdict
        if claim["criterion"] is not None:
            assert claim["verdict"] == "inconclusive" and "too few seeds" in claim["reason"]


def test_the_hidden_layer_is_normalized_and_bn_refusing_batch_one_is_its_failure(run):
    """Issue 17: the fully connected layer is normalized too, so at batch 1 it sees one value per
    channel: BLN trains there (its BN part is 0), BN refuses, and the refusal is recorded."""
    found = cells(run)
    bn = found["bn", 1]
    assert bn["refusal"].startswith("BatchTooSmallError") and "BatchNorm1d" in bn["refusal"]
    assert bn["diverged"] and bn["step"] < bn["steps"] and bn["batch_stat_error"] is None
    assert found["bn", 8]["refusal"] is None and not found["bn", 8]["diverged"]
    for normalizer in ("ln", "bln", "bln-nosqrt"):
        row = found[normalizer, 1]
        assert not row["diverged"] and row["step"] == row["steps"], normalizer
    claims = {c["name"]: c for c in run.summary["claims"]}
    assert claims["bn-fails-small"]["ours"]["mean"] == pytest.approx(bn["test_error"])
    assert claims["bn-refuses-small"]["ours"]["mean"] == 1.0
    experiment = get_experiment("batch-layer-norm")
    data = load_dataset("digits")
    for hidden_norm, kind in ((True, nk.BatchLayerNorm), (False, torch.nn.Identity)):
        settings = experiment.settings("tiny", {"dataset": "digits", "hidden_norm": hidden_norm})
        trial = next(t for t in experiment.preview(settings, data) if t.params["normalizer"] == "bln")
        model = experiment.setup(trial, settings, data, torch.Generator().manual_seed(0)).model
        assert isinstance(model.norm3, kind) and (model.linear3.bias is None) == hidden_norm


def test_refusal_recorder_records_the_refusal_and_otherwise_steps_like_the_runner():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), nk.BatchNorm1d(4), torch.nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    step = RefusalRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    loss = step(x, y)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    expected = torch.nn.functional.cross_entropy(twin(x), y)
    optimizer.zero_grad()
    expected.backward()
    optimizer.step()
    assert torch.equal(loss, expected) and step.refusal is None
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    before = [p.clone() for p in model.parameters()]
    assert torch.isnan(step(x[:1], y[:1])) and step.refusal.startswith("BatchTooSmallError")
    assert torch.isnan(step(x, y))  # refused once: the trial is over, nothing more trains
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))

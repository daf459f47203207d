"""batch-layer-norm (Ziaee & Çano 2022) end to end in its tiny preset on the digits: the grid of
normalizers × batch sizes, BLN's inference configurations, the claims computed from the rows, and
the report."""

import re

import pytest

from normkit.lab import RunRecord, get_experiment, load_dataset, run_experiment

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
    assert claims["bln-near-ln-small"]["ours"]["mean"] == pytest.approx(abs(error["bln", 1] - error["ln", 1]))
    assert claims["bln-near-bn-large"]["ours"]["mean"] == pytest.approx(abs(error["bln", 8] - error["bn", 8]))
    assert claims["bn-fails-small"]["published"]["unverified"]
    for claim in claims.values():  # one seed in the tiny preset: never a confident verdict
        if claim["criterion"] is not None:
            assert claim["verdict"] == "inconclusive" and "too few seeds" in claim["reason"]

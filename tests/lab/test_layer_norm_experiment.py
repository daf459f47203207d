"""layer-norm (Ba et al. 2016, Fig. 6) end to end in its tiny preset on the digits: the grid of
normalizers × batch sizes, the curves against epochs, the claims computed from the rows, and the
report."""

import re

import pytest

from normkit.lab import RunRecord, get_experiment, load_dataset, run_experiment
from normkit.lab.experiments.layer_norm_batch import early_error
from normkit.lab.results import TrialResult

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment("layer-norm", "tiny", {"dataset": "digits"},
                          out=tmp_path_factory.mktemp("lab") / "layer-norm")  # fmt: skip


def test_every_planned_trial_ran_once_and_the_report_renders(run):
    directory = run.directory
    experiment = get_experiment("layer-norm")
    settings = experiment.settings("tiny", {"dataset": "digits"})
    data = experiment.prepare_data(settings, load_dataset("digits"))
    assert list(run.finals()) == [t.key for t in experiment.trials(settings, data, run.finals())]
    assert RunRecord.load(directory).rows == run.rows
    figures = sorted((directory / "figures").glob("*.png"))
    assert [f.name for f in figures] == ["curves-b16.png", "curves-b4.png", "error-vs-batch.png"]
    assert all(f.read_bytes().startswith(PNG) for f in figures)
    markdown = (directory / "report.md").read_text()
    assert "## Claims" in markdown and "Deviations" in markdown
    assert len(re.findall("data:image/png;base64,", (directory / "report.html").read_text())) == 3


def test_cells_curves_and_batch_statistics(run):
    finals = run.finals()
    cells = {(r["normalizer"], r["batch_size"]): r for r in finals.values()}
    assert set(cells) == {(n, b) for n in ("none", "bn", "ln") for b in (16, 4)}
    n = run.config["data"]["train"]
    for (normalizer, batch), row in cells.items():
        assert not row["diverged"] and 0 <= row["test_error"] <= 100
        assert row["steps"] == round(run.settings["epochs"] * n / batch)
        assert (row["batch_stat_error"] is not None) == (normalizer == "bn")
        epochs = [r["epoch"] for r in run.curve(row["trial"])]
        assert epochs[0] == 0 and epochs == sorted(epochs)
        assert epochs[-1] == pytest.approx(row["steps"] * batch / n)


def test_claims_are_computed_from_the_final_rows_and_the_curves(run):
    error = {(r["normalizer"], r["batch_size"]): r["test_error"] for r in run.finals().values()}
    claims = {c["name"]: c for c in run.summary["claims"]}
    ln_rise, bn_rise = error["ln", 4] - error["ln", 16], error["bn", 4] - error["bn", 16]
    assert claims["ln-robust"]["ours"]["mean"] == pytest.approx(ln_rise)
    assert claims["bn-degrades-more"]["ours"]["mean"] == pytest.approx(bn_rise - ln_rise)
    assert claims["ln-beats-bn-small"]["ours"]["mean"] == pytest.approx(error["ln", 4] - error["bn", 4])
    early = {(r["normalizer"], r["batch_size"]): early_error(
        TrialResult(r["trial"], r, r, run.curve(r["trial"])), run.settings["early_epoch"])
        for r in run.finals().values()}  # fmt: skip
    assert claims["ln-faster-b4"]["ours"]["mean"] == pytest.approx(early["ln", 4] - early["bn", 4])
    ahead = max(early[n, b] - early["none", b] for n in ("bn", "ln") for b in (16, 4))
    assert claims["normalized-ahead"]["ours"]["mean"] == pytest.approx(ahead)
    for claim in claims.values():  # one seed in the tiny preset: never a confident verdict
        if claim["criterion"] is not None:
            assert claim["verdict"] == "inconclusive" and "too few seeds" in claim["reason"]


def test_early_error_is_the_first_evaluation_at_or_after_the_epoch():
    curve = [{"epoch": e, "test_error": 90 - 10 * i} for i, e in enumerate((0.0, 0.2, 0.25, 0.5))]
    trial = TrialResult("k", {}, {"diverged": False}, curve)
    assert early_error(trial, 0.25) == 70 and early_error(trial, 0.21) == 70
    assert early_error(trial, 0.6) is None

"""The lab's part 4 end to end in tiny settings: population-stats, train-test-gap, variance-bias
(domain-shift, sequence-norms and the guideline have their own test files)."""


import pytest

from normkit.lab import RunRecord, experiment_names, get_experiment, run_experiment
from normkit.lab.records import CHECKPOINTS

EXPERIMENTS = [
    "population-stats",
    "train-test-gap",
    "variance-bias",
]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Each experiment's tiny preset on the digits."""
    root = tmp_path_factory.mktemp("part4")
    runs = {}
    for name in EXPERIMENTS:
        runs[name] = run_experiment(name, "tiny", {"dataset": "digits"}, out=root / name)
    return runs


def test_registered_with_presets_and_claims():
    assert set(EXPERIMENTS) <= set(experiment_names())
    for name in EXPERIMENTS:
        experiment = get_experiment(name)
        assert experiment.paper and experiment.claim
        assert {"quick", "tiny"} <= set(experiment.presets)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_run_directory_is_complete(tiny_runs, name):
    record = tiny_runs[name]
    directory = record.directory
    for file in ("config.json", "metrics.jsonl", "summary.json", "report.md", "report.html"):
        assert (directory / file).is_file(), file
    assert not (directory / CHECKPOINTS).exists()
    reread = RunRecord.load(directory)
    assert reread.complete and reread.rows == record.rows
    experiment = get_experiment(name)
    plan = experiment.trials(experiment.settings("tiny", record.settings), None, record.finals())
    assert list(record.finals()) == [t.key for t in plan]  # every planned trial ran, once
    markdown = (directory / "report.md").read_text()
    assert "Published beside ours" in markdown and record.config["command"] in markdown
    for figure in (directory / "figures").glob("*.png"):
        assert figure.read_bytes().startswith(PNG)
        assert f"figures/{figure.name}" in markdown


def _fraction(value):
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_population_stats_measures_every_method_at_every_checkpoint(tiny_runs):
    record = tiny_runs["population-stats"]
    settings = record.settings
    summary = record.summary
    methods = [f"error_ema_{m:g}" for m in settings["ema_momenta"]]
    methods += [f"error_precise_{n}" for n in settings["precise_samples"]]
    assert set(summary["curves"]) == set(methods)
    assert summary["steps"] == [3, 6]  # step 0 (untrained) is not measured
    for values in summary["curves"].values():
        assert len(values) == 2 and all(_fraction(v) for v in values)
    for momentum, versus in summary["precise_vs_ema"].items():
        assert versus["checkpoints"] == 2 and 0 <= versus["precise_not_worse"] <= 2
        ema = summary["curves"][f"error_ema_{momentum}"]
        best = summary["curves"][summary["reference_method"]]
        assert versus["mean_advantage"] == pytest.approx(sum(ema) / 2 - sum(best) / 2)
    assert summary["saturation"][str(max(settings["precise_samples"]))] == 0.0
    assert len(list((record.directory / "figures").glob("*.png"))) == 2


def test_train_test_gap_reports_the_three_errors_and_the_remedy(tiny_runs):
    summary = tiny_runs["train-test-gap"].summary
    assert set(summary["runs"]) == {"nbs=2", "nbs=2/frozen", "nbs=2/fc", "nbs=32"}
    for run in summary["runs"].values():
        for key in (
            "train_error_batch",
            "test_error_batch",
            "test_error_population",
            "test_error_ema",
        ):
            assert _fraction(run[key]), key
        assert run["inconsistency"] == pytest.approx(
            run["test_error_population"] - run["test_error_batch"]
        )
    assert summary["nbs"] == [2, 32]
    assert summary["runs"]["nbs=2/fc"]["fc_norm"] and set(summary["fc_norm"]) == {"2"}
    remedy = summary["freeze"]["2"]
    assert remedy["improvement"] == pytest.approx(
        remedy["without_freeze"] - remedy["test_error_population"]
    )


def test_variance_bias_variances_follow_the_definition(tiny_runs):
    cells = tiny_runs["variance-bias"].summary["cells"]
    assert set(cells) == {"2", "16"}
    for m, cell in cells.items():
        m = int(m)
        assert cell["predicted_ratio"] == pytest.approx(m / (m - 1))
        first = next(iter(cell["measured_ratio"]))
        # In the first BN layer the inputs do not depend on the choice, so the ratio is
        # (σ² + ε) / ((m−1)/m σ² + ε): m/(m−1) up to ε.
        assert cell["measured_ratio"][first] == pytest.approx(m / (m - 1), rel=1e-3)
        for choice in ("unbiased", "biased", "precise"):
            assert _fraction(cell[f"accuracy_{choice}"])
            assert all(v > 0 for v in cell[f"var_xhat_{choice}"].values())

"""The lab's part 4 end to end in tiny settings: population-stats, train-test-gap, variance-bias,
domain-shift, sequence-norms, and the guideline that reads their runs."""

import json
import math

import pytest
import torch

import normkit as nk
from normkit.lab import RunRecord, experiment_names, get_experiment, run_experiment
from normkit.lab.experiments.guideline import find_run, guideline_rows
from normkit.lab.records import CHECKPOINTS
from normkit.tools import ADVICE_TABLE, advise

EXPERIMENTS = [
    "population-stats",
    "train-test-gap",
    "variance-bias",
    "domain-shift",
    "sequence-norms",
]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Each experiment's tiny preset (images: the digits; text: the pydoc corpus), then the
    guideline over their directory."""
    root = tmp_path_factory.mktemp("part4")
    runs = {}
    for name in EXPERIMENTS:
        runs[name] = run_experiment(name, "tiny", {"dataset": "digits"}, out=root / name)
    runs["guideline"] = run_experiment(
        "guideline", "tiny", {"runs": str(root)}, out=root / "guideline"
    )
    return runs


def test_registered_with_presets_and_claims():
    assert set(EXPERIMENTS + ["guideline"]) <= set(experiment_names())
    for name in EXPERIMENTS + ["guideline"]:
        experiment = get_experiment(name)
        assert experiment.paper and experiment.claim
        assert {"quick", "tiny"} <= set(experiment.presets)


@pytest.mark.parametrize("name", EXPERIMENTS + ["guideline"])
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


def test_domain_shift_covers_every_arm_and_shift(tiny_runs):
    summary = tiny_runs["domain-shift"].summary
    assert summary["shifts"] == ["none", "invert", "noise", "scale", "mixed"]
    assert set(summary["arms"]) == {"bn", "in", "bin"}
    for arm in summary["arms"].values():
        assert set(arm["error"]) == set(summary["shifts"])
        assert all(_fraction(v) for v in arm["error"].values())
        assert set(arm["error_adapted"]) == set(summary["shifts"])  # every arm has the fc BN
        assert "norm_fc" in arm["adapted_layers"]
    assert summary["arms"]["bn"]["adapted_layers"] == ["norm1", "norm2", "norm_fc"]
    assert summary["arms"]["bin"]["adapted_layers"] == ["norm_fc"]  # BIN's own stats are not BN's
    gates = summary["arms"]["bin"]["rho"]
    assert set(gates) == {"norm1", "norm2"}
    assert all(0.0 <= g["min"] <= g["mean"] <= g["max"] <= 1.0 for g in gates.values())
    assert summary["arms"]["bn"]["rho"] == {}


def test_sequence_norms_trains_every_normalizer_and_probes_batch_one(tiny_runs):
    record = tiny_runs["sequence-norms"]
    summary = record.summary
    norms = record.settings["norms"]
    assert set(summary["runs"]) == {f"{n}/batch={b}" for n in norms for b in (4, 1)}
    probe = summary["runs"]["batch_time/batch=1"]
    assert probe["steps"] == 0 and probe["training_step_error"].startswith("BatchTooSmallError")
    for key, run in summary["runs"].items():
        assert math.isfinite(run["test_bpc"]) and run["test_bpc"] > 0, key
        assert run["batch1_inference_difference"] < 1e-4, key  # eval mode: per sample
        if key != "batch_time/batch=1":
            assert run["training_step_error"] is None
    assert set(summary["test_bpc"]["1"]) == set(norms) - {"batch_time"}
    assert summary["runs"]["batch_masked/batch=4"]["test_bpc_batch_stats"] is not None
    assert summary["runs"]["layer/batch=4"]["test_bpc_batch_stats"] is None
    assert 0 < summary["unigram_bpc"] < math.log2(96)
    assert record.config["data"]["name"] == "pydoc-topics"


def test_guideline_is_the_doctors_table_with_evidence(tiny_runs):
    summary = tiny_runs["guideline"].summary
    rows = guideline_rows()
    assert tuple(rows.values()) == ADVICE_TABLE  # every row of the tools' table, in order
    assert list(summary["rows"]) == list(rows)
    for key, advice in rows.items():
        assert summary["rows"][key]["spec"] == advice.spec
    # The doctor's advice is a row of the same table, its group count fitted to the model's channels.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), nk.BatchNorm2d(8))
    report = nk.tools.doctor(model, torch.randn(2, 3, 8, 8), batch_size=4, task="vision")
    row = rows["vision-small"]
    assert row is advise("vision", batch_size=4)
    assert (report.advice.task, report.advice.batches, report.advice.source) == (
        row.task, row.batches, row.source,
    )  # fmt: skip
    assert report.advice.spec == "group:8"  # 32 groups would not divide 8 channels
    found = {e["experiment"] for e in summary["evidence"]}
    assert found == set(EXPERIMENTS)
    assert set(summary["missing"]) == {"batch-size"}
    for piece in summary["evidence"]:
        assert piece["row"] in rows and piece["command"].startswith("normkit lab run")
        assert piece["supports"] in (True, False, None)
    assert summary["rows"]["sequence"]["tests"] >= 2
    # Choices within BN (its variance estimator, its population statistics) are notes, not tests
    # of a row that compares normalizers.
    for piece in summary["evidence"]:
        if piece["experiment"] in ("variance-bias", "population-stats"):
            assert piece["supports"] is None, piece
    # train-test-gap tests the small-batch row in its own terms: BN's error grows as NBS shrinks.
    gap_runs = tiny_runs["train-test-gap"].summary["runs"]
    tested = [
        e
        for e in summary["evidence"]
        if e["experiment"] == "train-test-gap" and e["supports"] is not None
    ]
    assert [e["row"] for e in tested] == ["vision-small"]
    errors = (
        gap_runs["nbs=2"]["test_error_population"],
        gap_runs["nbs=32"]["test_error_population"],
    )
    assert tested[0]["supports"] is (errors[0] > errors[1])
    markdown = (tiny_runs["guideline"].directory / "report.md").read_text()
    assert "normkit lab run batch-size" in markdown  # the missing run, with its command


def _fake_batch_size_run(root, errors, percent):
    """A finished ``batch-size`` run holding only final rows, in part 3's format (``normalizer``,
    ``batch_per_device``, ``processes``, ``test_error`` in percent) or a plainer one."""
    directory = root / "batch-size"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(
        json.dumps({"experiment": "batch-size", "command": "normkit lab run batch-size",
                    "settings": {}, "preset": "full", "data": {"name": "fashion-mnist"}})
    )  # fmt: skip
    rows = []
    for (norm, batch), error in errors.items():
        row = {"kind": "final", "trial": f"{norm}/{batch}", "diverged": False}
        if percent:
            row |= {"normalizer": norm, "batch_per_device": batch, "processes": 1,
                    "test_error": 100 * error}  # fmt: skip
        else:
            row |= {"norm": norm, "batch_size": batch, "test_accuracy": 1 - error}
        rows.append(row)
    if percent:  # SyncBN across processes is not a per-device row: it must be ignored
        rows.append({"kind": "final", "trial": "syncbn", "normalizer": "bn", "batch_per_device": 2,
                     "processes": 4, "test_error": 1.0, "diverged": False})  # fmt: skip
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "summary.json").write_text(json.dumps({"complete": True}))


@pytest.mark.parametrize("percent", [True, False])
@pytest.mark.parametrize(
    "errors, large, small",
    [
        # Wu & He's shape: BN degrades as the batch shrinks, GN stays flat.
        ({("bn", 32): 0.10, ("gn", 32): 0.11, ("bn", 2): 0.20, ("gn", 2): 0.11}, True, True),
        # The opposite: GN worse everywhere.
        ({("batch", 32): 0.10, ("group:4", 32): 0.15, ("batch", 2): 0.11, ("group:4", 2): 0.16},
         True, False),
    ],
)  # fmt: skip
def test_guideline_reads_the_batch_size_study(tmp_path, errors, large, small, percent):
    _fake_batch_size_run(tmp_path, errors, percent)
    record = run_experiment("guideline", "tiny", {"runs": str(tmp_path)}, out=tmp_path / "g")
    pieces = {e["row"]: e for e in record.summary["evidence"] if e["experiment"] == "batch-size"}
    assert pieces["vision-large"]["supports"] is large
    assert pieces["vision-small"]["supports"] is small
    assert record.summary["rows"]["vision-small"]["verdict"] == (
        "supported" if small else "contradicted"
    )
    assert "20.00%" in pieces["vision-small"]["value"] or not small
    assert find_run(tmp_path, "batch-size").directory == tmp_path / "batch-size"


def test_guideline_lists_an_unreadable_run_and_reports_the_rest(tmp_path):
    """A run whose summary predates the extractor (here: no keys at all) is named with the way to
    fix it; the guideline still reports every row."""
    directory = tmp_path / "train-test-gap"
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"experiment": "train-test-gap", "command": "normkit lab run train-test-gap",
                    "settings": {}, "preset": "full", "data": {"name": "fashion-mnist"}})
    )  # fmt: skip
    (directory / "metrics.jsonl").write_text("")
    (directory / "summary.json").write_text(json.dumps({"complete": True}))
    record = run_experiment("guideline", "tiny", {"runs": str(tmp_path)}, out=tmp_path / "g")
    summary = record.summary
    assert "KeyError" in summary["missing"]["train-test-gap"]
    assert "normkit lab report" in summary["missing"]["train-test-gap"]
    assert set(summary["missing"]) == {*EXPERIMENTS, "batch-size"}
    assert list(summary["rows"]) == list(guideline_rows())
    assert all(row["verdict"] == "no evidence" for row in summary["rows"].values())
    assert "Runs not found" in (record.directory / "report.md").read_text()

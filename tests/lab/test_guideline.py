"""The guideline: the doctor's table, beside the claims that the lab's runs judged."""

import json

import pytest
import torch

import normkit as nk
from normkit.lab import run_experiment
from normkit.lab.experiments.guideline import SOURCES, TESTS, guideline_rows, row_verdict
from normkit.lab.records import find_run
from normkit.lab.runner import dry_run
from normkit.tools import ADVICE_TABLE, advise


def _fake_run(root, experiment, claims):
    """A finished run of ``experiment`` whose summary.json holds ``claims`` as ``{name: verdict}``."""
    directory = root / experiment
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(
        {"experiment": experiment, "command": f"normkit lab run {experiment}", "settings": {},
         "preset": "full", "data": {"name": "fashion-mnist"}}))  # fmt: skip
    (directory / "metrics.jsonl").write_text("")
    entries = [{"name": name, "quantity": f"the {name}", "verdict": verdict, "reason": "",
                "criterion": "< 0", "published": {"text": "", "source": ""},
                "ours": {"mean": -1.0, "low": -2.0, "high": -0.5, "n": 3}}
               for name, verdict in claims.items()]
    (directory / "summary.json").write_text(json.dumps({"complete": True, "claims": entries}))  # fmt: skip


def test_rows_are_the_doctors_table():
    rows = guideline_rows()
    assert tuple(rows.values()) == ADVICE_TABLE  # every row of the tools' table, in order
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), nk.BatchNorm2d(8))
    report = nk.tools.doctor(model, torch.randn(2, 3, 8, 8), batch_size=4, task="vision")
    row = rows["vision-small"]
    assert row is advise("vision", batch_size=4)
    assert (report.advice.task, report.advice.batches, report.advice.source) == (
        row.task, row.batches, row.source)  # fmt: skip
    assert {row for row in TESTS.values()} | set(SOURCES.values()) <= set(rows)


@pytest.mark.parametrize("tests, verdict", [
    ([True, True], "reproduced"), ([False], "not reproduced"), ([True, False], "inconclusive"),
    ([None, None], "inconclusive"), ([], "inconclusive"), ([True, None], "reproduced"),
])  # fmt: skip
def test_a_row_is_decided_by_its_judged_tests(tests, verdict):
    assert row_verdict(tests)[0] == verdict


def test_claims_that_test_a_row_decide_it_and_the_others_are_notes(tmp_path):
    _fake_run(tmp_path, "batch-size", {"bn-vs-gn-large": "reproduced", "gn-beats-bn-small": "reproduced",
                                       "bn-degrades": "not reproduced", "ln-behind-gn": "reproduced"})
    _fake_run(tmp_path, "sequence-norms", {"ln-vs-bn": "reproduced", "ln-vs-bn-batch1": "inconclusive"})
    _fake_run(tmp_path, "variance-bias", {"biased-cost": "reproduced"})  # a choice within BN: a note
    record = run_experiment("guideline", "tiny", {"runs": str(tmp_path)}, out=tmp_path / "g")
    summary = record.summary
    rows = summary["rows"]
    assert rows["vision-large"]["verdict"] == "reproduced" and rows["vision-large"]["tests"] == 1
    assert rows["vision-small"]["verdict"] == "inconclusive" and "disagree" in rows["vision-small"]["reason"]
    assert rows["sequence"]["verdict"] == "reproduced" and rows["sequence"]["tests"] == 2
    assert rows["style"]["verdict"] == "inconclusive"  # no run of domain-shift
    notes = {e["claim"]: e for e in summary["evidence"] if not e["test"]}
    assert set(notes) == {"ln-behind-gn", "biased-cost"}
    assert all(e["supports"] is None and e["row"] == "vision-small" for e in notes.values())
    assert [c["name"] for c in summary["claims"]] == list(guideline_rows())
    assert summary["verdict"] == "partly"
    assert set(summary["missing"]) == set(SOURCES) - {"batch-size", "sequence-norms", "variance-bias"}
    markdown = (record.directory / "report.md").read_text()
    assert "## Claims" in markdown and "normkit lab run domain-shift" in markdown
    assert find_run(tmp_path, "batch-size").directory == tmp_path / "batch-size"


def test_a_run_without_claims_is_listed_and_the_rest_reported(tmp_path):
    directory = tmp_path / "train-test-gap"
    _fake_run(tmp_path, "train-test-gap", {})
    (directory / "summary.json").write_text(json.dumps({"complete": True}))  # an older summary
    record = run_experiment("guideline", "tiny", {"runs": str(tmp_path)}, out=tmp_path / "g")
    missing = record.summary["missing"]
    assert "KeyError" in missing["train-test-gap"] and "normkit lab report" in missing["train-test-gap"]
    assert set(missing) == set(SOURCES)
    assert all(row["verdict"] == "inconclusive" for row in record.summary["rows"].values())


def test_it_reads_real_runs_of_domain_shift_and_sequence_norms(tmp_path):
    for name in ("domain-shift", "sequence-norms"):
        run_experiment(name, "tiny", {"dataset": "digits"}, out=tmp_path / name)
    record = run_experiment("guideline", "tiny", {"runs": str(tmp_path)}, out=tmp_path / "g")
    evidence = record.summary["evidence"]
    assert {e["experiment"] for e in evidence} == {"domain-shift", "sequence-norms"}
    tested = {(e["experiment"], e["claim"]) for e in evidence if e["test"]}
    assert tested == {k for k in TESTS if k[0] in ("domain-shift", "sequence-norms")}
    for piece in evidence:  # one seed: every test is inconclusive, so it supports nothing yet
        assert piece["supports"] is None and piece["command"].startswith("normkit lab run")
    assert {e["row"] for e in evidence if e["claim"].startswith("adabn-")} == {"vision-large"}


def test_dry_run_of_an_experiment_that_trains_nothing_prices_nothing(tmp_path):
    plan = dry_run("guideline", "tiny", {"runs": str(tmp_path)})
    assert plan["trials"] == [] and plan["estimated_s"] == 0.0

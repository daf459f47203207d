"""``normkit lab list | show | run --dry-run | docs``, and the one-line message without the lab extra."""

import json
import sys

import pytest
from typer.testing import CliRunner

from normkit.cli.main import app
from normkit.lab import experiment_names

runner = CliRunner()


def test_list_is_one_line_per_experiment_within_80_columns():
    result = runner.invoke(app, ["lab", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(experiment_names())
    assert all(len(line) <= 80 for line in lines)
    assert [line.split()[0] for line in lines] == experiment_names()


def test_list_json():
    result = runner.invoke(app, ["lab", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) == set(experiment_names())
    placement = rows["placement"]
    assert placement["paper"].startswith("Ioffe & Szegedy 2015")
    assert placement["presets"] == ["full", "quick", "tiny"]
    assert [c["name"] for c in placement["claims"]] == ["after-minus-before", "before", "after"]
    assert all(r["claims"] for r in rows.values() if r["name"] != "guideline")  # every one declares


def test_show_gives_protocol_claims_and_settings():
    result = runner.invoke(app, ["lab", "show", "batch-size", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["protocol"].startswith("Wu & He (2018), Fig. 1")
    claim = next(c for c in info["claims"] if c["name"] == "gn-beats-bn-small")
    assert claim["published"]["value"] == -10.6 and "Wu & He 2018" in claim["published"]["source"]
    assert claim["criterion"] == "ours < 0"
    assert info["settings"]["seeds"] == {"default": 3, "quick": 2, "tiny": 1}
    assert info["settings"]["batch_sizes"]["default"] == [64, 32, 16, 8, 4, 2]
    text = runner.invoke(app, ["lab", "show", "ioffe2015-mnist"])
    assert text.exit_code == 0, text.output
    assert "[unverified]" in text.output and "Settings (full | quick | tiny):" in text.output
    assert "  seeds = 3 | · | 2" in text.output


def test_dry_run_prints_the_plan_and_its_cost_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["lab", "run", "ioffe2015-mnist", "--preset", "tiny",
                                 "--dataset", "digits", "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "ioffe2015-mnist (tiny) on digits: 8 trials" in result.output
    assert "sweep/plain/learning_rate=0.5" in result.output and "bn/seed=1" in result.output
    assert "estimated cost: ~" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("hidden", ["matplotlib", "scipy", "sklearn"])
def test_without_the_lab_extra_one_line_names_it_before_any_work(tmp_path, monkeypatch, hidden):
    monkeypatch.setitem(sys.modules, hidden, None)  # as if it were not installed
    out = tmp_path / "run"
    result = runner.invoke(app, ["lab", "run", "placement", "--preset", "tiny", "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: normkit lab needs the lab extra ({hidden} is missing): pip install 'normkit[lab]'"
    ]
    assert not out.exists()  # nothing started
    assert runner.invoke(app, ["lab", "list"]).exit_code == 1

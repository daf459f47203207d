"""A newcomer's first hour: threads chosen, printed and recorded; a missing lab extra named before
any work; progress lines when the output is not a terminal; one closing line that says how many
checks held; ``normkit --version``; ``make demo`` wired to all of it."""

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import normkit
from normkit.cli.main import app
from normkit.lab import executors

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_version_prints_the_installed_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"normkit {version('normkit')}" == f"normkit {normkit.__version__}"


def test_demo_defaults_to_the_free_cores_prints_and_reports_the_choice(monkeypatch, threads_restored):
    monkeypatch.delenv("NORMKIT_THREADS", raising=False)
    monkeypatch.setattr(executors, "free_cores", lambda: (1, 1.3))  # a busy 2-core machine
    seen = []
    from normkit.lab import digits_demo

    real = digits_demo.train_run
    monkeypatch.setattr(digits_demo, "train_run",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))  # fmt: skip
    result = runner.invoke(app, ["demo", "--steps", "4"])
    assert result.exit_code == 0, result.output
    assert "normkit demo: 1 torch thread(s) (free cores 1 (load 1.3)" in result.output
    assert seen == [1] * 8
    summary = json.loads(runner.invoke(app, ["demo", "--steps", "4", "--json", "--threads", "2"]).output)
    assert summary["threads"] == 2 and summary["threads_rule"] == "--threads 2"


def test_demo_refuses_zero_threads():
    result = runner.invoke(app, ["demo", "--threads", "0"])
    assert result.exit_code != 0 and "--threads 0: give 1 or more" in str(result.exception or result.output)


def test_demo_prints_a_plain_line_per_network_when_not_on_a_terminal(threads_restored):
    result = runner.invoke(app, ["demo", "--steps", "6", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("[normkit demo] finished")]
    assert len(lines) == 8
    assert lines[0].startswith("[normkit demo] finished plain lr=0.1; 1/8 trials, 6/48 steps, ETA ")
    assert lines[-1] == "[normkit demo] finished BatchNorm lr=8; 8/8 trials, 48/48 steps"


@pytest.mark.parametrize("hidden", ["matplotlib", "scipy", "sklearn"])
def test_demo_without_the_lab_extra_says_so_before_any_work(monkeypatch, hidden):
    from normkit.lab import digits_demo

    monkeypatch.setitem(sys.modules, hidden, None)  # as if it were not installed
    monkeypatch.setattr(digits_demo, "run_demo", lambda *a, **k: pytest.fail("trained anyway"))
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: normkit demo needs the lab extra ({hidden} is missing): pip install 'normkit[lab]'"
    ]


def test_lab_run_shows_progress_lines_and_ends_with_how_many_checks_held(tmp_path, monkeypatch,
                                                                         threads_restored):  # fmt: skip
    monkeypatch.setenv("NORMKIT_THREADS", "1")
    out = tmp_path / "run"
    result = runner.invoke(app, ["lab", "run", "ioffe2015-mnist", "--preset", "tiny", "--dataset",
                                 "digits", "--out", str(out), "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "ioffe2015-mnist: 1 worker(s), 1 torch thread(s) each (--threads 1), device cpu" in lines
    progress = [line for line in lines if line.startswith("[ioffe2015-mnist] finished")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trials = sum(row["kind"] == "final" for row in rows)  # the sweep's and the main trials
    assert trials > 1 and len(progress) == trials and f"{trials}/{trials} trials" in progress[-1]
    assert re.search(r"ETA \d+:\d\d$", progress[0])
    config = json.loads((out / "config.json").read_text())
    assert config["execution"]["threads"] == 1 and config["execution"]["threads_rule"] == "--threads 1"
    summary = json.loads((out / "summary.json").read_text())
    judged = [c for c in summary["claims"] if c["verdict"] is not None]
    held = sum(c["verdict"] == "reproduced" for c in judged)
    assert lines[-1].startswith(f"verdict: {summary['verdict']}: {held} of {len(judged)} checks held, ")
    assert "A failed check (not reproduced) means" in lines[-1]
    assert not any("[not reproduced]" in line for line in lines)  # tiny scale: a miss is inconclusive


def test_lab_run_refuses_zero_threads(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["lab", "run", "placement", "--preset", "tiny", "--out", str(out),
                                 "--threads", "0"])  # fmt: skip
    assert result.exit_code == 1 and "--threads 0: give 1 or more" in str(result.exception)
    assert not out.exists()


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


@needs_make
def test_make_demo_checks_the_lab_extra_first_and_passes_demo_args():
    plan = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", "DEMO_ARGS=--threads 1"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    check = plan.index("-m normkit.cli.extras")
    assert check < plan.index("Fashion-MNIST") < plan.index("normkit lab run ioffe2015-mnist --quick")
    assert "--overwrite --threads 1" in plan


@needs_make
def test_make_demo_stops_with_one_line_without_the_lab_extra(tmp_path):
    fake = tmp_path / "sklearn"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = subprocess.run(["make", "-s", "-C", str(ROOT), "lab-extra", f"PY={sys.executable}"],
                            capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (
        "error: make demo needs the lab extra (sklearn is missing): pip install 'normkit[lab]'"
    )

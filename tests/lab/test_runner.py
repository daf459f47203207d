"""The runner: determinism, metrics rows, atomic checkpoints, and resume after a real SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from normkit.errors import ConfigError
from normkit.lab import Arm, Experiment, Plan, RunRecord, Settings, Setup, register, run_experiment
from normkit.lab.models import mlp
from normkit.lab.records import CHECKPOINTS, METRICS, SCHEMA

# ioffe2015-mnist's tiny preset on the digits, long enough to be killed many times over
KILLABLE = {"dataset": "digits", "steps": "300", "eval_every": "5"}


@dataclass(frozen=True)
class _DivergeSettings(Settings):
    learning_rate: float = 1e6
    steps: int = 40


@register
class _Diverging(Experiment):
    """A network trained at an absurd learning rate, for the divergence bookkeeping."""

    name = "test-diverging"
    title = paper = claim = "test"
    settings_class = _DivergeSettings

    def plan(self, settings, data):
        return Plan([Arm("huge-lr", {"network": "plain"})], settings.steps, eval_every=5)

    def setup(self, trial, settings, data, generator):
        model = mlp(data.features, (32,), data.classes, activation="relu")
        return Setup(model, torch.optim.SGD(model.parameters(), lr=settings.learning_rate), 32)


def rows_and_results(directory):
    record = RunRecord.load(directory)
    summary = dict(record.summary)
    summary.pop("timing")
    return record.rows, summary


def test_runs_are_deterministic_and_rows_well_formed(tmp_path):
    first = run_experiment("ioffe2015-mnist", "tiny", {"dataset": "digits"}, out=tmp_path / "a")
    run_experiment(
        "ioffe2015-mnist", "tiny", {"dataset": "digits"}, out=tmp_path / "b", write_report=False
    )
    assert rows_and_results(tmp_path / "a") == rows_and_results(tmp_path / "b")
    assert (tmp_path / "a" / METRICS).read_bytes() == (tmp_path / "b" / METRICS).read_bytes()
    settings = first.settings
    finals = first.finals()
    sweep = [f"sweep/{arm}/learning_rate={lr:g}" for arm in ("plain", "bn") for lr in settings["lr_sweep"]]
    main = [f"{arm}/seed={k}" for k in range(settings["seeds"]) for arm in ("plain", "bn")]
    assert list(finals) == sweep + main
    for key in main:
        steps = [r["step"] for r in first.curve(key)]
        assert steps == list(range(0, settings["steps"] + 1, settings["eval_every"]))
        assert finals[key]["step"] == settings["steps"] and not finals[key]["diverged"]
    # every line is strict JSON (no NaN), and the checkpoints are gone once the run is complete
    for line in (tmp_path / "a" / METRICS).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert not (tmp_path / "a" / CHECKPOINTS).exists()
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["schema"] == SCHEMA and config["environment"]["torch"] == torch.__version__
    assert config["data"]["name"] == "digits" and config["preset"] == "tiny"
    assert config["execution"]["threads"] == 1 and config["execution"]["workers"] == 1
    assert config["execution"]["device"] == "cpu"


def test_a_different_seed_gives_different_rows(tmp_path):
    run_experiment("placement", "tiny", {"dataset": "digits"}, out=tmp_path / "a")
    run_experiment("placement", "tiny", {"dataset": "digits", "seed": "1"}, out=tmp_path / "b")
    assert rows_and_results(tmp_path / "a")[0] != rows_and_results(tmp_path / "b")[0]


def test_resume_after_an_exception_mid_trial_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    overrides = {"dataset": "digits", "steps": "40", "eval_every": "5"}
    run_experiment("ioffe2015-mnist", "tiny", overrides, out=tmp_path / "whole", write_report=False)
    from normkit.lab.experiments.ioffe2015_mnist import Ioffe2015Mnist

    original, calls = Ioffe2015Mnist.measure, {"n": 0}

    def failing_measure(self, *args):
        calls["n"] += 1
        if calls["n"] == 26:  # the first main trial (after 2 x 2 x 5 sweep evaluations), at step 25
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Ioffe2015Mnist, "measure", failing_measure)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(
            "ioffe2015-mnist", "tiny", overrides, out=tmp_path / "cut", checkpoint_every_s=0
        )
    assert list((tmp_path / "cut" / CHECKPOINTS).glob("*.pt"))
    assert "plain/seed=0" not in RunRecord.load(tmp_path / "cut").finals()
    monkeypatch.setattr(Ioffe2015Mnist, "measure", original)
    run_experiment("ioffe2015-mnist", out=tmp_path / "cut", resume=True, write_report=False)
    assert rows_and_results(tmp_path / "cut") == rows_and_results(tmp_path / "whole")


def start_run(out, resume=False, workers=1, preset="tiny", overrides=None, name="ioffe2015-mnist"):
    """``run_experiment`` in a subprocess (so that it can be killed with SIGKILL)."""
    preset, overrides = (None, None) if resume else (preset, overrides or KILLABLE)
    code = (
        "from normkit.lab import run_experiment; "
        f"run_experiment({name!r}, {preset!r}, {overrides!r}, out={str(out)!r}, "
        f"resume={resume}, checkpoint_every_s=0.0, write_report=False, workers={workers})"
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "NORMKIT_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, env=environment,
        start_new_session=True,
    )  # fmt: skip


def lines(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_and_resume(out, total, fractions, workers=1, **start):
    """Start the run, SIGKILL it when metrics.jsonl holds each fraction of ``total`` rows, resume;
    returns how many kills landed."""
    kills, resume = 0, False
    for fraction in fractions:
        process = start_run(out, resume, workers, **start)
        while lines(out / METRICS) < fraction * total and process.poll() is None:
            time.sleep(0.002)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait(timeout=240)
        resume = True
    final = start_run(out, resume=True, workers=workers, **start)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()
    return kills


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    """Kill the run with SIGKILL at several points (mid-trial, mid-write, between trials), resume
    each time, and compare every row and the results with a run that was never interrupted."""
    whole = start_run(tmp_path / "whole")
    assert whole.wait(timeout=240) == 0, whole.stderr.read().decode()
    expected = rows_and_results(tmp_path / "whole")
    kills = kill_and_resume(tmp_path / "killed", len(expected[0]), (0.02, 0.3, 0.55, 0.8))
    assert kills >= 3, "the run finished before it could be killed; make KILLABLE longer"
    assert rows_and_results(tmp_path / "killed") == expected


def test_existing_runs_are_protected_and_resume_checks_settings(tmp_path):
    out = tmp_path / "run"
    run_experiment("init-sensitivity", "tiny", {"dataset": "digits"}, out=out)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        run_experiment("init-sensitivity", "tiny", {"dataset": "digits"}, out=out)
    with pytest.raises(ConfigError, match="holds a run of 'init-sensitivity'"):
        run_experiment("placement", out=out, resume=True)
    with pytest.raises(ConfigError, match="other settings"):
        run_experiment(
            "init-sensitivity", "tiny", {"dataset": "digits", "steps": "17"}, out=out, resume=True
        )
    before = (out / METRICS).stat().st_mtime_ns
    record = run_experiment("init-sensitivity", out=out, resume=True)  # complete: nothing to redo
    assert record.complete and (out / METRICS).stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_experiment("init-sensitivity", out=tmp_path / "new", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a lab run"):
        run_experiment("init-sensitivity", "tiny", out=tmp_path / "other")
    run_experiment(
        "init-sensitivity", "tiny", {"dataset": "digits", "steps": "8"}, out=out, overwrite=True
    )
    assert RunRecord.load(out).settings["steps"] == 8


def test_bad_settings_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="has no setting 'stpes'"):
        run_experiment("placement", "tiny", {"stpes": "3"}, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="preset 'fast' is not known"):
        run_experiment("placement", "fast", out=tmp_path / "x")
    with pytest.raises(ConfigError, match="does not parse as int"):
        run_experiment("placement", "tiny", {"steps": "many"}, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="no experiment named 'ioffe'"):
        run_experiment("ioffe")
    assert not (tmp_path / "x").exists()  # nothing was created for a run that cannot start


def test_a_diverging_trial_is_stopped_and_marked(tmp_path):
    record = run_experiment(
        "test-diverging", None, {"dataset": "digits"}, out=tmp_path / "d", write_report=False
    )
    final = record.finals()["huge-lr/seed=0"]
    assert final["diverged"] and final["step"] == 5  # stopped at the first evaluation
    assert final["train_loss"] > _Diverging.divergence_loss
    assert record.curve("huge-lr/seed=0")[-1]["step"] == final["step"]


def test_rows_are_strict_json():
    from normkit.lab.files import json_ready

    row = {
        "a": float("nan"),
        "b": [float("inf"), 1.5],
        "c": torch.tensor(2.0),
        "d": torch.tensor([1, 2]),
    }
    assert (
        json.dumps(json_ready(row), allow_nan=False)
        == '{"a": null, "b": [null, 1.5], "c": 2.0, "d": [1, 2]}'
    )

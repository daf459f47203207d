"""The command line: wiring smoke tests with CliRunner, and the functions behind the commands."""

import json

from typer.testing import CliRunner

from normkit.cli.main import app
from normkit.lab.digits_demo import DemoConfig, run_demo, summarize
from normkit.lab.environment import collect

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "env" in result.output and "demo" in result.output


def test_env_json():
    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["torch"] and info["torch_threads"] >= 1
    assert info["backend_check"]["cpu/float32"]["native"] == "ok"
    assert "fashion_mnist" in info


def test_env_table():
    result = runner.invoke(app, ["env", "--no-check"])
    assert result.exit_code == 0, result.output
    assert "normkit environment" in result.output


def test_collect_finds_fashion_mnist_through_normkit_data(tmp_path, monkeypatch):
    from normkit.lab.datasets import FASHION_MNIST_FILES

    for name in FASHION_MNIST_FILES:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("NORMKIT_DATA", str(tmp_path))
    assert collect(check=False)["fashion_mnist"] == str(tmp_path)


def test_demo_tiny_run_shows_batch_norm_training_faster():
    """A tiny configuration of the demo: after 150 steps at lr 0.5, BN is far ahead of plain."""
    config = DemoConfig(learning_rates=(0.5,), steps=150, eval_every=50)
    results = run_demo(config)
    plain, normalized = results
    assert not plain.batch_norm and normalized.batch_norm
    assert normalized.final_accuracy > 0.85
    assert normalized.final_accuracy > plain.final_accuracy + 0.3
    summary = summarize(results, config)
    assert summary["best_batch_norm"]["accuracy"] == normalized.final_accuracy
    json.dumps(summary)


def test_demo_command_json():
    result = runner.invoke(app, ["demo", "--steps", "20", "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)["runs"]
    assert len(runs) == 8 and {r["batch_norm"] for r in runs} == {True, False}

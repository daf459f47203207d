"""Every experiment end to end in its tiny preset, the reports, and the `normkit lab` commands."""

import base64
import json
import re

import pytest
from test_datasets import write_fashion_mnist
from typer.testing import CliRunner

from normkit.cli.main import app
from normkit.lab import (
    RunRecord,
    experiment_names,
    get_experiment,
    run_experiment,
    write_combined_report,
)
from normkit.lab.records import CHECKPOINTS

EXPERIMENTS = ["ioffe2015-mnist", "lr-tolerance", "init-sensitivity", "regularization", "placement"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Each experiment's tiny preset; ioffe2015-mnist on tiny Fashion-MNIST IDX files, the rest on
    the digits."""
    root = tmp_path_factory.mktemp("lab")
    write_fashion_mnist(root / "fashion-mnist", train=240, test=100)
    runs = {}
    for name in EXPERIMENTS:
        overrides = {"dataset": "fashion-mnist" if name == "ioffe2015-mnist" else "digits"}
        runs[name] = run_experiment(
            name, "tiny", overrides, out=root / name, data_dir=root / "fashion-mnist"
        )
    return runs


def test_the_five_experiments_are_registered():
    assert set(EXPERIMENTS) <= set(experiment_names())
    for name in EXPERIMENTS:
        experiment = get_experiment(name)
        assert experiment.paper.startswith("Ioffe & Szegedy 2015") and experiment.claim
        assert {"quick", "tiny"} <= set(experiment.presets)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_run_directory_is_complete_and_well_formed(tiny_runs, name):
    record = tiny_runs[name]
    directory = record.directory
    for file in ("config.json", "metrics.jsonl", "summary.json", "report.md", "report.html"):
        assert (directory / file).is_file(), file
    assert not (directory / CHECKPOINTS).exists()
    reread = RunRecord.load(directory)
    assert reread.complete and reread.rows == record.rows
    plan = get_experiment(name).trials(
        get_experiment(name).settings("tiny", {"dataset": record.settings["dataset"]}),
        None,
        record.finals(),
    )
    assert list(record.finals()) == [t.key for t in plan]  # every planned trial ran, once
    for key in record.finals():
        steps = [r["step"] for r in record.curve(key)]
        assert steps[0] == 0 and steps == sorted(set(steps))
    figures = sorted((directory / "figures").glob("*.png"))
    assert figures and all(f.read_bytes().startswith(PNG) for f in figures)
    markdown = (directory / "report.md").read_text()
    for figure in figures:
        assert f"figures/{figure.name}" in markdown
    first = "Published beside ours" if get_experiment(name).legacy else "## Claims"
    assert first in markdown and record.config["command"] in markdown


def test_ioffe_rows_hold_what_fig_1_needs(tiny_runs):
    record = tiny_runs["ioffe2015-mnist"]
    assert record.config["data"]["name"] == "fashion-mnist"
    for network in ("plain/seed=0", "bn/seed=0", "plain/seed=1", "bn/seed=1"):
        for row in record.curve(network):
            assert 0.0 <= row["test_accuracy"] <= 1.0
            assert row["p15"] <= row["p50"] <= row["p85"]
    assert all("bn_gamma" in r and "bn_running_std" in r for r in record.curve("bn/seed=1"))
    summary = record.summary
    (sweep,) = summary["sweeps"]
    assert sweep["setting"] == "learning_rate" and sweep["value"] in record.settings["lr_sweep"]
    losses = {c["value"]: c["train_loss"] for c in sweep["table"]}
    assert sweep["value"] == min(losses, key=losses.get)  # the rule: the lowest training loss
    assert all(f["learning_rate"] == sweep["value"] for k, f in record.finals().items()
               if not k.startswith("sweep/"))  # fmt: skip
    claims = {c["name"]: c for c in summary["claims"]}
    assert set(claims) == {"final-accuracy", "ahead-throughout", "faster", "drift"}
    finals = record.finals()
    per_seed = {k: finals[f"bn/seed={k}"]["test_accuracy"] - finals[f"plain/seed={k}"]["test_accuracy"]
                for k in (0, 1)}  # fmt: skip
    assert claims["final-accuracy"]["ours"]["per_seed"] == {str(k): v for k, v in per_seed.items()}
    assert claims["final-accuracy"]["published"]["unverified"]  # read from the figure [M]


def test_lr_tolerance_summary(tiny_runs):
    record = tiny_runs["lr-tolerance"]
    runs = record.summary["runs"]
    assert set(runs) == {
        "plain-x1",
        "bn-x1",
        "bn-x5",
        "plain-x30",
        "bn-x5-sigmoid",
        "plain-x1-sigmoid",
    }
    assert record.summary["target_accuracy"] == runs["plain-x1"]["best_validation_accuracy"]
    assert runs["plain-x1"]["steps_to_target"] is not None
    assert runs["bn-x5"]["learning_rate"] == pytest.approx(5 * record.settings["base_lr"])
    assert all("validation_accuracy" in r for r in record.curve("bn-x5"))


def test_init_sensitivity_has_every_cell(tiny_runs):
    cells = tiny_runs["init-sensitivity"].summary["cells"]
    assert set(cells) == {
        f"{n}/{i}" for n in ("plain", "bn") for i in ("gaussian:0.01", "gaussian:1", "he")
    }
    assert all(0.0 <= c["mean"] <= 1.0 and c["n"] == 1 for c in cells.values())


def test_regularization_reports_gaps_and_paired_tests(tiny_runs):
    record = tiny_runs["regularization"]
    assert record.config["data"]["train"] == 100
    variants = record.summary["variants"]
    assert set(variants) == {"none", "dropout", "bn", "bn+dropout"}
    for cell in variants.values():
        assert cell["gap"]["mean"] == pytest.approx(
            cell["train_accuracy"]["mean"] - cell["test_accuracy"]["mean"]
        )
        assert cell["gap"]["n"] == 2
    assert set(record.summary["versus_none"]) == {"dropout", "bn", "bn+dropout"}


def test_placement_judges_the_paired_difference_over_seeds(tiny_runs):
    record = tiny_runs["placement"]
    finals = record.finals()
    claim = next(c for c in record.summary["claims"] if c["name"] == "after-minus-before")
    accuracy = {key: row["test_accuracy"] for key, row in finals.items()}
    expected = {str(k): accuracy[f"after/seed={k}"] - accuracy[f"before/seed={k}"] for k in (0, 1)}
    assert claim["ours"]["per_seed"] == expected and claim["ours"]["n"] == 2
    assert claim["verdict"] == "inconclusive" and "too few seeds" in claim["reason"]
    assert "too few seeds" in (record.directory / "report.md").read_text()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_html_report_is_self_contained(tiny_runs, name):
    page = (tiny_runs[name].directory / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(list((tiny_runs[name].directory / "figures").glob("*.png")))
    assert all(base64.b64decode(image).startswith(PNG) for image in images)
    assert "Environment" in page and "Reproducing this run" in page


def test_combined_report(tiny_runs, tmp_path):
    runs = [tiny_runs["placement"].directory, tiny_runs["regularization"].directory]
    markdown, page = write_combined_report(runs, tmp_path / "combined")
    text = markdown.read_text()
    assert (
        "normkit lab: 2 runs" in text
        and "## Scoreboard" in text
        and "1. BN before or after" in text
        and "2. BN as a regularizer" in text
    )
    # the scoreboard lists every claim of every run, the ported run's with their intervals
    scoreboard = text.split("## 1.")[0]
    for claim in tiny_runs["placement"].summary["claims"]:
        assert claim["quantity"] in scoreboard
    assert len(re.findall("data:image/png;base64,", page.read_text())) == len(
        list((tmp_path / "combined" / "figures").glob("*.png"))
    )


runner = CliRunner()


def test_cli_list_run_report(tmp_path, tiny_runs):
    listing = runner.invoke(app, ["lab", "list"])
    assert listing.exit_code == 0, listing.output
    assert all(name in listing.output for name in EXPERIMENTS)
    out = tmp_path / "cli-run"
    result = runner.invoke(
        app,
        [
            "lab",
            "run",
            "placement",
            "--preset",
            "tiny",
            "--dataset",
            "digits",
            "--steps",
            "6",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.html'}" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["steps"] == 6 and config["preset"] == "tiny"
    again = runner.invoke(app, ["lab", "report", str(out)])
    assert again.exit_code == 0 and "report.html" in again.output
    combined = runner.invoke(app, ["lab", "report", str(out), str(tiny_runs["placement"].directory), "--out",
                                   str(tmp_path / "both")])  # fmt: skip
    assert combined.exit_code == 0, combined.output
    assert (tmp_path / "both" / "report.html").is_file()


def test_cli_errors_name_the_fix(tmp_path):
    result = runner.invoke(app, ["lab", "run", "placement", "--quick", "--preset", "full"])
    assert result.exit_code != 0 and "contradict" in str(result.exception)
    result = runner.invoke(app, ["lab", "run", "placement", "--set", "steps"])
    assert "KEY=VALUE" in str(result.exception)
    result = runner.invoke(app, ["lab", "report", str(tmp_path)])
    assert "not a lab run" in str(result.exception)


def test_a_cnn_experiment_on_mnist1d_uses_1d_convolutions(tmp_path):
    record = run_experiment(
        "placement", "tiny", {"dataset": "mnist1d"}, out=tmp_path / "m", write_report=False
    )
    assert record.config["data"]["sample_shape"] == [1, 40]
    assert all(0.0 <= f["test_accuracy"] <= 1.0 for f in record.finals().values())


def test_models_follow_the_papers_placement_and_initialization():
    import math

    import torch

    import normkit as nk
    from normkit.errors import ConfigError
    from normkit.lab.models import cnn, initialize, mlp, pre_activation

    before = mlp(784, (100, 100, 100), norm="batch")
    assert before.linear1.bias is None and isinstance(before.norm1, nk.BatchNorm1d)
    assert list(before._modules)[1:4] == ["linear1", "norm1", "act1"]
    assert pre_activation(before, 3) is before.norm3
    plain = mlp(784)
    assert pre_activation(plain, 3) is plain.linear3
    after = cnn((1, 28, 28), (4, 8), 16, norm="batch", placement="after")
    assert after.conv1.bias is not None and list(after._modules)[:3] == ["conv1", "act1", "norm1"]
    assert isinstance(cnn((1, 28, 28), (4, 8), 16, norm="group:2").norm1, nk.GroupNorm)
    big = torch.nn.Linear(4000, 3000)
    for scheme, std in (
        ("gaussian:0.01", 0.01),
        ("he", math.sqrt(2 / 4000)),
        ("xavier", math.sqrt(2 / 7000)),
    ):
        initialize(torch.nn.Sequential(big), scheme, torch.Generator().manual_seed(0))
        assert abs(big.weight.std().item() / std - 1) < 0.01 and big.bias.abs().max() == 0
    with pytest.raises(ConfigError, match="gaussian:STD"):
        initialize(before, "uniform", torch.Generator())
    with pytest.raises(ConfigError, match="activation='swish'"):
        mlp(10, activation="swish")

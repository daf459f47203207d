"""The small-batch experiments (batch-size, renorm, ghost-bn, layer-norm, batch-layer-norm,
switchable) end to end in their tiny presets on the digits: every quantity their figures and tables
need is in the rows and the summary, within its range, and the reports render."""

import math
import re

import pytest

from normkit.lab import RunRecord, experiment_names, get_experiment, run_experiment
from normkit.lab.records import CHECKPOINT

EXPERIMENTS = ["batch-size", "renorm", "ghost-bn", "layer-norm", "batch-layer-norm", "switchable"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-batch")
    return {
        name: run_experiment(name, "tiny", {"dataset": "digits"}, out=root / name)
        for name in EXPERIMENTS
    }


def is_error(value) -> bool:
    """A top-1 error in percent."""
    return isinstance(value, float) and 0.0 <= value <= 100.0


def is_fraction(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_registered_with_presets_and_a_paper():
    assert set(EXPERIMENTS) <= set(experiment_names())
    for name in EXPERIMENTS:
        experiment = get_experiment(name)
        assert experiment.paper and experiment.claim and experiment.title
        assert {"quick", "tiny"} <= set(experiment.presets)
        experiment.settings("quick")  # every preset names real settings
        experiment.settings("tiny")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_run_directory_and_report(runs, name):
    record = runs[name]
    directory = record.directory
    for file in ("config.json", "metrics.jsonl", "summary.json", "report.md", "report.html"):
        assert (directory / file).is_file(), file
    assert not (directory / CHECKPOINT).exists()
    assert RunRecord.load(directory).rows == record.rows
    settings = get_experiment(name).settings("tiny", {"dataset": "digits"})
    plan = get_experiment(name).trials(settings, None, record.finals())
    assert list(record.finals()) == [t.key for t in plan]  # every planned trial ran, once
    for key, final in record.finals().items():
        assert not final["diverged"], key
        assert [r["step"] for r in record.curve(key)][0] == 0
    figures = sorted((directory / "figures").glob("*.png"))
    assert figures and all(f.read_bytes().startswith(PNG) for f in figures)
    markdown = (directory / "report.md").read_text()
    assert "Published beside ours" in markdown and "Deviations" in markdown
    assert all(f"figures/{f.name}" in markdown for f in figures)
    page = (directory / "report.html").read_text()
    assert len(re.findall("data:image/png;base64,", page)) == len(figures)


def test_batch_size_has_every_cell_of_the_figure_and_table(runs):
    record = runs["batch-size"]
    s, settings = record.summary, record.settings
    errors = s["errors"]
    assert set(errors) == {"bn", "gn", "ln", "in", "brn", "gbn", "sn", "syncbn"}
    for normalizer in ("bn", "gn", "ln", "in", "brn", "gbn", "sn"):
        assert set(errors[normalizer]) == {"8", "2"}
    # Ghost BN's ghost batch (4) covers the whole batch at 2: that cell is BN's, marked as such
    assert errors["gbn"]["2"]["same_as"] == "bn"
    assert errors["gbn"]["2"]["test_error"] == errors["bn"]["2"]["test_error"]
    assert "same_as" not in errors["gbn"]["8"]
    assert set(errors["syncbn"]) == {"2"}
    for normalizer, cells in errors.items():
        for cell in cells.values():
            assert is_error(cell["test_error"]) and is_error(cell["train_error"])
            dependent = normalizer in ("bn", "brn", "gbn", "sn", "syncbn")
            assert (
                is_error(cell["batch_stat_error"])
                if dependent
                else cell["batch_stat_error"] is None
            )
    assert s["batch_sizes"] == [2, 8]
    assert math.isclose(s["bn_rise"], errors["bn"]["2"]["test_error"] - min(
        errors["bn"]["8"]["test_error"], errors["bn"]["2"]["test_error"]))  # fmt: skip
    assert s["gn_range"] >= 0 and set(s["order_at_largest"]) == {"bn", "gn", "ln", "in"}
    sync = s["sync"]["2"]
    assert sync["syncbn"] == errors["syncbn"]["2"]["test_error"]
    assert sync["bn_same_per_device"] == errors["bn"]["2"]["test_error"]
    finals = record.finals()
    assert finals["syncbn/b=2x2"]["global_batch"] == 2 * settings["sync_processes"] == 4
    # SN's learned weights: a softmax over (IN, LN, BN) for the mean and the variance of each layer
    for layers in s["importance"].values():
        assert set(layers) == {"norm1", "norm2"}
        for weights in layers.values():
            for stat in ("mean", "var"):
                assert len(weights[stat]) == 3 and math.isclose(sum(weights[stat]), 1, rel_tol=1e-5)


def test_batch_size_steps_follow_the_epochs_and_the_learning_rate_scales(runs):
    record = runs["batch-size"]
    settings = record.settings
    n = record.config["data"]["train"]
    for final in record.finals().values():
        expected = max(1, round(settings["epochs"] * n / final["global_batch"]))
        assert final["steps"] == final["step"] == expected


def test_renorm_reports_eval_and_training_mode_and_the_control(runs):
    s = runs["renorm"].summary
    arms = s["arms"]
    assert set(arms) == {
        "micro/bn-128",
        "micro/bn-4",
        "micro/brn-4",
        "noniid/bn-iid",
        "noniid/bn",
        "noniid/brn",
        "noniid/bn-halves",
    }
    for key, cell in arms.items():
        assert is_fraction(cell["test_accuracy"]) and is_fraction(cell["train_mode_accuracy"])
        assert math.isclose(
            cell["train_eval_gap"], cell["train_mode_accuracy"] - cell["test_accuracy"]
        )
        assert (cell["control_50_accuracy"] is not None) == (key == "noniid/bn")
    assert is_fraction(arms["noniid/bn"]["control_50_accuracy"])
    assert math.isclose(
        s["micro_brn_minus_bn"],
        arms["micro/brn-4"]["test_accuracy"] - arms["micro/bn-4"]["test_accuracy"],
    )


def test_ghost_bn_has_errors_distances_and_updates(runs):
    record = runs["ghost-bn"]
    s, settings = record.summary, record.settings
    arms = s["arms"]
    assert list(arms) == ["sb", "lb", "lb+lr", "lb+lr+gbn", "lb+lr+gbn+ra"]
    ratio = settings["large_batch"] // settings["small_batch"]
    assert arms["lb+lr+gbn+ra"]["updates"] == arms["sb"]["updates"] == ratio * arms["lb"]["updates"]
    finals = record.finals()
    assert finals["lb+lr"]["learning_rate"] == pytest.approx(settings["base_lr"] * math.sqrt(ratio))
    assert finals["lb+lr+gbn"]["ghost_batch"] == settings["ghost_batch"]
    for key, cell in arms.items():
        assert is_error(cell["test_error"]) and is_error(cell["train_error"])
        assert cell["distance"] > 0
        curve = record.curve(key)
        assert curve[0]["distance"] == 0.0  # ||w0 - w0||
        assert all(r["distance"] >= 0 and is_error(r["test_error"]) for r in curve)
    assert set(s["improvement_per_step"]) == {"lr", "gbn", "ra"}


def test_layer_norm_cells_and_curves(runs):
    record = runs["layer-norm"]
    s = record.summary
    assert set(s["cells"]) == {"none", "bn", "ln"}
    for normalizer, cells in s["cells"].items():
        assert set(cells) == {"16", "4"}
        for cell in cells.values():
            assert is_error(cell["test_error"]) and is_error(cell["early_error"])
            assert (cell["batch_stat_error"] is not None) == (normalizer == "bn")
    for key in record.finals():
        epochs = [r["epoch"] for r in record.curve(key)]
        assert (
            epochs[0] == 0
            and epochs == sorted(epochs)
            and epochs[-1] == pytest.approx(1.0, abs=0.1)
        )
    assert s["rise"]["ln"] == pytest.approx(
        s["cells"]["ln"]["4"]["test_error"] - s["cells"]["ln"]["16"]["test_error"]
    )


def test_batch_layer_norm_has_every_inference_configuration(runs):
    cells = runs["batch-layer-norm"].summary["cells"]
    assert set(cells) == {"bn", "ln", "bln", "bln-nosqrt"}
    for normalizer, by_batch in cells.items():
        assert set(by_batch) == {"8", "1"}
        for cell in by_batch.values():
            assert is_error(cell["test_error"])
            if normalizer.startswith("bln"):
                assert len(cell["configurations"]) == 4
                assert all(is_error(v) for v in cell["configurations"].values())
            else:
                assert cell["configurations"] is None
    assert is_error(cells["bn"]["1"]["batch_stat_error"])


def test_switchable_reports_errors_and_the_bn_share(runs):
    record = runs["switchable"]
    s = record.summary
    assert set(s["cells"]) == {"bn", "gn", "sn"}
    assert set(s["importance"]) == {"8", "2"}
    for importance in s["importance"].values():
        mean_bn = [w["mean"][2] for w in importance["layers"].values()]
        assert importance["bn_share_mean"] == pytest.approx(sum(mean_bn) / len(mean_bn))
    assert set(s["bn_share_fall"]) == {"bn_share_mean", "bn_share_var"}
    assert all(r.get("importance") for r in record.curve("sn/b=2"))  # logged during training

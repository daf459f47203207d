"""The small-batch experiments (batch-size, renorm, switchable)
end to end in their tiny presets on the digits: every quantity their figures and tables
need is in the rows and the summary, within its range, and the reports render."""

import math
import re

import pytest

from normkit.lab import RunRecord, experiment_names, get_experiment, load_dataset, run_experiment
from normkit.lab.records import CHECKPOINTS

EXPERIMENTS = ["batch-size", "renorm", "switchable"]
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
    assert not (directory / CHECKPOINTS).exists()
    assert RunRecord.load(directory).rows == record.rows
    experiment = get_experiment(name)
    settings = experiment.settings("tiny", {"dataset": "digits"})
    data = experiment.prepare_data(settings, load_dataset("digits"))
    plan = experiment.trials(settings, data, record.finals())
    assert list(record.finals()) == [t.key for t in plan]  # every planned trial ran, once
    for key, final in record.finals().items():
        assert not final["diverged"], key
        assert [r["step"] for r in record.curve(key)][0] == 0
    figures = sorted((directory / "figures").glob("*.png"))
    assert figures and all(f.read_bytes().startswith(PNG) for f in figures)
    markdown = (directory / "report.md").read_text()
    first = "## Claims"
    assert first in markdown and "Deviations" in markdown
    assert all(f"figures/{f.name}" in markdown for f in figures)
    page = (directory / "report.html").read_text()
    assert len(re.findall("data:image/png;base64,", page)) == len(figures)


def test_batch_size_has_every_cell_of_the_grid_and_its_claims(runs):
    record = runs["batch-size"]
    finals = record.finals()
    cells = {(r["normalizer"], r["batch_per_device"]) for r in finals.values()}
    # every arm crosses the normalization batches; SyncBN runs on its own grid, 2 gloo processes
    # holding 4 of the gradient batch of 8 each
    normalizers = ("bn", "bn-fc", "gn", "ln", "in", "brn", "sn", *REMEDIES)
    expected = {(n, b) for n in normalizers for b in (8, 2)} | {("syncbn", 4)}
    assert cells == expected
    sync = finals["syncbn/batch_per_device=4/seed=0"]
    assert sync["processes"] == record.settings["sync_processes"] == 2
    for row in finals.values():
        assert is_error(row["test_error"]) and is_error(row["train_error"])
        dependent = row["normalizer"] in ("bn", "bn-fc", "brn", "sn", "syncbn", "evo_b0", "mabn", "cbn")
        assert is_error(row["batch_stat_error"]) if dependent else row["batch_stat_error"] is None
    # SN's learned weights: a softmax over (IN, LN, BN) for the mean and the variance of each conv
    # layer's norm (none on the hidden layer), named as in the model despite the microbatch wrapper
    for row in finals.values():
        if row["normalizer"] == "sn":
            assert set(row["importance"]) == {"norm1", "norm2"}
            for weights in row["importance"].values():
                for stat in ("mean", "var"):
                    assert len(weights[stat]) == 3 and math.isclose(sum(weights[stat]), 1, rel_tol=1e-5)
    claims = {c["name"]: c for c in record.summary["claims"]}
    bn = {b: finals[f"bn/batch_per_device={b}/seed=0"]["test_error"] for b in (8, 2)}
    assert math.isclose(claims["bn-degrades"]["ours"]["mean"], bn[2] - min(bn.values()))
    bn_fc = {b: finals[f"bn-fc/batch_per_device={b}/seed=0"]["test_error"] for b in (8, 2)}
    assert math.isclose(claims["bn-fc-degrades"]["ours"]["mean"], bn_fc[2] - min(bn_fc.values()))
    gn_minus_bn = finals["gn/batch_per_device=2/seed=0"]["test_error"] - bn[2]
    assert math.isclose(claims["gn-beats-bn-small"]["ours"]["mean"], gn_minus_bn)
    assert math.isclose(claims["syncbn-whole-batch"]["ours"]["mean"], sync["test_error"] - bn[8])
    sn_minus_bn = finals["sn/batch_per_device=8/seed=0"]["test_error"] - bn[8]
    assert math.isclose(claims["sn-vs-bn-large"]["ours"]["mean"], sn_minus_bn)
    assert claims["gn-beats-bn-small"]["published"]["value"] == -10.6
    assert "gn-flat" not in claims  # true by construction with a fixed gradient batch
    # one seed in the tiny preset: every judged claim is inconclusive, and says why
    for claim in claims.values():
        if claim["criterion"] is not None:
            assert claim["verdict"] == "inconclusive" and "too few seeds" in claim["reason"]
    markdown = (record.directory / "report.md").read_text()
    assert "Switchable Norm's learned importance weights" in markdown  # the extra section


def test_batch_size_fixes_the_gradient_batch_and_varies_only_the_normalization_batch(runs):
    """Issue 17: every trial takes the same updates of the same gradient batch; a normalizer that
    does not use the batch (GN, LN, IN) gives the same trial at every normalization batch."""
    record = runs["batch-size"]
    settings, finals = record.settings, record.finals()
    assert settings["gradient_batch"] == 8 and not settings["hidden_norm"]
    for final in finals.values():
        assert final["steps"] == final["step"] == settings["steps"]
    for normalizer in ("gn", "ln", "in", "ws_gn", "frn", "evo_s0"):
        large, small = (finals[f"{normalizer}/batch_per_device={b}/seed=0"] for b in (8, 2))
        assert large["test_error"] == small["test_error"] and large["test_loss"] == small["test_loss"]
    for normalizer in ("bn", "evo_b0", "mabn", "cbn"):  # these do use it
        losses = [finals[f"{normalizer}/batch_per_device={b}/seed=0"]["test_loss"] for b in (8, 2)]
        assert losses[0] != losses[1], normalizer


# issue 18's arms: (arm, arm it is compared with, B of each in the tiny preset, published value)
REMEDY_CLAIMS = {
    "ws-gn-beats-bn-small": ("ws_gn", "bn", (2, 2), None),
    "ws-gn-small-vs-bn-large": ("ws_gn", "bn", (2, 8), 0.0),
    "frn-beats-gn-small": ("frn", "gn", (2, 2), -1.0),
    "frn-vs-bn-large": ("frn", "bn", (8, 8), -0.7),
    "evonorm-s0-beats-bn-small": ("evo_s0", "bn", (2, 2), None),
    "evonorm-b0-vs-bn-large": ("evo_b0", "bn", (8, 8), None),
    "mabn-beats-bn-small": ("mabn", "bn", (2, 2), None),
    "mabn-small-vs-bn-large": ("mabn", "bn", (2, 8), 0.0),
    "cbn-beats-bn-small": ("cbn", "bn", (2, 2), None),
    "cbn-vs-gn-small": ("cbn", "gn", (2, 2), None),
}
REMEDIES = ("ws_gn", "frn", "evo_s0", "evo_b0", "mabn", "cbn")


def test_batch_size_claims_of_the_small_batch_remedies(runs):
    """Issue 18: each new normalizer's claims are its error minus BN's (or GN's) at the stated
    normalization batches, with its paper's number, cited and marked unverified."""
    record = runs["batch-size"]
    finals, claims = record.finals(), {c["name"]: c for c in record.summary["claims"]}
    papers = {"ws": "Qiao et al. 2019", "frn": "Singh & Krishnan 2020", "evonorm": "Liu et al. 2020",
              "mabn": "Yan et al. 2020", "cbn": "Yao et al. 2021"}  # fmt: skip
    for name, (arm, other, (b_arm, b_other), value) in REMEDY_CLAIMS.items():
        claim = claims[name]
        ours = (finals[f"{arm}/batch_per_device={b_arm}/seed=0"]["test_error"]
                - finals[f"{other}/batch_per_device={b_other}/seed=0"]["test_error"])  # fmt: skip
        assert math.isclose(claim["ours"]["mean"], ours, abs_tol=1e-9), name
        assert claim["published"]["value"] == value and claim["published"]["unverified"], name
        assert papers[name.split("-")[0]] in claim["published"]["source"], name
        assert claim["criterion"] is not None, name
    markdown = (record.directory / "report.md").read_text()
    assert all(label in markdown for label in ("WS + GN", "FRN + TLU", "EvoNorm-B0", "MABN", "CBN"))


def test_batch_size_full_preset_puts_the_costly_remedies_at_the_ends_only():
    """The full preset's budget: EvoNorm-B0, MABN and CBN train at the largest and smallest B (64
    and 2), BN, Batch Renorm and SN at every B; the batch-independent arms at the ends."""
    experiment = get_experiment("batch-size")
    settings = experiment.settings()
    grids: dict[str, set[int]] = {}
    for trial in experiment.trials(settings, None, {}):
        grids.setdefault(trial.params["normalizer"], set()).add(trial.params["batch_per_device"])
    assert grids["bn"] == grids["brn"] == grids["sn"] == set(settings.batch_sizes)
    for normalizer in ("gn", *REMEDIES):
        assert grids[normalizer] == {64, 2}, normalizer


def test_switchable_and_batch_size_share_their_sn_and_bn_trials(runs):
    """Issue 16: the two experiments had contradicted each other on SN vs BN at the large batch;
    now both measure it on the same trials, so their claims agree by construction."""
    ours, theirs = runs["switchable"].finals(), runs["batch-size"].finals()
    for key, row in ours.items():
        assert row["test_error"] == theirs[key]["test_error"], key
    claims = [{c["name"]: c for c in runs[n].summary["claims"]}["sn-vs-bn-large"]
              for n in ("switchable", "batch-size")]  # fmt: skip
    assert claims[0]["ours"] == claims[1]["ours"] and claims[0]["verdict"] == claims[1]["verdict"]


def test_renorm_reports_eval_and_training_mode_the_control_and_its_claims(runs):
    record = runs["renorm"]
    finals = record.finals()
    arms = ["micro-bn-128", "micro-bn-4", "micro-brn-4", "noniid-bn-iid", "noniid-bn", "noniid-brn",
            "noniid-bn-halves"]  # fmt: skip
    assert list(finals) == [f"{arm}/seed=0" for arm in arms]
    cell = {row["arm"]: row for row in finals.values()}
    for arm, row in cell.items():
        assert is_fraction(row["test_accuracy"]) and is_fraction(row["train_mode_accuracy"])
        assert math.isclose(row["train_eval_gap"], row["train_mode_accuracy"] - row["test_accuracy"])
        assert (row["control_50_accuracy"] is not None) == (arm == "noniid-bn")
    assert is_fraction(cell["noniid-bn"]["control_50_accuracy"])
    claims = {c["name"]: c for c in record.summary["claims"]}
    accuracy = {arm: row["test_accuracy"] for arm, row in cell.items()}
    assert math.isclose(claims["micro-brn-beats-bn"]["ours"]["mean"],
                        accuracy["micro-brn-4"] - accuracy["micro-bn-4"])  # fmt: skip
    assert math.isclose(claims["noniid-hurts-bn"]["ours"]["mean"],
                        accuracy["noniid-bn-iid"] - accuracy["noniid-bn"])  # fmt: skip
    gaps = abs(cell["micro-bn-4"]["train_eval_gap"]) - abs(cell["micro-brn-4"]["train_eval_gap"])
    assert math.isclose(claims["micro-bn-gap"]["ours"]["mean"], gaps)
    assert claims["noniid-brn-beats-bn"]["published"]["value"] == pytest.approx(0.116)
    assert all(c["verdict"] == "inconclusive" for c in claims.values() if c["criterion"])  # 1 seed


def test_switchable_claims_and_the_bn_share(runs):
    record = runs["switchable"]
    finals = record.finals()
    assert {(r["normalizer"], r["batch_per_device"]) for r in finals.values()} == {
        (n, b) for n in ("bn", "gn", "sn") for b in (8, 2)
    }
    claims = {c["name"]: c for c in record.summary["claims"]}
    error = {(r["normalizer"], r["batch_per_device"]): r["test_error"] for r in finals.values()}
    best = min(error["bn", 2], error["gn", 2])
    assert math.isclose(claims["sn-vs-best-small"]["ours"]["mean"], error["sn", 2] - best)
    shares = {}
    for row in finals.values():
        if row["normalizer"] == "sn":
            mean_bn = [w["mean"][2] for w in row["importance"].values()]
            shares[row["batch_per_device"]] = sum(mean_bn) / len(mean_bn)
    assert math.isclose(claims["bn-share-falls-mean"]["ours"]["mean"], shares[8] - shares[2])
    assert claims["bn-share-falls-mean"]["published"]["unverified"]
    curve = record.curve("sn/batch_per_device=2/seed=0")
    assert all(r.get("importance") and 0 < r["bn_share_mean"] < 1 for r in curve)  # logged in training

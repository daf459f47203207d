"""domain-shift end to end in its tiny preset on the digits: every arm, every shift, AdaBN on the
layers that are BatchNorm's, BIN's gates, and claims computed from the final rows."""

import pytest

from normkit.lab import get_experiment, run_experiment

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("domain-shift")
    return run_experiment("domain-shift", "tiny", {"dataset": "digits"}, out=root / "run")


def test_every_arm_and_shift_is_measured_with_and_without_adabn(run):
    settings = get_experiment("domain-shift").settings("tiny")
    finals = run.finals()
    assert list(finals) == ["bn/seed=0", "in/seed=0", "bin/seed=0"]
    shifts = {"none", *settings.shifts}
    for row in finals.values():
        assert set(row["error"]) == set(row["error_adapted"]) == shifts  # every arm has the fc BN
        assert all(0.0 <= v <= 1.0 for v in [*row["error"].values(), *row["error_adapted"].values()])
    assert finals["bn/seed=0"]["adapted_layers"] == ["norm1", "norm2", "norm_fc"]
    assert finals["bin/seed=0"]["adapted_layers"] == ["norm_fc"]  # BIN's own stats are not BN's
    gates = finals["bin/seed=0"]["rho"]
    assert set(gates) == {"norm1", "norm2"} and finals["bn/seed=0"]["rho"] == {}
    for layer, values in gates.items():
        assert all(0.0 <= v <= 1.0 for v in values)
        assert finals["bin/seed=0"]["rho_mean"][layer] == pytest.approx(sum(values) / len(values))


def test_claims_are_the_final_rows_differences_and_one_seed_is_inconclusive(run):
    finals, claims = run.finals(), {c["name"]: c for c in run.summary["claims"]}
    bn, in_ = finals["bn/seed=0"], finals["in/seed=0"]
    expected = {
        "in-behind-bn-clean": 100 * (in_["error"]["none"] - bn["error"]["none"]),
        "adabn-noise": 100 * (bn["error"]["noise"] - bn["error_adapted"]["noise"]),
        "in-scale-invariant": 100 * abs(in_["error"]["scale"] - in_["error"]["none"]),
    }
    for name, value in expected.items():
        assert claims[name]["ours"]["per_seed"]["0"] == pytest.approx(value), name
    for claim in claims.values():
        if claim["criterion"] is not None:
            reason = "needs GPU scale" if claim["name"] == "bin-clean" else "too few seeds"
            assert claim["verdict"] == "inconclusive" and reason in claim["reason"], claim["name"]
    # an inversion flips the sign of x̂, which no statistics undo: measured, not a test of AdaBN
    assert claims["adabn-invert"]["criterion"] is None and claims["adabn-invert"]["verdict"] is None
    assert {"in-beats-bn-style", "bin-beats-bn-style", "adabn-style"} <= set(claims)
    assert not any("mixed" in name for name in claims)


def test_report_opens_with_the_claims_and_draws_its_figures(run):
    markdown = (run.directory / "report.md").read_text()
    assert "## Claims" in markdown and "Test error by shift" in markdown
    figures = list((run.directory / "figures").glob("*.png"))
    assert {f.stem for f in figures} >= {"errors", "gates"}
    for figure in figures:
        assert figure.read_bytes().startswith(PNG) and f"figures/{figure.name}" in markdown


def test_full_preset_runs_three_seeds_paired():
    experiment = get_experiment("domain-shift")
    settings = experiment.settings("full")
    trials = experiment.preview(settings, None)
    assert settings.seeds >= 3 and len(trials) == 3 * settings.seeds
    seeds = {t.key.split("/")[0]: set() for t in trials}
    for t in trials:
        seeds[t.key.split("/")[0]].add(t.seed)
    assert len({frozenset(s) for s in seeds.values()}) == 1  # every arm has the same seeds


def test_the_gpu_preset_runs_cifar_scale_and_its_tiny_form_runs_here(tmp_path):
    experiment = get_experiment("domain-shift")
    gpu = experiment.settings("gpu")
    assert gpu.dataset == "cifar10" and len(gpu.channels) == 3 and gpu.seeds >= 3
    assert {t.steps for t in experiment.preview(gpu, None)} == {15_640}
    tiny = {"dataset": "digits", "steps": 4, "batch_size": 32, "channels": (4, 8, 8), "hidden": 16,
            "adapt_examples": 64, "test_examples": 64, "eval_every": 2, "seeds": 1}  # fmt: skip
    record = run_experiment("domain-shift", "gpu", tiny, out=tmp_path / "gpu")
    assert record.finals()["bn/seed=0"]["adapted_layers"] == ["norm1", "norm2", "norm3", "norm_fc"]
    claims = {c["name"]: c for c in record.summary["claims"]}
    assert "too few seeds" in claims["bin-clean"]["reason"]  # judged on the gpu preset


def test_bin_on_clean_data_needs_gpu_scale_off_the_gpu_preset(run):
    claim = next(c for c in run.summary["claims"] if c["name"] == "bin-clean")
    assert claim["verdict"] == "inconclusive" and claim["reason"].startswith("needs GPU scale")

"""sequence-norms end to end in its tiny preset: every normalizer at the batch and at batch size 1,
the per-time-step BN probe, and claims computed from the final rows."""

import math

import pytest

from normkit.lab import get_experiment, run_experiment


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence-norms")
    return run_experiment("sequence-norms", "tiny", {}, out=root / "run")


def test_every_normalizer_trains_at_both_batch_sizes_and_the_probe_records_its_error(run):
    settings = get_experiment("sequence-norms").settings("tiny")
    finals = run.finals()
    assert set(finals) == {f"{n}/batch_size={b}/seed=0" for n in settings.norms for b in (4, 1)}
    probe = finals["batch_time/batch_size=1/seed=0"]
    assert probe["steps"] == 0 and probe["training_step_error"].startswith("BatchTooSmallError")
    for key, row in finals.items():
        assert math.isfinite(row["test_bpc"]) and row["test_bpc"] > 0, key
        assert row["batch1_inference_difference"] < 1e-4, key  # eval mode: per sample
        assert row["steps"] == (0 if row is probe else 6 if row["batch_size"] == 4 else 4)
    assert finals["batch_masked/batch_size=4/seed=0"]["test_bpc_batch_stats"] is not None
    assert "test_bpc_batch_stats" not in finals["layer/batch_size=4/seed=0"]
    assert run.config["data"]["name"] == "pydoc-topics"


def test_claims_are_computed_from_the_final_rows(run):
    finals, claims = run.finals(), {c["name"]: c for c in run.summary["claims"]}

    def best(batch, kinds):
        return min(finals[f"{k}/batch_size={batch}/seed=0"]["test_bpc"] for k in kinds
                   if finals[f"{k}/batch_size={batch}/seed=0"]["steps"] > 0)  # fmt: skip

    per_sample, bn = ("layer", "rms"), ("batch_time", "batch_masked")
    assert claims["ln-vs-bn"]["ours"]["per_seed"]["0"] == pytest.approx(best(4, per_sample) - best(4, bn))
    assert claims["ln-vs-bn-batch1"]["ours"]["per_seed"]["0"] == pytest.approx(
        best(1, per_sample) - finals["batch_masked/batch_size=1/seed=0"]["test_bpc"])
    assert claims["per-step-bn-batch1"]["ours"]["per_seed"]["0"] == 1.0
    assert claims["eval-per-sample"]["ours"]["per_seed"]["0"] < 1e-4
    for claim in claims.values():
        if claim["criterion"] is not None:
            assert claim["verdict"] == "inconclusive" and "too few seeds" in claim["reason"]
    markdown = (run.directory / "report.md").read_text()
    assert "## Claims" in markdown and "BatchTooSmallError" in markdown and "unigram" in markdown


def test_dry_run_prices_the_probe_that_trains_nothing():
    from normkit.lab.runner import dry_run

    plan = dry_run("sequence-norms", "tiny")
    probe = next(r for r in plan["trials"] if r["key"].startswith("batch_time/batch_size=1/"))
    assert probe["steps"] == 0 and plan["total_steps"] == 5 * 6 + 4 * 4
    assert all(r["estimated_s"] > 0 for r in plan["trials"])

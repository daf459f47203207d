"""gradient-accumulation in its tiny preset on the digits: how often each arm's running statistics
are updated, that the accumulated arms see the large batch's images per step (and the small arm the
same images, 4 at a time), that plain and exact accumulation train the same weights, and claims
computed from the final rows."""

import pytest
import torch

from normkit.lab import get_experiment, load_dataset, run_experiment
from normkit.lab.trial import Execution, TrialRun

NAME = "gradient-accumulation"
ARMS = ["large", "small", "plain", "exact", "whole-batch"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment(NAME, "tiny", {"dataset": "digits"},
                          out=tmp_path_factory.mktemp("accumulation") / "run")  # fmt: skip


def test_plain_updates_the_running_statistics_k_times_per_step_and_nk_accumulate_once(run):
    k = get_experiment(NAME).settings("tiny").micro_batches
    finals = run.finals()
    assert list(finals) == [f"{arm}/seed=0" for arm in ARMS]
    for arm in ARMS:
        updates = finals[f"{arm}/seed=0"]["bn_updates_per_step"]
        assert set(updates) == {"norm1", "norm2", "norm3"}  # both convolutions and the hidden layer
        assert set(updates.values()) == {k if arm == "plain" else 1.0}, arm
    steps = {arm: finals[f"{arm}/seed=0"]["step"] for arm in ARMS}
    assert steps["small"] == k * steps["large"]
    assert {steps[arm] for arm in ["plain", "exact", "whole-batch"]} == {steps["large"]}


def test_plain_and_exact_train_the_same_weights_and_differ_only_in_running_statistics(run):
    finals = {arm: run.finals()[f"{arm}/seed=0"] for arm in ARMS}
    plain, exact, whole = finals["plain"], finals["exact"], finals["whole-batch"]
    assert plain["parameter_norm"] == exact["parameter_norm"]
    assert plain["train_mode_error"] == exact["train_mode_error"]
    assert plain["precise_error"] == exact["precise_error"]  # PreciseBN replaces the running statistics
    assert whole["parameter_norm"] != exact["parameter_norm"]  # whole-batch normalization trains otherwise
    assert [finals[a]["normalization_batch"] for a in ARMS] == [64, 4, 4, 4, 64]


class _Recording(type(get_experiment(NAME))):
    """The experiment, with every arm's training step recording the images it is given."""

    seen: dict[str, list[torch.Tensor]] = {}

    def setup(self, trial, s, data, generator):
        setup = super().setup(trial, s, data, generator)
        inner, images = setup.train_step, self.seen.setdefault(trial.key.split("/")[0], [])

        def step(x, y):
            images.append(x.clone())
            if inner is not None:
                return inner(x, y)
            loss = torch.nn.functional.cross_entropy(setup.model(x), y)
            setup.optimizer.zero_grad()
            loss.backward()
            setup.optimizer.step()
            return loss.detach()

        setup.train_step = step
        return setup


def test_the_accumulated_arms_see_the_large_batches_and_the_small_arm_the_same_images():
    experiment = _Recording()
    settings = experiment.settings("tiny", {"dataset": "digits"})
    data = experiment.prepare_data(settings, load_dataset("digits"))
    k = settings.micro_batches
    experiment.seen.clear()
    for trial in experiment.preview(settings, data):
        run = TrialRun(experiment, settings, data, trial, Execution())
        for _ in range(2 * (k if trial.params["batch"] == settings.micro_batch else 1)):
            run._train_step()
    seen = experiment.seen
    large = seen["large"]
    assert [x.shape[0] for x in large] == [settings.micro_batch * k] * 2
    assert not torch.equal(large[0], large[1])
    for arm in ["plain", "exact", "whole-batch"]:
        assert len(seen[arm]) == 2 and all(torch.equal(a, b) for a, b in zip(seen[arm], large, strict=True))
    small = seen["small"]
    assert [x.shape[0] for x in small] == [settings.micro_batch] * 2 * k
    assert torch.equal(torch.cat(small[:k]), large[0]) and torch.equal(torch.cat(small[k:]), large[1])


def test_claims_are_paired_differences_and_one_seed_is_inconclusive(run):
    finals, claims = run.finals(), {c["name"]: c for c in run.summary["claims"]}
    error = {arm: finals[f"{arm}/seed=0"]["test_error"] for arm in ARMS}
    expected = {"plain-behind-large": error["plain"] - error["large"],
                "exact-closes-gap": error["plain"] - error["exact"],
                "exact-vs-large": error["exact"] - error["large"],
                "whole-batch-vs-large": error["whole-batch"] - error["large"],
                "small-vs-large": error["small"] - error["large"],
                "exact-vs-precise": error["exact"] - finals["exact/seed=0"]["precise_error"]}  # fmt: skip
    assert set(claims) == set(expected)
    for name, value in expected.items():
        assert claims[name]["ours"]["per_seed"]["0"] == pytest.approx(value), name
        assert "no published number" in claims[name]["published"]["text"]
        assert claims[name]["published"]["value"] is None
    for name in ("plain-behind-large", "exact-closes-gap"):
        assert claims[name]["criterion"] == "> 0"
        assert claims[name]["verdict"] == "inconclusive" and "too few seeds" in claims[name]["reason"]
    assert (run.directory / "report.md").read_text().count("figures/") >= 3


def test_full_and_quick_presets_are_paired_over_three_or_more_seeds():
    experiment = get_experiment(NAME)
    for preset in ("full", "quick"):
        settings = experiment.settings(preset)
        large = settings.micro_batch * settings.micro_batches
        assert settings.seeds >= 3 and settings.train_examples % large == 0
        trials = experiment.preview(settings, None)
        assert len(trials) == len(ARMS) * settings.seeds
        seeds = {arm: {t.seed for t in trials if t.key.startswith(arm + "/")} for arm in ARMS}
        assert len({frozenset(s) for s in seeds.values()}) == 1

"""The Santurkar et al. (2018) experiments end to end in their tiny presets, their layers (the
noise of noisy BN, the ℓp normalizations), and what they need from the runner (a trial's own data
and loss, the step a measurement is taken at, training undisturbed by measuring, resume)."""

from __future__ import annotations

import base64
import copy
import math
import re
from dataclasses import dataclass

import pytest
import torch
from test_datasets import write_fashion_mnist

from helpers import TOLERANCES, assert_close
from normkit import reference
from normkit.errors import ConfigError
from normkit.lab import (
    Arm,
    Experiment,
    Plan,
    RunRecord,
    Settings,
    Setup,
    experiment_names,
    get_experiment,
    register,
    run_experiment,
)
from normkit.lab.evaluation import accuracy_and_loss
from normkit.lab.experiments import santurkar2018_ics as shift
from normkit.lab.experiments import santurkar2018_landscape as landscape
from normkit.lab.experiments import santurkar2018_noisy as noisy
from normkit.lab.mechanism import (
    LpBatchNorm,
    TimeVaryingNoise,
    deep_linear,
    gaussian_regression,
    noise_in_eval,
    noisy_accuracy_and_loss,
    probe_batch,
    vgg,
)
from normkit.lab.models import mlp
from normkit.lab.results import Results
from normkit.lab.seeds import derived_seed

EXPERIMENTS = ["santurkar2018-noisy", "santurkar2018-ics", "santurkar2018-landscape"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Each experiment's tiny preset: the noisy one on tiny Fashion-MNIST IDX files (28×28, the
    real shape), the others on the digits (8×8)."""
    root = tmp_path_factory.mktemp("santurkar")
    write_fashion_mnist(root / "fashion-mnist", train=160, test=60)
    runs = {}
    for name in EXPERIMENTS:
        dataset = "fashion-mnist" if name == "santurkar2018-noisy" else "digits"
        runs[name] = run_experiment(
            name, "tiny", {"dataset": dataset}, out=root / name, data_dir=root / "fashion-mnist"
        )
    return runs


def test_the_three_experiments_are_registered():
    assert set(EXPERIMENTS) <= set(experiment_names())
    for name in EXPERIMENTS:
        experiment = get_experiment(name)
        assert experiment.paper.startswith("Santurkar") and experiment.claim
        assert {"quick", "tiny"} <= set(experiment.presets)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_run_directory_and_reports(tiny_runs, name):
    record = tiny_runs[name]
    directory = record.directory
    for file in ("config.json", "metrics.jsonl", "summary.json", "report.md", "report.html"):
        assert (directory / file).is_file(), file
    reread = RunRecord.load(directory)
    assert reread.complete and reread.rows == record.rows
    figures = sorted((directory / "figures").glob("*.png"))
    assert figures and all(f.read_bytes().startswith(PNG) for f in figures)
    markdown = (directory / "report.md").read_text()
    assert "## Claims" in markdown and "Deviations" in markdown
    claims = record.summary["claims"]
    assert claims and all(c["published"]["source"] for c in claims)
    # every claim with a criterion has a verdict; a measured quantity has none
    assert all((c["verdict"] is None) == (c["criterion"] is None) for c in claims)
    for figure in figures:
        assert f"figures/{figure.name}" in markdown
    page = (directory / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(figures)
    assert all(base64.b64decode(image).startswith(PNG) for image in images)


def test_noisy_records_percentiles_of_every_layer_at_their_steps(tiny_runs):
    record = tiny_runs["santurkar2018-noisy"]
    settings = record.settings
    assert record.config["data"]["name"] == "fashion-mnist"
    assert set(record.finals()) == {
        f"{k}/seed=0" for k in ("standard", "bn", "noisy-bn", "standard-noise")
    }
    for trial in Results(record, noisy.NoisySettings()).all:
        series, final = noisy.percentile_series(trial), trial.final
        assert set(series) == {"layer1", "layer2", "layer3"}  # two conv stages and the fc layer
        for rows in series.values():
            steps = [r[0] for r in rows]
            expected = list(range(settings["percentile_every"], final["step"] + 1, 2))
            assert steps == expected
            for _, p15, p50, p85 in rows:
                if p15 is not None:
                    assert p15 <= p50 <= p85
    names = [c["name"] for c in record.summary["claims"]]
    assert names == ["like-bn", "beats-standard", "less-stable", "noise-stops-standard"]
    trials = {t.params["arm"]: t for t in Results(record, noisy.NoisySettings()).all}
    # The noise moves the channel's distribution by O(1) every step, by construction.
    unstable = {arm: noisy.instability(noisy.percentile_series(t)["layer1"]) for arm, t in trials.items()}
    assert unstable["noisy-bn"] > unstable["bn"]


def test_noisy_claims_read_the_accuracy_curves_evaluated_with_the_noise_on(tiny_runs):
    """Issue 17: noisy BN is judged on the test-accuracy curve (its mean after step 0, per seed),
    paired with BN's; every evaluation carries the noise-on train and test accuracy."""
    record = tiny_runs["santurkar2018-noisy"]
    experiment = get_experiment("santurkar2018-noisy")
    settings = experiment.settings("tiny", {"dataset": "fashion-mnist"})
    results = Results(record, settings)
    curves = {t.params["arm"]: [r["test_accuracy"] for r in t.curve if r["step"] > 0] for t in results.all}
    assert all(len(c) == 2 for c in curves.values())  # steps 4 and 8
    like = next(c for c in experiment.claims(settings) if c.name == "like-bn")
    expected = sum(curves["noisy-bn"]) / 2 - sum(curves["bn"]) / 2
    assert like.ours.per_seed(results)[0] == pytest.approx(expected, abs=1e-12)
    assert all({"train_accuracy", "train_eval_loss"} <= set(r) for t in results.all for r in t.curve)


def test_ics_measures_every_weight_layer_of_both_families(tiny_runs):
    record = tiny_runs["santurkar2018-ics"]
    assert set(record.finals()) == {
        f"{f}-{n}/seed=0" for f in ("cnn", "dln") for n in ("standard", "bn")
    }
    for key in record.finals():
        rows = record.curve(key)
        assert [r["step"] for r in rows] == [0, 3, 6]
        layers = rows[0]["ics"]["layers"]
        if key.startswith("dln"):
            assert list(layers) == [f"linear{i}" for i in range(1, 5)]
            assert all("test_mse" in r for r in rows)
        else:
            assert list(layers) == ["conv1", "conv2", "linear3", "output"]
        for row in rows:
            first = row["ics"]["layers"][next(iter(layers))]
            assert first["l2"] == 0.0  # nothing before the first layer
            for values in row["ics"]["layers"].values():
                assert values["l2"] >= 0 and -1 - 1e-9 <= values["cosine"] <= 1 + 1e-9
    names = [c["name"] for c in record.summary["claims"]]
    assert names == [f"{f}-{q}" for f in ("cnn", "dln") for q in ("relative", "angle", "l2", "faster")]
    for trial in Results(record, shift.IcsSettings()).all:  # the first layer (G' = G) is left out
        layers = shift._window_medians(trial, 6)
        assert layers and not {"conv1", "linear1"} & set(layers)
        assert all(row["ics_relative"] > 0 and row["ics_turn"] >= 0 for row in trial.curve[1:])


def _claim_values(record, name: str) -> dict:
    experiment = get_experiment("santurkar2018-ics")
    settings = experiment.settings("tiny", {"dataset": "digits"})
    claim = next(c for c in experiment.claims(settings) if c.name == name)
    return claim.ours.per_seed(Results(record, settings))


def test_ics_claims_read_the_window_and_the_cnn_convolutions_only(tiny_runs):
    """Issue 17: the claims read the evaluations at steps 0 < t <= window, of the CNN's conv layers
    after the first; an evaluation after the window or a change in the fully connected layers
    leaves them as they are, a change of conv2 inside the window does not."""
    record = copy.deepcopy(tiny_runs["santurkar2018-ics"])
    before = _claim_values(record, "cnn-relative")
    assert before[0] is not None and before[0] > 0
    curve = record.curve("cnn-bn/seed=0")
    late = copy.deepcopy(curve[-1])
    late["step"] = 7  # after the tiny window (6)
    for layer in late["ics"]["layers"].values():
        layer["relative_l2"] = 1e6
    record.rows.append(late)
    for row in curve[1:]:
        for layer in ("linear3", "output"):
            row["ics"]["layers"][layer]["relative_l2"] *= 1e3
    assert _claim_values(record, "cnn-relative") == before
    for row in curve[1:]:
        row["ics"]["layers"]["conv2"]["relative_l2"] *= 2
    assert _claim_values(record, "cnn-relative")[0] == pytest.approx(2 * before[0], rel=1e-9)


def test_ics_quick_is_the_full_protocol_in_the_window_with_fewer_seeds():
    """Quick trains the full preset's networks with the same window and evaluations: each of its
    seeds gives exactly the full run's value of that seed, so quick cannot reverse full."""
    experiment = get_experiment("santurkar2018-ics")
    full, quick = (experiment.settings(p, {}) for p in ("full", "quick"))
    changed = {f for f in vars(full) if getattr(full, f) != getattr(quick, f)}
    assert changed == {"steps", "dln_steps", "seeds"}
    assert full.window <= min(quick.steps, quick.dln_steps) and quick.seeds < full.seeds
    assert full.seeds >= 3


def test_ics_a_longer_run_gives_the_same_claim_values(tmp_path):
    """End to end: training past the window (as the full preset does beyond quick's) leaves every
    judged value of every seed as it is, so a shorter run cannot reverse a longer one."""
    values = []
    for steps in (6, 12):
        overrides = {"dataset": "digits", "steps": steps, "dln_steps": steps}
        record = run_experiment("santurkar2018-ics", "tiny", overrides, out=tmp_path / str(steps))
        values.append({c["name"]: c["ours"]["per_seed"] for c in record.summary["claims"]})
    assert values[0] == values[1]
    assert all(v["0"] is not None for v in values[0].values())


def test_dln_trains_on_its_own_data_with_the_mean_squared_error(tmp_path):
    """The DLN trials train on Setup.data (synthetic regression, full batch) with Setup.loss_fn
    (MSE): the loss of the first step is the initial network's MSE on all the training data."""
    overrides = {"dataset": "digits", "dln_steps": 1, "dln_eval_every": 1, "steps": 1}
    record = run_experiment("santurkar2018-ics", "tiny", overrides, out=tmp_path)
    experiment = get_experiment("santurkar2018-ics")
    settings = experiment.settings("tiny", overrides)
    trial = next(t for t in experiment.trials(settings, None, {}) if t.key == "dln-standard/seed=0")
    generator = torch.Generator().manual_seed(derived_seed(trial.seed, 0))
    setup = experiment.setup(trial, settings, None, generator)
    assert setup.batch_size == len(setup.data.y_train) == settings.dln_samples
    expected = torch.nn.functional.mse_loss(setup.model(setup.data.x_train), setup.data.y_train)
    first = record.curve("dln-standard/seed=0")[1]
    assert first["step"] == 1
    assert_close(torch.tensor(first["train_loss"]), expected.detach(), torch.float32, "MSE")
    assert record.curve("dln-standard/seed=0")[0]["test_mse"] > 0
    final = record.finals()["dln-standard/seed=0"]  # regression: the MSE, no accuracy
    assert final["test_mse"] > 0 and "test_accuracy" not in final


def test_landscape_rows_and_lp_variants(tiny_runs):
    record = tiny_runs["santurkar2018-landscape"]
    assert set(record.finals()) == {f"{k}/seed=0" for k in ("standard", "bn", "l1", "l2", "linf")}
    steps = record.settings["step_sizes"]
    for key in record.finals():
        for row in record.curve(key):
            probe = row["landscape"]
            assert probe["step_sizes"] == steps and len(probe["losses"]) == len(steps)
            assert probe["loss_min"] == min(probe["losses"])
            assert probe["grad_change_max"] == max(probe["grad_changes"])
    claims = {c["name"]: c for c in record.summary["claims"]}
    assert {"loss-band", "gradient-change", "beta", "lp-comparable", "lp-smoother"} <= set(claims)
    for arm in ("standard", "bn"):  # the overflow rate is a claim of its own, per arm
        assert 0 <= claims[f"overflow-{arm}"]["ours"]["mean"] <= 1


def _probe(band: float | None) -> dict:
    """A landscape probe's row; ``band=None``: a step along the gradient overflowed."""
    losses = [1.0, None] if band is None else [1.0, 1.0 + band]
    return {"losses": losses, "grad_changes": [1.0, 2.0], "loss_min": 1.0,
            "loss_max": None if band is None else 1.0 + band, "grad_change_max": 2.0,
            "beta_smoothness": None if band is None else 3.0}  # fmt: skip


def test_landscape_counts_an_overflowed_probe_as_infinite_not_dropped():
    """Issue 17: dropping overflowed probes favoured the network without BN; a median in which an
    overflow counts as +inf keeps them, and the overflow rate is reported."""
    steps, probes = [0, 1, 2, 3], [_probe(9.0), _probe(None), _probe(0.5), _probe(0.7)]
    assert landscape._median_over_probes("loss_band")(steps, probes) == pytest.approx(0.7)  # not 0.6
    assert landscape._median_over_probes("beta_smoothness")(steps, probes) == 3.0
    assert landscape._overflow_rate(steps, probes) == pytest.approx(1 / 3)  # step 0 left out
    assert landscape._median_over_probes("loss_band")(steps, [_probe(1.0)] + [_probe(None)] * 3) == math.inf
    assert landscape._over(1.0, math.inf) == 0.0 and landscape._over(math.inf, 1.0) is None
    assert landscape._over(1.0, 4.0) == 0.25


def test_measuring_does_not_change_training(tmp_path):
    """Measuring every 3 steps or only at the end gives the same trained networks (the final
    test accuracy and the probe at the last step agree), because ics and landscape_probe restore
    model, optimizer and random state exactly."""
    finals = []
    for every in (3, 6):
        record = run_experiment(
            "santurkar2018-landscape",
            "tiny",
            {"dataset": "digits", "eval_every": every, "lp_variants": False},
            out=tmp_path / f"every-{every}",
        )
        finals.append(
            {
                key: (final["test_accuracy"], record.curve(key)[-1]["landscape"])
                for key, final in record.finals().items()
            }
        )
    assert finals[0] == finals[1]


def test_noisy_resumes_to_the_same_rows(tmp_path, monkeypatch):
    """Percentile hooks and the noise's random draws survive an interruption: a run stopped in
    the middle of a trial and resumed writes exactly the rows of an uninterrupted run."""
    settings = {"dataset": "digits", "steps": 12, "standard_noise": False}
    whole = run_experiment("santurkar2018-noisy", "tiny", settings, out=tmp_path / "whole")
    experiment_class = type(get_experiment("santurkar2018-noisy"))
    original = experiment_class.measure

    def interrupted(self, trial, settings_, setup, data):
        if trial.key == "bn/seed=0" and setup.step == 8:
            raise KeyboardInterrupt
        return original(self, trial, settings_, setup, data)

    monkeypatch.setattr(experiment_class, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(
            "santurkar2018-noisy", "tiny", settings, out=tmp_path / "cut", checkpoint_every_s=0
        )
    monkeypatch.setattr(experiment_class, "measure", original)
    resumed = run_experiment("santurkar2018-noisy", out=tmp_path / "cut", resume=True)
    assert resumed.rows == whole.rows


# ------------------------------------------------------------------------ what the runner gives


@dataclass(frozen=True)
class _StepSettings(Settings):
    steps: int = 7
    eval_every: int = 3


@register
class _SeesTheStep(Experiment):
    """Records Setup.step in every row: the runner keeps it up to date for measurements."""

    name = "_sees-the-step"
    title = paper = claim = "test"
    settings_class = _StepSettings

    def plan(self, settings, data):
        return Plan([Arm("only")], settings.steps, eval_every=settings.eval_every)

    def setup(self, trial, settings, data, generator):
        model = mlp(data.features, (4,), data.classes)
        return Setup(model, torch.optim.SGD(model.parameters(), lr=0.1), 8)

    def measure(self, trial, settings, setup, data):
        return {"seen_step": setup.step}


def test_setup_step_is_the_training_step_at_every_measurement(tmp_path):
    record = run_experiment(
        "_sees-the-step", overrides={"dataset": "digits"}, out=tmp_path, write_report=False
    )
    rows = record.curve("only/seed=0")
    assert [r["step"] for r in rows] == [0, 3, 6, 7]
    assert all(r["seen_step"] == r["step"] for r in rows)


# ------------------------------------------------------------------------------------ the layers


def test_noise_changes_every_step_with_the_stated_distribution():
    noise = TimeVaryingNoise(mean_range=1.0, scale_low=1.0, scale_high=3.0, jitter=0.1)
    x = torch.ones(4000, 3, 5)
    draws = [noise(x) for _ in range(200)]
    means = torch.stack([d.mean(dim=(0, 2)) for d in draws])  # per step and channel: s_c + mu_c
    # s_c + mu_c ~ U(1, 3) + U(-1, 1): mean 2, variance 1/3 + 1/3
    assert abs(means.mean().item() - 2.0) < 0.1
    assert abs(means.var().item() - 2 / 3) < 0.12
    assert means.min() > 0 - 0.05 and means.max() < 4 + 0.05
    assert not torch.equal(draws[0], draws[1])
    # within one step, each element's noise has std sqrt(0.1² x² + 0.1²) = 0.1·sqrt(2) at x = 1
    spread = draws[0][:, 0].std().item()
    assert abs(spread - 0.1 * math.sqrt(2)) < 0.01
    noise.eval()
    assert torch.equal(noise(x), 2.0 * x)  # the noise's expectation: E[s] = 2, E[mu] = 0
    with pytest.raises(ConfigError, match="scale_low"):
        TimeVaryingNoise(scale_low=3.0, scale_high=1.0)


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 6)])
def test_lp_normalization_matches_the_reference(p, dtype, shape):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3 + 1).to(dtype)
    layer = LpBatchNorm(3, p).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    y = layer(x)
    expected, mu, scale = reference.lp_batch_norm(
        x.numpy(), p, layer.weight.detach().numpy(), layer.bias.detach().numpy()
    )
    assert_close(y, torch.from_numpy(expected), dtype, f"lp_batch_norm p={p}")
    rtol, _ = TOLERANCES[dtype]
    torch.testing.assert_close(
        layer.running_mean, (0.1 * torch.from_numpy(mu)).to(dtype), rtol=rtol, atol=rtol
    )
    torch.testing.assert_close(
        layer.running_scale, (0.9 + 0.1 * torch.from_numpy(scale)).to(dtype), rtol=rtol, atol=rtol
    )
    layer.eval()
    view = (1, -1) + (1,) * (x.dim() - 2)
    inference = (x - layer.running_mean.view(view)) / (layer.running_scale.view(view) + 1e-5)
    inference = inference * layer.weight.view(view) + layer.bias.view(view)
    assert_close(layer(x), inference.detach(), dtype, "eval mode uses the running statistics")


def test_lp_normalization_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="p=3"):
        LpBatchNorm(4, 3)
    with pytest.raises(ConfigError, match=r"\(N, 4, \*\)"):
        LpBatchNorm(4, 2)(torch.randn(2, 5))


def test_noise_in_eval_draws_from_its_own_generator_and_is_restored():
    """Issue 17: noisy BN is evaluated with the noise on (not its expectation 2x), from a generator
    of its own, so measuring leaves training's random stream alone."""
    noise = TimeVaryingNoise().eval()
    x = torch.ones(8, 3, 2, 2)
    state = torch.get_rng_state()
    with noise_in_eval(noise, torch.Generator().manual_seed(0)) as layers:
        first, second = noise(x), noise(x)
    assert layers == 1 and not torch.equal(first, second) and not torch.equal(first, 2 * x)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    with noise_in_eval(noise, torch.Generator().manual_seed(0)):
        assert torch.equal(noise(x), first)  # seeded: the same draws again
    assert torch.equal(noise(x), 2 * x)  # outside the block: the expectation again


def test_noisy_accuracy_averages_draws_with_the_noise_on():
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    noisy, plain = (vgg((1, 8, 8), (4, 8), 8, 10, norm="batch", noise=n).eval() for n in ({}, None))
    with torch.no_grad():
        expectation = accuracy_and_loss(noisy, x, y)
        assert noisy_accuracy_and_loss(plain, x, y, 3, seed=1) == accuracy_and_loss(plain, x, y)
    once, again = (noisy_accuracy_and_loss(noisy, x, y, 3, seed=1) for _ in range(2))
    assert once == again and once[1] != expectation[1]  # seeded; not the 2x network
    assert noisy_accuracy_and_loss(noisy, x, y, 1, seed=1) != once  # more draws, another mean


def test_networks_have_the_named_layers_the_experiments_use():
    model = vgg((1, 28, 28), (16, 32, 64), 128, 10, norm="batch", noise={})
    names = list(model._modules)
    assert names[:5] == ["conv1", "norm1", "noise1", "act1", "pool1"]
    assert "linear4" in names and names[-1] == "output"
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.conv1.bias is None and vgg((1, 28, 28)).conv1.bias is not None
    assert vgg((3, 32, 32), norm="l2")(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # CIFAR-10
    dln = deep_linear(32, 25, 1, "batch")
    assert sum(1 for n in dln._modules if n.startswith("linear")) == 25
    assert sum(1 for n in dln._modules if n.startswith("norm")) == 24
    with pytest.raises(ConfigError, match="choose one of"):
        vgg((1, 28, 28), norm="weird")


def test_synthetic_data_and_probe_batches_are_seeded():
    a, b = gaussian_regression(64, 8, 2, 0.1, seed=0), gaussian_regression(64, 8, 2, 0.1, seed=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, gaussian_regression(64, 8, 2, 0.1, seed=1).x_train)
    x, y = probe_batch(a, 16, seed=3, step=50)
    assert torch.equal(x, probe_batch(a, 16, seed=3, step=50)[0]) and len(y) == 16
    assert not torch.equal(x, probe_batch(a, 16, seed=3, step=100)[0])
    assert len(probe_batch(a, 1000, seed=3, step=0)[1]) == 64  # at most the whole training set

"""The ``gpu`` presets of santurkar2018-noisy/-ics/-landscape and batch-size: each one's plan
(trials, steps, the model it names) and, on this CPU, its model path at toy size on CIFAR-shaped
data (3×32×32, 10 classes: fake CIFAR-10 python batches in ``--data-dir``)."""

from types import SimpleNamespace

import pytest
import torch
from test_datasets import _cifar_batch

import normkit as nk
from normkit.errors import ConfigError
from normkit.lab import get_experiment, mechanism, models, run_experiment
from normkit.lab.runner import dry_run
from normkit.lab.small_batch import normalization_batch_cnn

SANTURKAR = {  # name: (trials of the gpu preset, their steps)
    "santurkar2018-noisy": (4 * 3, {15_640}),
    "santurkar2018-ics": (2 * 2 * 3, {3_910, 1_000}),  # the CNN's and the DLN's (unchanged)
    "santurkar2018-landscape": (5 * 3, {7_820}),
}
TOY_VGG = (4, "M", 8, 8, "M", 8, "M")  # VGG-11's code path at toy size: 4 convs, 3 pools
TOY = {  # toy sizes for a run on fake CIFAR-10 (80 training and 16 test images)
    "santurkar2018-noisy": {"steps": 4, "batch_size": 16, "eval_every": 2, "eval_examples": 16,
                            "final_train_examples": 32, "percentile_every": 2, "noise_draws": 2},
    "santurkar2018-ics": {"steps": 4, "window": 4, "batch_size": 16, "eval_every": 2, "eval_examples": 16,
                          "dln_depth": 3, "dln_width": 4, "dln_samples": 32, "dln_steps": 2,
                          "dln_eval_every": 1},
    "santurkar2018-landscape": {"steps": 4, "batch_size": 16, "eval_every": 2, "eval_examples": 16,
                                "step_sizes": (0.1, 0.4)},
}  # fmt: skip


@pytest.fixture
def cifar_dir(tmp_path):
    """Fake CIFAR-10 python batches: 5 × 16 training images and 16 test images."""
    for i in range(1, 6):
        _cifar_batch(tmp_path / f"data_batch_{i}", 16, i)
    _cifar_batch(tmp_path / "test_batch", 16, 9)
    return tmp_path


def test_vgg11_is_configuration_a_at_cifar_size():
    """Simonyan & Zisserman 2015, Table 1, A: 8 convs of 64-128-256-256-512-512-512-512, five pools
    taking 32×32 maps to 1×1; a norm spec after every conv and the fc layer, no bias before it."""
    model = models.vgg((3, 32, 32), models.VGG_LAYOUTS["11"], 512, 10, "batch")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model) == 5
    assert model.linear9.in_features == 512 and model.output.out_features == 10
    assert all(c.bias is None for c in convs) and isinstance(model.norm8, torch.nn.BatchNorm2d)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = models.vgg((3, 32, 32), models.VGG_LAYOUTS["11"], 512, 10, "group:4")
    assert isinstance(plain.norm1, torch.nn.GroupNorm) and plain.conv1.bias is None
    assert models.vgg((3, 32, 32), TOY_VGG, 8).conv1.bias is not None  # norm "none": biases


@pytest.mark.parametrize("name", list(SANTURKAR))
def test_santurkar_gpu_preset_plans_vgg11_on_cifar(name, cifar_dir, monkeypatch):
    experiment = get_experiment(name)
    gpu = experiment.settings("gpu")
    assert (gpu.dataset, gpu.vgg, gpu.batch_size, gpu.learning_rate) == ("cifar10", "11", 128, 0.1)
    assert gpu.seeds >= 3 and experiment.deviations(gpu)[0].startswith("VGG-11 (")
    assert mechanism.weight_layers(gpu) == [*(f"conv{i}" for i in range(1, 9)), "linear9", "output"]
    count, steps = SANTURKAR[name]
    assert len(experiment.preview(gpu, None)) == count
    # --dry-run reads the CIFAR-10 batches of --data-dir; VGG-11 shrunk so that calibrating is cheap
    monkeypatch.setitem(models.VGG_LAYOUTS, "11", TOY_VGG)
    preview = dry_run(name, "gpu", {"batch_size": 8}, data_dir=cifar_dir, budget_s=2.0)
    assert preview["data"] == "cifar10" and len(preview["trials"]) == count
    assert {t["steps"] for t in preview["trials"]} == steps and preview["estimated_s"] > 0


@pytest.mark.parametrize("name", list(SANTURKAR))
def test_santurkar_gpu_preset_runs_its_model_path_at_toy_size(name, cifar_dir, monkeypatch, tmp_path):
    monkeypatch.setitem(models.VGG_LAYOUTS, "toy", TOY_VGG)
    overrides = {**TOY[name], "vgg": "toy", "hidden": 8, "seeds": 1}
    record = run_experiment(name, "gpu", overrides, out=tmp_path / "run", data_dir=cifar_dir)
    assert record.config["data"]["name"] == "cifar10" and record.settings["vgg"] == "toy"
    finals = record.finals()
    cnn = {k: v for k, v in finals.items() if not k.startswith("dln")}
    assert len(cnn) == SANTURKAR[name][0] // 3 // (2 if name.endswith("ics") else 1)
    for key, row in cnn.items():
        assert 0.0 <= row["test_accuracy"] <= 1.0 and (row["step"] == 4 or row["diverged"]), key
    assert all(row["step"] == 4 for key, row in cnn.items() if "bn" in key)  # BN does not diverge
    if name.endswith("ics"):  # ICS on every conv layer of the toy VGG, then its fc and output layers
        row = next(r for r in record.curve("cnn-bn/seed=0") if r.get("ics"))
        assert list(row["ics"]["layers"]) == ["conv1", "conv2", "conv3", "conv4", "linear5", "output"]
    if name.endswith("noisy"):  # the percentiles of every ReLU input: 4 convs and the fc layer
        row = next(r for r in record.curve("noisy-bn/seed=0") if r["percentiles"])
        assert sorted(row["percentiles"]) == [f"layer{i}" for i in range(1, 6)]


def test_batch_size_gpu_preset_plans_resnet50_at_wu_and_hes_normalization_batches(cifar_dir):
    experiment = get_experiment("batch-size")
    gpu = experiment.settings("gpu")
    assert (gpu.dataset, 3 * sum(gpu.resnet_blocks) + 2, gpu.gradient_batch) == ("cifar10", 50, 256)
    assert gpu.batch_sizes == (32, 16, 8, 4, 2) and gpu.seeds >= 3 and gpu.sync_processes == 0
    assert experiment.deviations(gpu)[0].startswith("ResNet-50 (bottleneck blocks 3-4-6-3, width 64")
    trials = experiment.preview(gpu, None)
    assert len(trials) == 3 * (5 + 3 * 2)  # BN at every B; GN, LN, IN at the largest and smallest
    assert {t.steps for t in trials} == {5_860}
    # --dry-run on the CIFAR-10 batches of --data-dir, the ResNet shrunk so that calibrating is cheap
    small = {"resnet_blocks": (1, 1), "resnet_width": 4, "groups": 2, "gradient_batch": 32}
    preview = dry_run("batch-size", "gpu", small, data_dir=cifar_dir, budget_s=2.0)
    assert preview["data"] == "cifar10" and len(preview["trials"]) == 33
    with pytest.raises(ConfigError, match="the ResNet"):  # no Batch Renorm, SN, ... on it yet
        experiment.settings("gpu", {"normalizers": ("bn", "brn")})


def test_batch_size_gpu_preset_runs_its_resnet_path_at_toy_size(cifar_dir, tmp_path):
    toy = {"resnet_blocks": (1, 1), "resnet_width": 4, "groups": 2, "gradient_batch": 8,
           "batch_sizes": (8, 2), "steps": 4, "evaluations": 1, "eval_examples": 16,
           "batch_stat_examples": 16, "seeds": 1}  # fmt: skip
    settings = get_experiment("batch-size").settings("gpu", toy)
    data = SimpleNamespace(sample_shape=(3, 32, 32), classes=10)
    net, _ = normalization_batch_cnn(settings, data, "bn", 2, torch.Generator().manual_seed(0))
    ghosts = [m for m in net.modules() if isinstance(m, nk.GhostBatchNorm)]
    assert len(ghosts) == 1 + 2 * 4 and {m.virtual_batch_size for m in ghosts} == {2}  # stem, 2 blocks
    assert sum(isinstance(m, models.Bottleneck) for m in net.modules()) == 2
    record = run_experiment("batch-size", "gpu", toy, out=tmp_path / "run", data_dir=cifar_dir)
    finals = record.finals()
    assert sorted(finals) == sorted(f"{n}/batch_per_device={b}/seed=0" for n in ("bn", "gn", "ln", "in")
                                    for b in (8, 2))  # fmt: skip
    for key, row in finals.items():
        assert 0.0 <= row["test_error"] <= 100.0 and row["step"] == 4, key
        assert (row["batch_stat_error"] is None) == (not key.startswith("bn/")), key
    claims = {c["name"]: c for c in record.summary["claims"]}
    assert {"bn-degrades", "gn-beats-bn-small", "ln-behind-gn", "in-behind-ln"} <= set(claims)


def test_regularization_gpu_preset_plans_resnet50_with_its_rate_sweeps(cifar_dir):
    experiment = get_experiment("regularization")
    gpu = experiment.settings("gpu")
    assert (gpu.dataset, 3 * sum(gpu.resnet_blocks) + 2, gpu.seeds) == ("cifar10", 50, 3)
    assert experiment.deviations(gpu)[0].startswith("ResNet-50 (bottleneck blocks 3-4-6-3, width 64")
    trials = experiment.preview(gpu, None)
    sweeps = 4 * len(gpu.batch_sizes) * len(gpu.lr_sweep)  # each variant's rate at each batch size
    assert len(trials) == sweeps + 4 * len(gpu.batch_sizes) * 3 == 64
    assert sorted(t.steps for t in trials) == [2_000] * sweeps + [7_820] * 24
    small = {"resnet_blocks": (1, 1), "resnet_width": 4, "validation": 16, "batch_sizes": (8, 16)}
    preview = dry_run("regularization", "gpu", small, data_dir=cifar_dir, budget_s=2.0)
    assert preview["data"] == "cifar10" and len(preview["trials"]) == 64


def test_regularization_gpu_preset_runs_its_resnet_path_at_toy_size(cifar_dir, tmp_path):
    toy = {"resnet_blocks": (1, 1), "resnet_width": 4, "train_examples": 64, "validation": 16,
           "batch_sizes": (8, 16), "steps": 4, "sweep_steps": 2, "lr_sweep": (0.01, 0.1), "seeds": 1,
           "eval_every": 2}  # fmt: skip
    record = run_experiment("regularization", "gpu", toy, out=tmp_path / "run", data_dir=cifar_dir)
    finals = {k: v for k, v in record.finals().items() if "learning_rate=" not in k}
    assert len(finals) == 4 * 2, sorted(record.finals())
    for key, row in finals.items():
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["step"] == 4, key
    experiment = get_experiment("regularization")
    settings = experiment.settings("gpu", toy)
    data = SimpleNamespace(sample_shape=(3, 32, 32), classes=10, features=3 * 32 * 32)
    for variant, norms, dropout in (("bn+dropout", 1 + 2 * 4, True), ("none", 0, False)):
        trial = SimpleNamespace(params={"variant": variant, "learning_rate": 0.1, "batch_size": 8})
        net = experiment.setup(trial, settings, data, torch.Generator().manual_seed(0)).model
        assert sum(isinstance(m, models.Bottleneck) for m in net.modules()) == 2, variant
        assert sum(isinstance(m, nk.BatchNorm) for m in net.modules()) == norms, variant
        assert (list(net._modules)[-2:] == ["dropout", "output"]) == dropout, variant  # before fc only
        assert not dropout or net.dropout.p == settings.dropout


def test_lr_tolerance_gpu_preset_plans_vgg11_at_the_edge_of_stability(cifar_dir, monkeypatch):
    experiment = get_experiment("lr-tolerance")
    gpu = experiment.settings("gpu")
    assert (gpu.dataset, gpu.vgg, gpu.batch_size, gpu.seeds) == ("cifar10", "11", 128, 3)
    assert experiment.deviations(gpu)[0].startswith("VGG-11 (")
    trials = experiment.preview(gpu, None)
    sweep = [t for t in trials if t.params.get("phase") == "sweep"]
    assert len(sweep) == len(gpu.lr_sweep) and {t.steps for t in sweep} == {gpu.sweep_steps}
    assert len(trials) - len(sweep) == 7 * 3  # 7 arms x 3 seeds
    assert sorted({t.steps for t in trials if t not in sweep}) == [15_640, 23_460]
    monkeypatch.setitem(models.VGG_LAYOUTS, "11", TOY_VGG)
    small = {"validation": 16, "batch_size": 8}
    preview = dry_run("lr-tolerance", "gpu", small, data_dir=cifar_dir, budget_s=2.0)
    assert preview["data"] == "cifar10" and len(preview["trials"]) == len(trials)


def test_lr_tolerance_gpu_preset_runs_vgg_with_its_activation_and_dropout(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(models.VGG_LAYOUTS, "toy", TOY_VGG)
    toy = {"vgg": "toy", "hidden": 8, "batch_size": 8, "steps": 4, "long_steps": 6, "eval_every": 2,
           "validation": 16, "lr_sweep": (0.01, 0.05), "sweep_steps": 2, "stable_loss": 2.4,
           "seeds": 1}  # fmt: skip
    experiment = get_experiment("lr-tolerance")
    settings = experiment.settings("gpu", toy)
    data = SimpleNamespace(sample_shape=(3, 32, 32), classes=10)
    trials = {t.params["arm"]: t for t in experiment.preview(settings, None)}
    for arm, norms, dropout in (("plain-x1-sigmoid", 0, True), ("bn-x5-sigmoid", 5, False)):
        trial = SimpleNamespace(params={**trials[arm].params, "base_lr": 0.01})
        net = experiment.setup(trial, settings, data, torch.Generator().manual_seed(0)).model
        assert sum(isinstance(m, torch.nn.Sigmoid) for m in net.modules()) == 5, arm
        assert sum(isinstance(m, nk.BatchNorm) for m in net.modules()) == norms, arm
        assert ("dropout" in net._modules) == dropout, arm
        assert sum(isinstance(m, torch.nn.Conv2d) for m in net) == 4, arm
    record = run_experiment("lr-tolerance", "gpu", toy, out=tmp_path / "run", data_dir=cifar_dir)
    assert record.config["data"]["name"] == "cifar10" and record.settings["vgg"] == "toy"
    finals = {k: v for k, v in record.finals().items() if "base_lr=" not in k}
    assert len(finals) == 7, sorted(record.finals())
    for key, row in finals.items():
        assert row["step"] in (4, 6) or row["diverged"], key

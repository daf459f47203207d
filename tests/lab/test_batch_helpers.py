"""The pieces the small-batch experiments are built from: non-i.i.d. pair batches, microbatched
normalization, Batch Renorm's scaled schedule, the networks, BLN's inference configurations, the
gloo trainer against one process, and the runner's ``batch_order``/``train_step`` hooks (resume
included)."""

import math

import pytest
import torch
from test_runner import rows_and_results
from torch import nn

import normkit as nk
from helpers import assert_close
from normkit.errors import ConfigError
from normkit.lab import RunRecord, run_experiment
from normkit.lab.batch_orders import PairedBatches, paired_test_order
from normkit.lab.experiments import renorm as renorm_module
from normkit.lab.experiments.batch_layer_norm import BlnInference, feature_population
from normkit.lab.gloo import GlooDataParallel
from normkit.lab.records import CHECKPOINTS
from normkit.lab.small_batch import (
    PerMicrobatch,
    batch_statistics_accuracy,
    error_vs_batch_figure,
    renorm_ramps,
    small_cnn,
)


def labels(count=60, classes=5):
    return torch.arange(count) % classes


def test_paired_batches_hold_two_different_images_of_each_drawn_label():
    y = labels()
    order = PairedBatches(y, 12, seed=3)
    for _ in range(20):
        index = order.next()
        first, second = index[:6], index[6:]
        assert torch.equal(y[first], y[second])  # pair k: first half [k], second half [k]
        assert (first != second).all()  # two different images
    with pytest.raises(ConfigError, match="even"):
        PairedBatches(y, 7, seed=0)


def test_paired_batches_resume_from_their_state():
    order = PairedBatches(labels(), 8, seed=1)
    order.next()
    state = order.state()
    expected = [order.next() for _ in range(5)]
    again = PairedBatches(labels(), 8, seed=99)
    again.load(state)
    resumed = [again.next() for _ in range(5)]
    assert all(torch.equal(a, e) for a, e in zip(resumed, expected, strict=True))


def test_paired_test_order_uses_every_image_at_most_once():
    y = labels(101, 4)
    order = paired_test_order(y, pairs_per_batch=5, seed=0)
    assert len(order) % 10 == 0 and len(set(order.tolist())) == len(order)
    for batch in order.view(-1, 10):
        assert torch.equal(y[batch[:5]], y[batch[5:]])
    assert torch.equal(order, paired_test_order(y, 5, seed=0))  # seeded: the same for every arm


def test_per_microbatch_batch_norm_is_ghost_batch_norm():
    """BN applied microbatch by microbatch = GhostBatchNorm over the same ghost batches: outputs,
    gradients and running statistics (the experiment's BN-4 and BRN-4 arms share this split)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5) * 2 + 1
    per = PerMicrobatch(nk.BatchNorm2d(3), 4)
    ghost = nk.GhostBatchNorm(3, virtual_batch_size=4)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = per(a), ghost(b)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert_close(ya, yb, what="output")
    assert_close(a.grad, b.grad, what="input gradient")
    assert_close(per.layer.running_mean, ghost.running_mean, what="running mean")
    assert_close(per.layer.running_var, ghost.running_var, what="running var")
    assert int(per.layer.num_batches_tracked) == int(ghost.num_batches_tracked) == 4
    per.eval()
    ghost.eval()
    assert_close(per(x), ghost(x), what="eval")


def test_renorm_ramps_follow_the_papers_fractions():
    r_max, d_max = renorm_ramps(10_000)
    assert (r_max(0), d_max(0)) == (1.0, 0.0)
    assert (r_max(350), d_max(350)) == (1.0, 0.0)  # plain BN for the first 3.5%
    assert d_max(1_800) == pytest.approx(5.0) and r_max(1_800) < 3.0
    assert r_max(2_800) == pytest.approx(3.0) and r_max(10_000) == pytest.approx(3.0)
    r_wu, d_wu = renorm_ramps(100, 1.5, 0.5)
    assert r_wu(100) == pytest.approx(1.5) and d_wu(100) == pytest.approx(0.5)


def test_small_cnn_places_each_normalizer_as_documented():
    g = torch.Generator().manual_seed(0)
    shape, k = (1, 8, 8), 10
    ln = small_cnn(shape, k, "ln", g, channels=(4, 8), hidden=16)
    assert isinstance(ln.norm1, nk.GroupNorm) and ln.norm1.num_groups == 1  # Wu & He's LN
    for name in ("in", "sn"):  # no spatial dims on the hidden layer: LN there
        model = small_cnn(shape, k, name, g, channels=(4, 8), hidden=16)
        assert isinstance(model.norm3, nk.LayerNorm)
    sync = small_cnn(shape, k, "syncbn", g, channels=(4, 8), hidden=16)
    assert all(isinstance(sync._modules[f"norm{i}"], nk.SyncBatchNorm) for i in (1, 2, 3))
    brn = small_cnn(shape, k, "brn", g, channels=(4, 8), hidden=16, renorm_steps=100,
                    renorm_limits=(1.5, 0.5), renorm_momentum=0.1)  # fmt: skip
    assert brn.norm3.r_max(100) == pytest.approx(1.5) and brn.norm3.momentum == 0.1
    plain = small_cnn(shape, k, "bn", g, channels=(4, 8), hidden=16, hidden_norm=False)
    assert isinstance(plain.norm3, nn.Identity) and plain.linear3.bias is not None
    assert plain(torch.rand(3, *shape)).shape == (3, k)
    with pytest.raises(ConfigError, match="groups"):
        small_cnn(shape, k, "gn", g, channels=(4, 8), hidden=16, groups=4)  # 4 groups of 4: IN
    with pytest.raises(ConfigError, match="normalizer"):
        small_cnn(shape, k, "weight", g)


def test_batch_statistics_accuracy_leaves_the_running_statistics_alone():
    model = small_cnn((1, 8, 8), 10, "bn", torch.Generator().manual_seed(0), channels=(4, 8),
                      hidden=16).eval()  # fmt: skip
    before = nk.snapshot_running_stats(model)
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    accuracy = batch_statistics_accuracy(model, x, y, 8)
    assert 0.0 <= accuracy <= 1.0 and not model.training
    for module, buffers in before.saved:
        for name, value in buffers.items():
            assert torch.equal(getattr(module, name), value)


@pytest.fixture
def trained_bln():
    torch.manual_seed(0)
    layer = nk.BatchLayerNorm(6, batch_size=5)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    for _ in range(5):
        layer(torch.randn(5, 6, 4, 4) * 3 + 1)
    return layer


def test_bln_inference_reproduces_the_layer(trained_bln):
    x = torch.randn(5, 6, 4, 4) * 3 + 1
    trained_bln.eval()
    population = BlnInference(trained_bln, "population", "example", None, None)
    assert_close(population(x), trained_bln(x), what="running BN part, per-example LN part")
    trained_bln.train()
    batch = BlnInference(trained_bln, "batch", "example", None, None)
    with nk.frozen_running_stats(trained_bln):
        assert_close(batch(x), trained_bln(x), what="batch BN part (training mode)")


def test_bln_population_feature_statistics(trained_bln):
    model = nn.Sequential(trained_bln)
    x = torch.randn(30, 6, 4, 4) * 2 + 0.5
    stats = feature_population(model, x, chunk=7)
    mean, var = stats["0"]
    assert_close(mean, x.double().mean(1).mean(0).float(), what="mean over channels, averaged")
    assert_close(var, x.double().var(1, unbiased=False).mean(0).float(), what="variance")
    fixed = BlnInference(trained_bln.eval(), "population", "population", mean, var)
    w_b, w_f = trained_bln.mixing_weights()
    x_b = (x - trained_bln.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        trained_bln.running_var.view(1, -1, 1, 1) + trained_bln.eps
    )
    x_f = (x - mean) / torch.sqrt(var + trained_bln.eps)
    expected = (w_b * x_b + w_f * x_f) * trained_bln.weight.view(1, -1, 1, 1) + (
        trained_bln.bias.view(1, -1, 1, 1)
    )
    assert_close(fixed(x), expected, what="population LN statistics")


def _model(normalizer):
    return small_cnn((1, 8, 8), 10, normalizer, torch.Generator().manual_seed(0), channels=(4, 8),
                     hidden=16)  # fmt: skip


def test_sync_batch_norm_on_two_gloo_processes_trains_like_one_process_on_the_global_batch():
    """Each rank holds 3 of the 6 images; the statistics and the gradient are the 6 images',
    so after a few SGD steps the weights and running statistics equal one process's."""
    synced, single = _model("syncbn"), _model("bn")
    single.load_state_dict(synced.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(6, 1, 8, 8, generator=g), torch.randint(10, (6,), generator=g))
               for _ in range(4)]  # fmt: skip

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    optimizer = sgd(single)
    for x, y in batches:
        loss = nn.functional.cross_entropy(single(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trainer = GlooDataParallel(synced, sgd(synced), processes=2)
    try:
        for x, y in batches:
            loss = trainer(x, y)
            assert math.isfinite(float(loss))
    finally:
        trainer.close()
    trainer.close()  # idempotent
    expected = single.state_dict()
    for key, value in synced.state_dict().items():
        if value.is_floating_point():
            assert_close(value, expected[key], what=key)
        else:
            assert torch.equal(value, expected[key]), key
    assert not torch.distributed.is_initialized()


def test_an_abandoned_gloo_trial_is_closed_by_the_next_one():
    model = _model("syncbn")
    first = GlooDataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), processes=2)
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    first(x, y)
    workers = list(first._workers)
    second_model = _model("syncbn")
    second = GlooDataParallel(second_model, torch.optim.SGD(second_model.parameters(), lr=0.1), 2)
    try:
        second(x, y)  # closes the first trainer's ranks before starting its own
        assert all(not w.is_alive() for w in workers)
    finally:
        second.close()
        first.close()
    assert not torch.distributed.is_initialized()


def test_renorm_resumes_with_its_paired_batch_order(tmp_path, monkeypatch):
    """An exception inside a non-i.i.d. trial (batches from ``Setup.batch_order``), then a resume:
    the rows equal those of an uninterrupted run."""
    overrides = {"dataset": "digits", "micro_steps": "2", "noniid_steps": "12", "evaluations": "6"}
    run_experiment("renorm", "tiny", overrides, out=tmp_path / "whole", write_report=False)
    original, calls = renorm_module.Renorm.measure, {"n": 0}

    def failing(self, trial, *args):
        calls["n"] += trial.key == "noniid-brn/seed=0"
        if trial.key == "noniid-brn/seed=0" and calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, trial, *args)

    monkeypatch.setattr(renorm_module.Renorm, "measure", failing)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("renorm", "tiny", overrides, out=tmp_path / "cut", checkpoint_every_s=0)
    assert list((tmp_path / "cut" / CHECKPOINTS).glob("*.pt"))
    assert "noniid-brn/seed=0" not in RunRecord.load(tmp_path / "cut").finals()
    monkeypatch.setattr(renorm_module.Renorm, "measure", original)
    run_experiment("renorm", out=tmp_path / "cut", resume=True, write_report=False)
    assert rows_and_results(tmp_path / "cut") == rows_and_results(tmp_path / "whole")


def test_error_vs_batch_figure_gives_every_line_its_own_style():
    """Lines outside the normalizer family ("no normalization", BLN variants) must not take BN's
    colour and marker, or the figure cannot be read at a glance."""
    labels = ["no normalization", "BN", "LN", "BLN", "BLN without 1/√d_k", "SyncBN"]
    lines = {label: [(4, 10.0 + i), (128, 20.0 - i)] for i, label in enumerate(labels)}
    figure = error_vs_batch_figure(lines, "ours", published={"BN": [(32, 23.6)]})
    ours = figure.axes[0].get_lines()
    assert [line.get_label() for line in ours] == labels
    styles = {(str(line.get_color()), line.get_marker()) for line in ours}
    assert len(styles) == len(labels)
    assert figure.axes[0].get_xscale() == "log"
    # the same label has the same style in both panels
    (published,) = figure.axes[1].get_lines()
    bn = next(line for line in ours if line.get_label() == "BN")
    assert (published.get_color(), published.get_marker()) == (bn.get_color(), bn.get_marker())

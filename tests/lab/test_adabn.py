"""AdaBN in the domain-shift experiment, on shifts whose answer is known.

A shift that is an affine map of each feature before the first BatchNorm (x -> a x + b, a > 0) is
undone exactly by that layer once its statistics are the target domain's: the shifted mean is
a μ + b and the variance a² σ², so (a x + b - (a μ + b)) / (a σ) = (x - μ) / σ. With ε in the
denominator the equality holds up to ε / (a² σ²), far below the tolerances used here.
"""

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.lab.experiments.domain_shift import adapted, apply_shift, shift_cnn
from normkit.lab.population import error_rate


def _blobs(n, generator, dim=8):
    """Two Gaussian classes in ``dim`` dimensions, means ±1 along every axis, unit noise."""
    y = torch.randint(0, 2, (n,), generator=generator)
    x = (2.0 * y - 1).unsqueeze(1) + torch.randn(n, dim, generator=generator)
    return x, y


def _trained_classifier(generator):
    model = nn.Sequential(
        nn.Linear(8, 16, bias=False), nk.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = _blobs(4096, generator)
    for step in range(150):
        batch = slice(64 * (step % 64), 64 * (step % 64 + 1))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_adabn_recovers_the_accuracy_lost_to_a_known_affine_shift():
    generator = torch.Generator().manual_seed(0)
    model = _trained_classifier(generator)
    x_test, y_test = _blobs(2000, generator)
    x_pool, _ = _blobs(8192, generator)  # unlabeled target-domain data: the labels are dropped

    def shift(x):  # contrast × 4 and a bias of -6 on every feature: Wx -> 4 Wx - 6 W1
        return 4.0 * x - 6.0

    clean = error_rate(model, x_test, y_test)
    assert clean < 0.12  # the Bayes error of these blobs is Φ(-√8) ≈ 0.2%; a trained net is close
    shifted = error_rate(model, shift(x_test), y_test)
    assert shifted > clean + 0.25  # the training statistics no longer fit
    recovered = error_rate(adapted(model, shift(x_pool), 256)[0], shift(x_test), y_test)
    assert recovered <= clean + 0.01
    # The known answer: AdaBN on the shifted domain = AdaBN on the clean domain, output for output.
    on_clean = adapted(model, x_pool, 256)[0](x_test)
    on_shifted = adapted(model, shift(x_pool), 256)[0](shift(x_test))
    torch.testing.assert_close(on_shifted, on_clean, rtol=1e-4, atol=1e-4)


def test_adabn_undoes_intensity_scaling_in_the_experiments_cnn():
    """The experiment's own model and shift: conv (no bias) then BN, images scaled by 0.5."""
    torch.manual_seed(0)
    model = shift_cnn((1, 8, 8), (4, 8), 16, 10, "batch").eval()
    images = torch.rand(512, 1, 8, 8)
    x_pool, x_test = images[:384], images[384:]
    expected = adapted(model, x_pool, 128)[0](x_test)
    scaled = adapted(model, apply_shift(x_pool, "scale", 0), 128)[0](apply_shift(x_test, "scale", 1))
    torch.testing.assert_close(scaled, expected, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(model(apply_shift(x_test, "scale", 1)), model(x_test), atol=1e-2)


def test_adabn_changes_only_batch_norm_statistics():
    torch.manual_seed(0)
    model = shift_cnn((1, 8, 8), (4, 8), 16, 10, "batch_instance").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, layers = adapted(model, torch.rand(64, 1, 8, 8), 32)
    assert layers == ["norm_fc"]  # BIN's own statistics are not BatchNorm's
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a copy
    changed = {k for k, v in result.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"norm_fc.running_mean", "norm_fc.running_var", "norm_fc.num_batches_tracked"}


@pytest.mark.parametrize("shift", ["none", "invert", "noise", "scale", "style"])
def test_shifts_are_seeded_and_do_what_they_say(shift):
    x = torch.rand(200, 1, 8, 8)
    a, b = apply_shift(x, shift, 3), apply_shift(x, shift, 3)
    assert torch.equal(a, b) and a.shape == x.shape
    if shift == "invert":
        assert torch.equal(a, 1 - x)
    if shift == "scale":
        assert torch.allclose(a, 0.5 * x)
    if shift == "noise":
        assert (a - x).std().item() == pytest.approx(0.3, rel=0.05)
    if shift == "style":
        assert not torch.equal(a, apply_shift(x, shift, 4))


def test_the_style_shift_gives_each_image_its_own_style_and_never_flips_a_sign():
    """Issue 17: the style shift must be one a normalizer could remove, so each image's pixels go
    through an increasing map (contrast a > 0, brightness, gamma): their order is kept."""
    x = torch.rand(300, 1, 8, 8)
    styled = apply_shift(x, "style", 0).flatten(1)
    order = x.flatten(1).argsort(1)
    steps = styled.gather(1, order).diff(1)
    assert (steps >= 0).all() and (steps > 0).float().mean() > 0.99  # increasing within each image
    # every image changed, each in its own way: per-image contrast (std ratio) and brightness vary
    assert not torch.isclose(styled, x.flatten(1)).all(1).any()
    ratio = styled.std(1) / x.flatten(1).std(1)
    assert ratio.min() < 0.7 and ratio.max() > 1.3  # contrast from U(0.5, 1.5), gamma around it
    with pytest.raises(ValueError, match="mixed"):
        apply_shift(x, "mixed", 0)  # the old style shift inverted a quarter of the images


def test_unknown_shift_names_the_choices():
    with pytest.raises(ValueError, match="invert, noise, scale or style"):
        apply_shift(torch.rand(2, 1, 4, 4), "blur", 0)

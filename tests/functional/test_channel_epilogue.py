"""The compiled batch norm's per-channel steps in C (normkit.functional._channel_epilogue): the
statistics, the running update and the input gradient's coefficients from the plane sums against
float64 and against the ATen ops they replace; non-finite statistics reach the running buffers'
guard; buffers it cannot blend into are left to the caller."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close, make_input
from normkit.functional import _channel_epilogue, _plane_sums
from normkit.functional._batch_norm_compiled import sample_mean
from normkit.functional._moments import unbiased

pytestmark = pytest.mark.skipif(
    not (_channel_epilogue.available() and _plane_sums.built()),
    reason="no C compiler with OpenMP to build the per-channel steps",
)

SHAPES = [(2, 3, 5, 7), (4, 16, 9, 9), (3, 5, 130), (2, 7, 2, 3, 4)]


def _input(shape, channels_last, seed, shift=0.0, scale=2.0):
    x = make_input(shape, seed=seed, scale=scale, shift=shift)
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.5, 1000.0])
@pytest.mark.parametrize("affine", [True, False])
def test_statistics_and_coefficients_match_float64(shape, channels_last, offset, affine):
    """Mean, biased variance, 1/std, the scale w/std, the running update, sum(dy), sum(dy x_hat)
    and dx's coefficients within float32's tolerance of float64 (far from zero too: shifted
    sums)."""
    x = _input(shape, channels_last, seed=3, shift=offset)
    dy = _input(shape, channels_last, seed=4)
    c, dims, eps, momentum = shape[1], (0, *range(2, len(shape))), 1e-5, 0.1
    n = x.numel() // c
    weight = torch.rand(c, generator=torch.Generator().manual_seed(1)) + 0.5 if affine else None
    running_mean, running_var = torch.randn(c), torch.rand(c) + 0.5
    before = running_mean.clone(), running_var.clone()
    shift = sample_mean(x, dims).reshape(-1)
    s1, s2 = _plane_sums.shifted_sums(x, x, shift, shift)
    mean, var, invstd, scale, updated = _channel_epilogue.statistics(
        s1, s2, shift, weight, eps, n, running_mean, running_var, momentum
    )
    x64, w64 = x.double(), torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    mean64, var64 = x64.mean(dims), x64.var(dims, unbiased=False)
    invstd64 = (var64 + eps).rsqrt()
    assert updated
    for got, want, name in [
        (mean, mean64, "mean"), (var, var64, "variance"), (invstd, invstd64, "1/std"),
        (scale, w64 * invstd64, "scale"),
        (running_mean, 0.9 * before[0].double() + 0.1 * mean64, "running mean"),
        (running_var, 0.9 * before[1].double() + 0.1 * var64 * n / (n - 1), "running variance"),
    ]:  # fmt: skip
        assert got.dtype == torch.float32 and got.shape == (c,)
        assert_close(got, want, torch.float32, name)
    sg, sgx = _plane_sums.shifted_sums(dy, x, None, mean)
    sum_g, sum_gx_hat, A, B, D = _channel_epilogue.input_grad_coefficients(sg, sgx, weight, invstd, n)
    # the backward's x_hat is the saved float32 statistics' (as ATen's): x far from zero rounds
    # its mean by ~1000 ulp-of-1, which sum(dy) multiplies
    view, saved = (1, c, *[1] * (len(shape) - 2)), invstd.double()
    x_hat = (x64 - mean.double().view(view)) * saved.view(view)
    sum_g64, sum_gx_hat64 = dy.double().sum(dims), (dy.double() * x_hat).sum(dims)
    assert_close(sum_g, sum_g64, torch.float32, "sum(dy)")
    assert_close(sum_gx_hat, sum_gx_hat64, torch.float32, "sum(dy x_hat)")
    assert_close(A, w64 * saved, torch.float32, "A")
    assert_close(B, -w64 * saved**2 * sum_gx_hat64 / n, torch.float32, "B")
    assert_close(D, -w64 * saved * sum_g64 / n, torch.float32, "D")


def test_the_same_values_as_the_aten_ops_it_replaces():
    """What the compiled batch norm computed with ATen ops before: equal within a few float32
    rounding steps (the float64 sums over the samples are added in another order)."""
    x = _input((8, 24, 7, 5), True, seed=5, shift=3.0)
    dy = _input((8, 24, 7, 5), True, seed=6)
    weight, eps, n = torch.rand(24) + 0.5, 1e-3, x.numel() // 24
    shift = sample_mean(x, (0, 2, 3)).reshape(-1)
    s1, s2 = _plane_sums.shifted_sums(x, x, shift, shift)
    mean, var, invstd, scale, _ = _channel_epilogue.statistics(s1, s2, shift, weight, eps, n)
    t1, t2 = s1.sum(0), s2.sum(0)
    torch.testing.assert_close(mean, (shift.double() + t1 / n).float(), rtol=2e-7, atol=0)
    torch.testing.assert_close(var, ((t2 - t1 * t1 / n) / n).clamp_min(0).float(), rtol=2e-7, atol=0)
    torch.testing.assert_close(invstd, torch.rsqrt(var + eps), rtol=2e-7, atol=0)
    torch.testing.assert_close(scale, weight * invstd, rtol=2e-7, atol=0)
    sg, sgx = _plane_sums.shifted_sums(dy, x, None, mean)
    sum_g, sum_gx_hat, A, B, D = _channel_epilogue.input_grad_coefficients(sg, sgx, weight, invstd, n)
    g, gx = sg.sum(0).float(), sgx.sum(0).float() * invstd
    torch.testing.assert_close(sum_g, g, rtol=2e-7, atol=0)
    torch.testing.assert_close(sum_gx_hat, gx, rtol=2e-7, atol=0)
    torch.testing.assert_close(B, -scale * invstd * gx / n, rtol=1e-6, atol=0)
    torch.testing.assert_close(D, -scale * g / n, rtol=1e-6, atol=0)


def test_non_finite_statistics_reach_the_running_buffers_for_the_guard():
    """A NaN in a channel makes its variance, 1/std and running variance NaN (the running
    statistics' guard then refuses the update); the other channels are untouched by it."""
    x = _input((4, 3, 5, 5), False, seed=7)
    x[1, 2, 3, 4] = float("nan")
    shift = sample_mean(x, (0, 2, 3)).reshape(-1)
    s1, s2 = _plane_sums.shifted_sums(x, x, shift, shift)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    mean, var, invstd, _, _ = _channel_epilogue.statistics(
        s1, s2, shift, None, 1e-5, 100, running_mean, running_var, 0.1
    )
    for t in (mean, var, invstd, running_mean, running_var):
        assert t[2].isnan() and t[:2].isfinite().all()


@pytest.mark.parametrize("case", ["float64 buffers", "tensor momentum", "no buffers"])
def test_buffers_it_cannot_blend_into_are_left_to_the_caller(case):
    """float64 buffers and the cumulative average's tensor momentum are ATen's to blend
    (update_running_stats): the C step reports False and leaves them as they were."""
    x = _input((4, 3, 5, 5), True, seed=8)
    shift = sample_mean(x, (0, 2, 3)).reshape(-1)
    s1, s2 = _plane_sums.shifted_sums(x, x, shift, shift)
    dtype = torch.float64 if case == "float64 buffers" else torch.float32
    buffers = (torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype))
    momentum = torch.tensor(0.5) if case == "tensor momentum" else 0.1
    running = (None, None) if case == "no buffers" else buffers
    *_, updated = _channel_epilogue.statistics(s1, s2, shift, None, 1e-5, 100, *running, momentum)
    assert not updated
    assert torch.equal(buffers[0], torch.zeros(3, dtype=dtype))
    assert torch.equal(buffers[1], torch.ones(3, dtype=dtype))


def test_unbiased_matches_bessel():  # the correction the C step applies, as the torch path does
    var = torch.rand(5)
    torch.testing.assert_close(unbiased(var, 10), var * (10 / 9))


def test_a_forward_that_raises_after_the_running_update_leaves_the_buffers(monkeypatch):
    """The C step blends into the running statistics' guard's copies, never into the layer's
    buffers: a pass that fails after it (here the normalize pass) leaves every buffer and counter
    as it was, and the next step updates them."""
    import normkit as nk
    from normkit.functional import _batch_norm_compiled, _channel_pass

    monkeypatch.setattr(_batch_norm_compiled, "C_MIN_NUMEL", 0)  # a small input takes the C passes
    layer = nk.BatchNorm2d(16)
    x = _input((4, 16, 5, 5), True, seed=9, shift=2.0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    real, calls = _channel_pass.channel_pass, []

    def failing(*args):
        calls.append(args)
        raise MemoryError("no memory for the output")

    monkeypatch.setattr(_channel_pass, "channel_pass", failing)
    with nk.backend("compiled"), pytest.raises(MemoryError):
        layer(x)
    assert calls, "the C passes did not run"
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    monkeypatch.setattr(_channel_pass, "channel_pass", real)
    with nk.backend("compiled"):
        layer(x)
    assert int(layer.num_batches_tracked) == 1
    assert not torch.equal(layer.running_mean, before["running_mean"])

"""nk.tools.fold_batchnorm and the tensor-level fold functions.

The folded model is held to the float64 output of the original with the float32 tolerance of
tests/helpers.py (rtol = atol = 1e-5: the fold changes the order of a few multiplications per
element, so the folded float32 model is as close to float64 as the original float32 one).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from test_architectures import ARCHITECTURES, SharedNorm, build, exact, trained
from torch import nn

import normkit as nk
from helpers import assert_close
from normkit import reference
from normkit.errors import ConfigError
from normkit.tools import fold_batchnorm, fold_conv_bn_weights, fold_linear_bn_weights

# --- tensor level ------------------------------------------------------------------------------------


def _bn_state(channels, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = (torch.randn(channels, generator=g, dtype=torch.float64) * 2).to(dtype)
    var = (torch.rand(channels, generator=g, dtype=torch.float64) * 3 + 0.1).to(dtype)
    gamma = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    beta = torch.randn(channels, generator=g, dtype=torch.float64).to(dtype)
    return mean, var, gamma, beta


def test_fold_conv_weights_match_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    mean, var, gamma, beta = _bn_state(6, torch.float64)
    w, b = fold_conv_bn_weights(weight, bias, mean, var, 1e-3, gamma, beta)
    w_ref, b_ref = reference.fold_batch_norm(weight, bias, mean, var, gamma, beta, 1e-3)
    np.testing.assert_allclose(w.detach().numpy(), w_ref, rtol=1e-14)
    np.testing.assert_allclose(b.detach().numpy(), b_ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_fold_keeps_dtype_and_requires_grad(dtype, requires_grad):
    weight = torch.randn(4, 2, 3, 3).to(dtype).requires_grad_(requires_grad)
    mean, var, gamma, beta = _bn_state(4, dtype)
    w, b = fold_conv_bn_weights(weight, None, mean, var, 1e-5, gamma, beta)
    assert isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter)
    assert w.dtype == dtype and b.dtype == dtype
    assert w.requires_grad == requires_grad and b.requires_grad == requires_grad
    # correctly rounded: the float64 result rounded once to the half/float type
    w64, b64 = reference.fold_batch_norm(
        *(t.detach().double() for t in (weight,)), None,
        *(t.double() for t in (mean, var, gamma, beta)), 1e-5,
    )  # fmt: skip
    assert torch.equal(w.detach(), torch.from_numpy(w64).to(dtype))
    assert torch.equal(b.detach(), torch.from_numpy(b64).to(dtype))


def test_fold_without_affine_and_without_bias():
    """gamma/beta None (affine=False) are 1 and 0; a missing conv bias is a zero bias."""
    weight = torch.randn(4, 2, 1, 1, dtype=torch.float64)
    mean, var, _, _ = _bn_state(4, torch.float64)
    w, b = fold_conv_bn_weights(weight, None, mean, var, 1e-5, None, None)
    scale = 1 / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(w.detach(), weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(b.detach(), -mean * scale)


def test_fold_checks_the_channel_count():
    mean, var, gamma, beta = _bn_state(5)
    with pytest.raises(ConfigError, match="5"):
        fold_conv_bn_weights(torch.randn(4, 2, 3, 3), None, mean, var, 1e-5, gamma, beta)


def _conv(dims, transposed):
    name = ("ConvTranspose" if transposed else "Conv") + f"{dims}d"
    return getattr(nn, name)


@given(
    dims=st.sampled_from([1, 2, 3]),
    transposed=st.booleans(),
    groups=st.sampled_from([1, 2, 4]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    bias=st.booleans(),
)
def test_fold_conv_equals_conv_then_batch_norm(
    dims, transposed, groups, per_group_in, per_group_out, kernel, stride, bias
):
    """Every conv and transposed conv, grouped (depthwise when one channel per group), with and
    without bias, in float64: folded conv == conv followed by eval-mode BN to 1e-12."""
    c_in, c_out = groups * per_group_in, groups * per_group_out
    conv = _conv(dims, transposed)(c_in, c_out, kernel, stride, groups=groups, bias=bias).double()
    mean, var, gamma, beta = _bn_state(c_out, torch.float64, seed=c_out + kernel)
    x = torch.randn(2, c_in, *([5] * dims), dtype=torch.float64)
    with torch.no_grad():
        expected = F.batch_norm(conv(x), mean, var, gamma, beta, False, 0.0, 1e-5)
        w, b = fold_conv_bn_weights(
            conv.weight, conv.bias, mean, var, 1e-5, gamma, beta,
            transposed=transposed, groups=groups,
        )  # fmt: skip
        conv.weight, conv.bias = w, b
        torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_fold_linear_equals_linear_then_batch_norm():
    linear = nn.Linear(5, 7).double()
    mean, var, gamma, beta = _bn_state(7, torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = F.batch_norm(linear(x), mean, var, gamma, beta, False, 0.0, 1e-5)
        w, b = fold_linear_bn_weights(linear.weight, linear.bias, mean, var, 1e-5, gamma, beta)
        torch.testing.assert_close(F.linear(x, w, b), expected, rtol=1e-12, atol=1e-12)


# --- model level: the architectures ------------------------------------------------------------------

# (BatchNorm calls folded, calls left) for each architecture, with example inputs.
EXPECTED = {
    "resnet": (6, 0),
    "mobilenet": (6, 0),
    "decoder": (2, 0),
    "mlp": (2, 0),
    "shared_norm": (2, 0),
    "bn_after_relu": (0, 1),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_folded_architecture_equals_the_original(name):
    model, x = build(name)
    before = copy.deepcopy(model.state_dict())
    folded, report = fold_batchnorm(model, x)
    assert (len(report.folded), len(report.left)) == EXPECTED[name], str(report)
    assert report.traced
    with torch.no_grad():
        assert_close(folded(x), exact(model, x), torch.float32, what=name)
    assert report.max_relative_error <= 1e-5
    if report.folded:
        assert report.modules_after < report.modules_before
    if not report.left:  # every BatchNorm is gone from the folded model
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    # the user's model is untouched
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_residual_block_pairs_follow_the_data_flow():
    model, x = build("resnet")
    _, report = fold_batchnorm(model, x)
    pairs = {(f.norm, f.into) for f in report.folded}
    assert pairs == {
        ("1", "0"),
        ("3.bn1", "3.conv1"),
        ("3.bn2", "3.conv2"),
        ("4.bn1", "4.conv1"),
        ("4.bn2", "4.conv2"),
        ("4.shortcut.1", "4.shortcut.0"),
    }


def test_bn_after_relu_is_left_with_the_reason():
    model, x = build("bn_after_relu")
    folded, report = fold_batchnorm(model, x)
    (left,) = report.left
    assert left.norm == "2" and "ReLU" in left.reason
    assert report.modules_after == report.modules_before
    with torch.no_grad():
        assert_close(folded(x), exact(model, x), torch.float32)


def test_a_norm_reused_after_two_layers_is_folded_into_both():
    model, x = build("shared_norm")
    folded, report = fold_batchnorm(model, x)
    assert {(f.norm, f.into) for f in report.folded} == {("bn", "conv1"), ("bn", "conv2")}
    assert not any(key.startswith("bn.") for key in folded.state_dict())
    with torch.no_grad():
        assert_close(folded(x), exact(model, x), torch.float32)


def test_mlp_needs_example_inputs_to_fold_a_linear():
    model, x = build("mlp")
    folded, report = fold_batchnorm(model)
    assert not report.folded and len(report.left) == 2
    assert all("example_inputs" in item.reason for item in report.left)


class LinearOnSequence(nn.Module):
    """Linear over the last dim of (N, L, F) then BatchNorm1d(L): dim 1 is not the Linear's output."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.linear(x))


def test_linear_on_a_sequence_is_not_folded():
    model = trained(LinearOnSequence(), (4, 6, 6))
    x = torch.randn(4, 6, 6)
    folded, report = fold_batchnorm(model, x)
    (left,) = report.left
    assert "dim 1" in left.reason
    with torch.no_grad():
        assert_close(folded(x), exact(model, x), torch.float32)


class SharedProducer(nn.Module):
    """The conv's output feeds the BN and the residual add: the conv must keep its output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


@pytest.mark.parametrize(
    "model_cls, words", [(SharedProducer, "also feeds"), (ConvCalledTwice, "called 2 times")]
)
def test_shared_producers_are_left(model_cls, words):
    model = trained(model_cls(), (4, 4, 6, 6))
    x = torch.randn(4, 4, 6, 6)
    folded, report = fold_batchnorm(model, x)
    assert not report.folded
    assert words in report.left[0].reason
    with torch.no_grad():
        assert_close(folded(x), exact(model, x), torch.float32)


def test_tied_weights_are_left():
    model = trained(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 6)), (8, 6))
    model[2].weight = model[0].weight
    _, report = fold_batchnorm(model, torch.randn(8, 6))
    assert not report.folded and "shared with" in report.left[0].reason


def test_training_mode_and_untracked_batch_norm_are_left():
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (4, 3, 6, 6))
    model.train()
    model[0].eval()  # modes are kept as they are, in the model and in the folded copy
    folded, report = fold_batchnorm(model)
    assert "training mode" in report.left[0].reason
    assert folded.training and folded.get_submodule("1").training
    assert not folded.get_submodule("0").training and not model[0].training
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    _, report = fold_batchnorm(untracked.eval())
    assert "track_running_stats=False" in report.left[0].reason


class LoggingBatchNorm(nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input) * 2


def test_a_subclass_that_overrides_forward_is_left():
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), LoggingBatchNorm(4)), (4, 3, 6, 6))
    _, report = fold_batchnorm(model)
    assert "overrides forward" in report.left[0].reason


class FrozenBatchNorm2d(nn.Module):
    """torchvision's frozen BN, as other libraries write it: γ, β and statistics as buffers."""

    def __init__(self, n):
        super().__init__()
        g = torch.Generator().manual_seed(n)
        self.register_buffer("weight", torch.rand(n, generator=g) + 0.5)
        self.register_buffer("bias", torch.randn(n, generator=g))
        self.register_buffer("running_mean", torch.randn(n, generator=g))
        self.register_buffer("running_var", torch.rand(n, generator=g) + 0.5)
        self.eps = 1e-5

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def test_frozen_batch_norm_look_alike_folds_in_any_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)).train()
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold_batchnorm(model, x)
    assert [(f.norm, f.into) for f in report.folded] == [("1", "0")]
    with torch.no_grad():
        assert_close(folded(x), exact(model, x), torch.float32)


@pytest.mark.parametrize(
    "name", ["FrozenBatchNorm", "BatchRenorm2d", "GhostBatchNorm", "SyncBatchNorm"]
)
def test_normkit_batch_norm_family_folds(name):
    """normkit's frozen BN, and Batch Renorm, Ghost BN and SyncBatchNorm (BN in eval mode)."""
    cls = getattr(nk, name, None)
    if cls is None:
        pytest.skip(f"nk.{name} is not in this tree")
    norm = cls(4)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(4))
        norm.running_var.copy_(torch.rand(4) + 0.5)
        norm.weight.copy_(torch.rand(4) + 0.5)
        norm.bias.copy_(torch.randn(4))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm).eval()
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold_batchnorm(model, x)
    assert len(report.folded) == 1, str(report)
    with torch.no_grad():
        assert_close(folded(x), exact(model, x), torch.float32)


@pytest.mark.parametrize(
    "layers, shape",
    [
        ((nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (4, 3, 9)),
        ((nn.ConvTranspose1d(4, 6, 3, groups=2, bias=False), nk.BatchNorm1d(6)), (4, 4, 5)),
        ((nn.Conv3d(3, 4, 3, padding=1), nk.BatchNorm3d(4)), (2, 3, 4, 4, 4)),
        ((nn.ConvTranspose3d(3, 4, 2, stride=2), nn.BatchNorm3d(4, affine=False)), (2, 3, 3, 3, 3)),
        ((nn.Linear(5, 6), nk.BatchNorm(6, eps=1e-3)), (8, 5)),
    ],
    ids=["conv1d", "convtranspose1d_grouped", "conv3d", "convtranspose3d_not_affine", "linear"],
)
def test_every_layer_kind_folds_in_a_model(layers, shape):
    model = trained(nn.Sequential(*layers, nn.ReLU()), shape)
    x = torch.randn(shape) * 2 + 0.5
    folded, report = fold_batchnorm(model, x)
    assert [(f.norm, f.into) for f in report.folded] == [("1", "0")], str(report)
    with torch.no_grad():
        assert_close(folded(x), exact(model, x), torch.float32)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "decoder"])
def test_channels_last_input(name):
    model, x = build(name)
    x = x.to(memory_format=torch.channels_last)
    folded, _ = fold_batchnorm(model.to(memory_format=torch.channels_last), x)
    with torch.no_grad():
        assert_close(folded(x), exact(model, x.contiguous()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "decoder"])
def test_half_precision_folds_as_accurately_as_the_original(name, dtype):
    """In half precision both the original and the folded model round at every layer; the folded
    one (weights rounded once from float64) must be no less accurate than the original, measured
    against float64: its normwise error at most twice the original's (a margin for the other
    rounding order), and within 8 units of the half type's roundoff of the output's scale."""
    model, x = build(name)
    reference_output = exact(model, x)
    half = copy.deepcopy(model).to(dtype)
    folded, _ = fold_batchnorm(half)
    assert all(p.dtype == dtype for p in folded.parameters())
    with torch.no_grad():
        y_half = half(x.to(dtype)).double()
        y_folded = folded(x.to(dtype)).double()
    scale = reference_output.abs().max().item()
    error_half = (y_half - reference_output).abs().max().item()
    error_folded = (y_folded - reference_output).abs().max().item()
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert error_folded <= max(2 * error_half, 8 * unit * scale), (error_folded, error_half)


def test_inplace_folds_into_the_models_own_layers():
    model, x = build("resnet")
    expected = exact(model, x)
    conv = model[0]
    weight_before = conv.weight.detach().clone()
    folded, _ = fold_batchnorm(model, x, inplace=True)
    assert folded.get_submodule("0") is conv
    assert not torch.equal(conv.weight, weight_before)
    with torch.no_grad():
        assert_close(folded(x), expected, torch.float32)


class Untraceable(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.features(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn(self.conv(y))


def test_untraceable_model_folds_sequential_neighbours_only():
    model = trained(Untraceable(), (4, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    folded, report = fold_batchnorm(model, x)
    assert not report.traced and "TraceError" in report.trace_error
    assert [(f.norm, f.into) for f in report.folded] == [("features.1", "features.0")]
    assert [item.norm for item in report.left] == ["bn"]
    assert "not inside an nn.Sequential" in report.left[0].reason
    assert isinstance(folded.features[1], nn.Identity) and isinstance(
        model.features[1], nn.BatchNorm2d
    )
    with torch.no_grad():
        assert_close(folded(x), exact(model, x), torch.float32)


def test_fold_rejects_what_is_not_a_model():
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        fold_batchnorm("resnet")


def test_nk_tools_is_available_lazily():
    assert nk.tools.fold_batchnorm is fold_batchnorm
    _ = SharedNorm  # the architecture module is importable from here (used by other tool tests)

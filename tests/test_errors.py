"""Bad input: every error names the problem and the fix, and leaves the layer's state untouched."""

import pytest
import torch

import normkit as nk
from normkit.errors import (
    BackendError,
    BatchTooSmallError,
    ChannelMismatchError,
    ConfigError,
    DtypeError,
    NormkitError,
    ShapeError,
)

# (description, call, error type, fragments that must appear in the message)
CONSTRUCTION_ERRORS = [
    ("eps zero", lambda: nk.BatchNorm2d(3, eps=0), ConfigError, ["eps must be > 0", "NaN"]),
    ("eps negative", lambda: nk.LayerNorm(4, eps=-1e-5), ConfigError, ["eps must be > 0"]),
    ("eps nan", lambda: nk.GroupNorm(1, 4, eps=float("nan")), ConfigError, ["eps"]),
    ("groups", lambda: nk.GroupNorm(4, 6), ConfigError, ["divisible", "[1, 2, 3, 6]"]),
    ("zero groups", lambda: nk.GroupNorm(0, 6), ConfigError, ["num_groups"]),
    ("zero features", lambda: nk.BatchNorm1d(0), ConfigError, ["num_features"]),
    ("float features", lambda: nk.InstanceNorm2d(2.5), ConfigError, ["num_features"]),
    ("momentum > 1", lambda: nk.BatchNorm2d(3, momentum=1.5), ConfigError, ["[0, 1]", "decay="]),
    ("policy", lambda: nk.BatchNorm2d(3, on_nonfinite="ignore"), ConfigError, ["on_nonfinite"]),
    ("decay range", lambda: nk.BatchNorm2d(3, decay=2.0), ConfigError, ["decay"]),
    ("ln2d channels", lambda: nk.LayerNorm2d(0), ConfigError, ["num_channels"]),
]


@pytest.mark.parametrize(
    ("call", "error", "fragments"),
    [pytest.param(c, e, f, id=d) for d, c, e, f in CONSTRUCTION_ERRORS],
)
def test_construction_errors(call, error, fragments):
    with pytest.raises(error) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, (ValueError, TypeError))


# (description, layer, input, error type, fragments)
CALL_ERRORS = [
    (
        "batch of one per channel",
        lambda: nk.BatchNorm1d(4),
        torch.randn(1, 4),
        BatchTooSmallError,
        ["BatchNorm1d(4", "more than one value per channel", "(1, 4)", ".eval()", "GroupNorm"],
    ),
    (
        "1x1 map batch of one",
        lambda: nk.BatchNorm2d(4),
        torch.randn(1, 4, 1, 1),
        BatchTooSmallError,
        ["spatial dims (1, 1)", "at least 2"],
    ),
    (
        "channel mismatch",
        lambda: nk.BatchNorm2d(3),
        torch.randn(2, 5, 4, 4),
        ChannelMismatchError,
        ["BatchNorm2d(3", "3", "has 5", "(2, 5, 4, 4)"],
    ),
    (
        "wrong rank",
        lambda: nk.BatchNorm2d(3),
        torch.randn(2, 3, 4),
        ShapeError,
        ["4-D input (N, C, H, W)", "3-D", "(2, 3, 4)", "nk.BatchNorm"],
    ),
    (
        "integer input",
        lambda: nk.BatchNorm2d(3),
        torch.randint(0, 5, (2, 3, 4, 4)),
        DtypeError,
        ["torch.int64", "floating-point", ".float()"],
    ),
    (
        "bool input",
        lambda: nk.LayerNorm(4),
        torch.ones(2, 4, dtype=torch.bool),
        DtypeError,
        ["bool"],
    ),
    (
        "layer norm shape",
        lambda: nk.LayerNorm([4, 5]),
        torch.randn(2, 4, 6),
        ShapeError,
        ["normalized_shape=(4, 5)", "(2, 4, 6)", "normalized_shape=(4, 6)"],
    ),
    (
        "group norm channels",
        lambda: nk.GroupNorm(2, 4),
        torch.randn(2, 6, 3),
        ChannelMismatchError,
        ["GroupNorm(2, 4", "num_channels=4", "has 6"],
    ),
    (
        "instance norm 1x1",
        lambda: nk.InstanceNorm2d(3),
        torch.randn(2, 3, 1, 1),
        BatchTooSmallError,
        ["one spatial element", "(2, 3, 1, 1)"],
    ),
    (
        "instance norm channels",
        lambda: nk.InstanceNorm1d(3, affine=True),
        torch.randn(2, 4, 5),
        ChannelMismatchError,
        ["has 4"],
    ),
    (
        "layer norm 2d channels",
        lambda: nk.LayerNorm2d(3),
        torch.randn(2, 4, 5, 5),
        ChannelMismatchError,
        ["LayerNorm2d(3", "num_channels=3", "has 4"],
    ),
    (
        "batch norm rank 1",
        lambda: nk.BatchNorm(3),
        torch.randn(3),
        ShapeError,
        ["(N, C, *)", "1-D"],
    ),
]


@pytest.mark.parametrize(
    ("make", "x", "error", "fragments"),
    [pytest.param(m, x, e, f, id=d) for d, m, x, e, f in CALL_ERRORS],
)
def test_call_errors_leave_state_untouched(make, x, error, fragments, backend):
    layer = make()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error) as info:
        layer(x)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, NormkitError)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed although the call failed"


def test_functional_errors():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ConfigError, match="training=False .* running_mean"):
        nk.functional.batch_norm(x, None, None, training=False)
    with pytest.raises(ChannelMismatchError, match="weight has 2 elements"):
        nk.functional.batch_norm(x, None, None, torch.ones(2), training=True)
    with pytest.raises(ConfigError, match="momentum=None"):
        nk.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None)
    with pytest.raises(ConfigError, match="eps"):
        nk.functional.layer_norm(x, (2,), eps=0.0)


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(BackendError, match=r"unknown backend 'cuda'.*'native'.*'reference'"):
        nk.set_backend("cuda")
    with pytest.raises(BackendError), nk.backend("fast"):
        pass


def test_errors_are_value_or_type_errors():
    """Code written against torch.nn that catches ValueError keeps catching normkit's errors."""
    with pytest.raises(ValueError):
        nk.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(TypeError):
        nk.BatchNorm1d(3)(torch.ones(2, 3, dtype=torch.int32))

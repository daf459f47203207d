"""State under failure (issue 22, items 4-5): a forward that raises leaves every buffer and parameter
as it was; an empty batch is no failure; the non-finite guard computes, checks, then commits, so no
reader ever sees a statistic it refuses; and every layer words the same failure the same way."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from test_transform_matrix import examples
from torch import nn

import normkit as nk
from helpers import randomize_parameters
from normkit.errors import (
    BatchTooSmallError,
    ChannelMismatchError,
    DeviceError,
    DtypeError,
    NormkitError,
    ShapeError,
)
from normkit.functional import _dispatch

# Every public layer configuration with running statistics (the transform matrix's examples).
STATEFUL = [e for e in examples() if getattr(e.build(), "running_mean", None) is not None]


def _full_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict plus non-persistent buffers (num_batches_skipped, renorm_step)."""
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    state.update({f"buffer:{k}": v.detach().clone() for k, v in layer.named_buffers()})
    return state


def _assert_unchanged(layer, before, what):
    after = _full_state(layer)
    assert after.keys() == before.keys(), what
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{what}: {key} changed although the call failed"


def _failures(example):
    """(name, input, expected error) for each way an input can be wrong for this layer."""
    shape = example.shape
    wrong_channels = (shape[0], shape[1] + 1, *shape[2:])
    return [
        ("dtype", torch.randn(shape, dtype=torch.float64), DtypeError),
        ("integer", torch.ones(shape, dtype=torch.long), DtypeError),
        ("device", torch.empty(shape, device="meta"), DeviceError),
        ("channels", torch.randn(wrong_channels), ChannelMismatchError),
        (
            "one value per channel",
            torch.randn(1, shape[1], *([1] * (len(shape) - 2))),
            BatchTooSmallError,
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("example", STATEFUL, ids=str)
def test_a_forward_that_raises_leaves_the_state_as_it_was(example, training):
    """Compared on the whole state_dict (and the non-persistent buffers); the gate of
    Batch-Instance starts outside [0, 1], where a training forward would project it."""
    for name, x, error in _failures(example):
        layer = example.make(training)
        if isinstance(layer, nk.BatchInstanceNorm):
            with torch.no_grad():
                layer.rho[0] = 1.5
        if name == "one value per channel" and (
            not training or isinstance(layer, (nk.FrozenBatchNorm, nk.BatchLayerNorm))
        ):
            continue  # the running statistics normalize, or BLN's batch part is 0: no failure
        before = _full_state(layer)
        with pytest.raises(error) as info:
            layer(x)
        assert isinstance(info.value, NormkitError), f"{name}: {info.value!r}"
        assert type(layer).__name__ in str(info.value), f"{name}: the error names the layer"
        _assert_unchanged(layer, before, name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("example", STATEFUL, ids=str)
def test_an_empty_batch_gives_an_empty_output_and_changes_nothing(example, training):
    """Every layer: an empty output connected to the parameters, no state change (three layers
    raised torch's raw RuntimeError here)."""
    layer = example.make(training)
    before = _full_state(layer)
    x = torch.randn(0, *example.shape[1:], requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    _assert_unchanged(layer, before, "empty batch")


def test_dtype_errors_are_worded_one_way():
    """The same mismatch, the same sentence, from every layer (with parameters or buffers) and the
    functional forms; torch raises "mixed dtype" here, normkit's layers did it three ways."""
    wording = "has dtype torch.float32, but the input has dtype torch.float64"
    for example in examples():
        layer = example.make(True)
        x = torch.randn(example.shape, dtype=torch.float64)
        state = [*layer.parameters(), *layer.buffers()]
        if not any(t.is_floating_point() for t in state):
            assert layer(x).dtype == torch.float64  # nothing to disagree with
            continue
        if isinstance(layer, nn.RMSNorm):  # no failure: torch.nn.RMSNorm computes a float64
            # input with a float32 weight (in float64), and the exact drop-in does the same
            assert torch.equal(layer(x), nn.RMSNorm.forward(layer, x))
            continue
        with pytest.raises(DtypeError, match=wording):
            layer(x)
    with pytest.raises(DtypeError, match=wording):
        nk.functional.layer_norm(torch.randn(2, 3, dtype=torch.float64), (3,), torch.ones(3))


def test_integer_inputs_are_worded_one_way():
    for example in examples():
        layer = example.make(True)
        with pytest.raises(DtypeError, match="input has dtype torch.int64, but normalization"):
            layer(torch.ones(example.shape, dtype=torch.long))


def test_half_inputs_into_float32_layers_are_allowed():
    """Mixed precision: a float16/bfloat16 input into float32 parameters and buffers, as ATen
    allows (the dtype check does not forbid it)."""
    for example in STATEFUL:
        layer = example.make(True)
        y = layer(torch.randn(example.shape).to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


# --- the non-finite guard: compute, check, then commit ----------------------------------------------


class Spy:
    """A backend implementation of batch_norm that records the layer's live buffers at the moment
    the batch's statistics have been written, i.e. what another thread would read then."""

    def __init__(self, layer):
        self.layer, self.seen = layer, []

    def __call__(self, input, running_mean, running_var, *args):
        y = _dispatch.implementations("batch_norm")["native"].fn(
            input, running_mean, running_var, *args
        )
        self.seen.append(self.layer.running_var.clone())
        return y


@pytest.mark.parametrize("policy", ["skip", "warn", "raise"])
def test_no_reader_sees_a_refused_statistic(policy):
    """While the guard has a NaN batch in hand, the layer's buffers still hold the old values:
    the statistics are computed into copies and committed only once checked (on today's code the
    CPU guard wrote the buffers, then restored them)."""
    layer = nk.BatchNorm2d(3, on_nonfinite=policy)
    randomize_parameters(layer)
    spy = Spy(layer)
    _dispatch.register("batch_norm", "spy", spy)
    try:
        x = torch.randn(4, 3, 2, 2)
        x[0, 1, 0, 0] = float("nan")
        before = layer.running_var.clone()
        warns = pytest.warns(RuntimeWarning) if policy == "warn" else contextlib.nullcontext()
        with nk.backend("spy"), warns:
            if policy == "raise":
                with pytest.raises(nk.errors.NonFiniteStatisticsError):
                    layer(x)
            else:
                layer(x)
    finally:
        _dispatch.unregister("batch_norm", "spy")
    assert spy.seen, "the spy backend was not used"
    for seen in spy.seen:
        assert torch.equal(seen, before), "a reader saw the statistics before the check"
    assert torch.equal(layer.running_var, before)


def test_a_reading_thread_never_sees_nan():
    """The user-level view: an evaluation thread reading the buffers while training runs NaN and
    good batches through the layer sees only finite values."""
    layer = nk.BatchNorm2d(8)
    stop, seen_nan = threading.Event(), []

    def read():
        while not stop.is_set():
            if not torch.isfinite(layer.running_var).all():
                seen_nan.append(True)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        bad = torch.randn(16, 8, 4, 4)
        bad[0, 3] = float("nan")
        for _ in range(200):
            layer(bad)
            layer(torch.randn(16, 8, 4, 4))
    finally:
        stop.set()
        reader.join()
    assert not seen_nan
    assert int(layer.num_batches_skipped) == 200


# --- errors subclass what torch raises ----------------------------------------------------------------


def test_shape_errors_are_also_runtime_errors():
    """torch's kernels raise RuntimeError for a channel count that does not fit the running
    statistics ("running_mean should contain 5 elements not 4") and for LayerNorm's
    normalized_shape; `except RuntimeError` code keeps working (issue 20, item 9)."""
    cases = [
        (nk.BatchNorm2d(4), torch.randn(2, 5, 3, 3), nn.BatchNorm2d(4)),
        (nk.GroupNorm(2, 4), torch.randn(2, 6, 3), nn.GroupNorm(2, 4)),
        (nk.LayerNorm(4), torch.randn(2, 5), nn.LayerNorm(4)),
    ]
    for ours, x, theirs in cases:
        with pytest.raises(RuntimeError):
            theirs(x)
        with pytest.raises(RuntimeError) as info:
            ours(x)
        assert isinstance(info.value, ShapeError) and isinstance(info.value, ValueError)
    with pytest.raises(RuntimeError):
        nk.BatchNorm2d(4)(torch.randn(2, 4, 3, 3, dtype=torch.float64))  # torch: mixed dtype


def test_randomized_state_is_used():
    """The examples' state is away from the defaults (else the comparisons above prove little)."""
    for example in STATEFUL:
        layer = example.make(True)
        assert not torch.equal(layer.running_var, torch.ones_like(layer.running_var)), example

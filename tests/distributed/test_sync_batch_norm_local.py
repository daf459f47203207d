"""SyncBatchNorm's pieces that need no second process: Chan's merge, the backward formula, the
header checks, conversions both ways, and the layer without a process group (= BatchNorm)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normkit as nk
from helpers import CASES, assert_close, make_input, randomize_parameters, run_steps
from normkit import reference
from normkit.distributed import (
    RankMismatchError,
    _sync_batch_norm,
    local_moments,
    merge_moments,
    synchronized_batch_norm,
    to_batch_norm,
    to_sync_batch_norm,
)
from normkit.distributed import _collectives as wire
from normkit.errors import (
    BatchTooSmallError,
    ChannelMismatchError,
    ConfigError,
    DtypeError,
    ShapeError,
)

# --- Chan's merge -------------------------------------------------------------------------------------


def _parts(sizes, channels, offset, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), channels, 3, generator=generator, dtype=torch.float64) + offset
    x = x.to(dtype)
    bounds = np.cumsum([0, *sizes])
    return x, [x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _merged(parts):
    stats = [local_moments(p) for p in parts]
    counts = torch.tensor([float(n) for n, _, _ in stats], dtype=torch.float64)
    means = torch.stack([m.double() for _, m, _ in stats])
    m2s = torch.stack([s.double() for _, _, s in stats])
    return merge_moments(counts, means, m2s), stats


@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=6).filter(lambda s: sum(s) >= 2),
    channels=st.integers(1, 4),
    offset=st.sampled_from([0.0, 1e4, -1e5]),
    seed=st.integers(0, 2**16),
)
def test_merge_equals_the_moments_of_the_concatenation(sizes, channels, offset, seed):
    """Any split into parts, empty parts included, and means far from zero (where E[x^2] - E[x]^2
    would lose every digit): the merge equals var_mean of the concatenation, and the paper's
    pairwise form (reference.chan_merge), to float64 accuracy. (Each part's mean is rounded once,
    a relative error of about |mean|/std x u in the variance, see the float32 test below: 1e-11
    at the largest offset here.)"""
    x, parts = _parts(sizes, channels, offset, torch.float64, seed)
    (n, mean, var), stats = _merged(parts)
    expected_var, expected_mean = torch.var_mean(x, dim=(0, 2), correction=0)
    assert int(n) == x.numel() // channels
    assert_close(mean, expected_mean, torch.float64, "mean")
    assert_close(var, expected_var, torch.float64, "var")
    count, ref_mean, ref_m2 = reference.chan_merge([(k, m.numpy(), s.numpy()) for k, m, s in stats])
    assert count == int(n)
    assert_close(mean, torch.from_numpy(ref_mean), torch.float64, "mean vs reference")
    assert_close(var, torch.from_numpy(ref_m2 / count), torch.float64, "var vs reference")


@pytest.mark.parametrize("ratio", [1e2, 1e4])
def test_merge_of_float32_parts_far_from_zero(ratio):
    """float32 inputs with |mean| / std = ``ratio``. Each rank's moments are centred (Welford) and
    the merge runs in float64; what is left is each part's mean rounded once to float32, an
    absolute error of |mean| 2^-24 entering the between-parts sum linearly: a relative error of
    the variance of about ratio x 2^-24 (0.2-0.5 times that observed; bound: 2 times). At ratio
    1e2 that is within the float32 tolerance; at 1e4 the naive E[x^2] - E[x]^2 in float32 on the
    same data is wrong in the first digit."""
    x, parts = _parts((3, 0, 5, 1, 7), 2, ratio, torch.float32, seed=3)
    (_, mean, var), _ = _merged(parts)
    expected_var, expected_mean = torch.var_mean(x.double(), dim=(0, 2), correction=0)
    assert_close(mean, expected_mean, torch.float32, "mean")
    relative = ((var - expected_var).abs() / expected_var).max().item()
    assert relative <= 2 * ratio * 2.0**-24, relative
    if ratio <= 1e2:
        assert_close(var, expected_var, torch.float32, "var")
    naive = (x * x).mean((0, 2)) - x.mean((0, 2)) ** 2
    if ratio >= 1e4:
        assert (naive.double() - expected_var).abs().max() > 0.1 * expected_var.max()


def test_merge_of_only_empty_parts_is_nan():
    """No values on any rank: 0/0. The layer turns this into "no update" (see the layer docs)."""
    _, mean, var = merge_moments(
        torch.zeros(3, dtype=torch.float64),
        torch.zeros(3, 2, dtype=torch.float64),
        torch.zeros(3, 2, dtype=torch.float64),
    )
    assert torch.isnan(mean).all() and torch.isnan(var).all()


def test_local_moments_of_an_empty_rank_are_zero():
    n, mean, m2 = local_moments(torch.empty(0, 3, 4, dtype=torch.bfloat16))
    assert n == 0 and mean.dtype == torch.float32
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(m2, torch.zeros(3))


# --- The backward formula (one rank: its sums are the global sums) ------------------------------------


@given(
    shape=st.tuples(st.integers(2, 5), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    channels_last=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sync_backward_formula_is_batch_norm_backward(shape, channels_last, affine, seed):
    """With the global sums standing in for the all-reduce, _SyncNormalize's forward and backward
    are single-process BN's, for random shapes and layouts (float64, against nk.BatchNorm)."""
    x = make_input(shape, torch.float64, channels_last, seed=seed)
    dy = make_input(shape, torch.float64, channels_last, seed=seed + 1, shift=0.0, scale=1.0)
    w = torch.randn(shape[1], dtype=torch.float64).requires_grad_(affine) if affine else None
    b = torch.randn(shape[1], dtype=torch.float64).requires_grad_(affine) if affine else None
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    n = torch.tensor(float(x.numel() // shape[1]), dtype=torch.float64)
    original = wire.all_reduce_sum
    wire.all_reduce_sum = lambda values, group, timeout, what: values  # a world of one
    try:
        leaf = x.clone().requires_grad_(True)
        args = (mean, var, n, 1e-5, None, None, "test")
        y = _sync_batch_norm._SyncNormalize.apply(leaf, w, b, *args)
        y.backward(dy)
    finally:
        wire.all_reduce_sum = original
    bn = nk.BatchNorm(shape[1], affine=affine, track_running_stats=False).double()
    if affine:
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    ref_leaf = x.clone().requires_grad_(True)
    y_ref = bn(ref_leaf)
    y_ref.backward(dy)
    assert_close(y, y_ref, torch.float64, "output")
    assert_close(leaf.grad, ref_leaf.grad, torch.float64, "input grad")
    if affine:
        assert_close(w.grad, bn.weight.grad, torch.float64, "weight grad")
        assert_close(b.grad, bn.bias.grad, torch.float64, "bias grad")
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


# --- Without a process group: BatchNorm exactly ------------------------------------------------------

BN_CASES = [c for c in CASES if c.name.startswith(("bn2d", "bn1d", "bn_any_rank", "bn3d"))]


@pytest.mark.parametrize("case", BN_CASES, ids=lambda c: c.name)
def test_without_a_process_group_it_is_batch_norm(case, backend):
    """No torch.distributed initialised: outputs, gradients and state are nk.BatchNorm's, bit for
    bit, in training and eval."""
    sync = nk.SyncBatchNorm(*case.args, **case.kwargs)
    local = nk.BatchNorm(*case.args, **case.kwargs)
    randomize_parameters(sync)
    local.load_state_dict(sync.state_dict())
    inputs = [make_input(case.shape, seed=s) for s in range(3)]
    flags = [True, True, False]
    for (y, dx, grads), (y2, dx2, grads2) in zip(
        run_steps(sync, inputs, flags), run_steps(local, inputs, flags), strict=True
    ):
        assert torch.equal(y, y2) and torch.equal(dx, dx2)
        assert grads.keys() == grads2.keys()
        assert all(torch.equal(grads[k], grads2[k]) for k in grads)
    for key, value in local.state_dict().items():
        assert torch.equal(sync.state_dict()[key], value), key


def test_functional_without_a_process_group_is_batch_norm():
    x = make_input((4, 3, 5))
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = rm.clone(), rv.clone()
    y = synchronized_batch_norm(x, rm, rv, training=True)
    y2 = nk.functional.batch_norm(x, rm2, rv2, training=True)
    assert torch.equal(y, y2) and torch.equal(rm, rm2) and torch.equal(rv, rv2)


# --- The layer's contract ----------------------------------------------------------------------------


def test_signature_and_state_dict_match_torch_sync_batch_norm():
    ours = list(inspect.signature(nk.SyncBatchNorm.__init__).parameters)
    theirs = list(inspect.signature(nn.SyncBatchNorm.__init__).parameters)
    assert ours[: len(theirs)] == theirs
    layer = nk.SyncBatchNorm(6, 1e-3, 0.2, True, True, None)
    assert (layer.eps, layer.momentum, layer.process_group) == (1e-3, 0.2, None)
    torch_layer = nn.SyncBatchNorm(6)
    randomize_parameters(layer)
    torch_layer.load_state_dict(layer.state_dict())
    assert layer.state_dict().keys() == torch_layer.state_dict().keys()
    layer.load_state_dict(torch_layer.state_dict())


def test_isinstance_checks_and_ddp_on_the_cpu():
    """A torch _BatchNorm (and normkit BatchNorm) for libraries that look for batch norms, but not a
    torch.nn.SyncBatchNorm, which DistributedDataParallel refuses on the CPU."""
    layer = nk.SyncBatchNorm(4)
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert isinstance(layer, nk.BatchNorm)
    assert not isinstance(layer, nn.SyncBatchNorm)
    assert nk.distributed.SyncBatchNorm is nk.SyncBatchNorm


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"check_ranks": "sometimes"}, "check_ranks"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "10s"}, "timeout"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, phrase):
    with pytest.raises(ConfigError, match=phrase):
        nk.SyncBatchNorm(4, **kwargs)


# --- The header checks, rank by rank -----------------------------------------------------------------


def _header(**fields) -> list[float]:
    row = [0.0] * wire.HEADER_SIZE
    row[wire.MAGIC_FIELD] = wire.MAGIC
    row[wire.NUM_FEATURES] = row[wire.CHANNELS] = 4.0
    row[wire.DTYPE] = wire.dtype_code(torch.float32)
    row[wire.COUNT] = 8.0
    row[wire.EPS] = 1e-5
    row[wire.MOMENTUM] = 0.1
    row[wire.FLAGS] = float(wire.FLAG_UPDATES_RUNNING_STATS | wire.FLAG_INPUT_NEEDS_GRAD)
    row[wire.STEP] = 3.0
    for name, value in fields.items():
        row[getattr(wire, name)] = value
    return row


@pytest.mark.parametrize(
    "other, error, phrase",
    [
        ({"MAGIC_FIELD": 0.0}, RankMismatchError, "different collectives"),
        ({"ERROR": 3.0, "CHANNELS": 5.0}, ChannelMismatchError, "rank 1 could not normalize"),
        ({"ERROR": 1.0}, DtypeError, "rank 1 could not normalize"),
        ({"ERROR": 2.0, "CHANNELS": -1.0}, ShapeError, "no channel dimension"),
        ({"DTYPE": wire.dtype_code(torch.float16)}, DtypeError, "rank 1: float16"),
        ({"EPS": 1e-3}, RankMismatchError, "eps (rank 0: 1e-05, rank 1: 0.001)"),
        ({"MOMENTUM": -1.0}, RankMismatchError, "momentum (rank 0: 0.1, rank 1: None)"),
        ({"FLAGS": float(wire.FLAG_INPUT_NEEDS_GRAD)}, RankMismatchError, "track_running_stats"),
        ({"FLAGS": float(wire.FLAG_UPDATES_RUNNING_STATS)}, RankMismatchError, "gradient"),
        ({"STEP": 2.0}, RankMismatchError, "rank 0: 3, rank 1: 2"),
    ],
)
def test_each_disagreement_is_named(other, error, phrase):
    with pytest.raises(error, match=None) as raised:
        wire.verify_rows([_header(), _header(**other)], None, "SyncBatchNorm(4)")
    assert phrase in str(raised.value), str(raised.value)


def test_the_rank_at_fault_raises_its_own_error():
    own = ChannelMismatchError("the detailed local message")
    with pytest.raises(ChannelMismatchError, match="the detailed local message"):
        wire.verify_rows([_header(ERROR=3.0), _header()], own, "layer")


def test_global_counts():
    assert wire.verify_rows([_header(COUNT=0.0), _header(COUNT=5.0)], None, "layer") == 5
    assert wire.verify_rows([_header(COUNT=0.0), _header(COUNT=0.0)], None, "layer") == 0
    with pytest.raises(BatchTooSmallError, match="1 in total"):
        wire.verify_rows([_header(COUNT=0.0), _header(COUNT=1.0)], None, "layer")


def test_row_layout():
    row = wire.pack_row(_header(), torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    assert row.dtype == torch.float64 and row.shape == (wire.HEADER_SIZE + 4,)
    assert row[wire.HEADER_SIZE :].tolist() == [1.0, 2.0, 3.0, 4.0]


# --- Conversions both ways ---------------------------------------------------------------------------


class CustomBatchNorm(nn.BatchNorm1d):
    """Stands for a BN variant with its own maths (renorm, ghost): never converted."""


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(4, momentum=None)),
        nk.BatchNorm1d(4, affine=False, on_nonfinite="raise"),
        CustomBatchNorm(4),
        nn.InstanceNorm1d(4),
    )


def test_conversion_round_trip_keeps_state_and_classes():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    synced = to_sync_batch_norm(model, timeout=5.0)
    assert synced is model  # a container is changed in place
    assert [type(m).__name__ for m in (model[1], model[2][1], model[3])] == ["SyncBatchNorm"] * 3
    assert type(model[4]) is CustomBatchNorm and type(model[5]) is nn.InstanceNorm1d
    assert model[1].weight is weight  # shared: the optimizer keeps updating it
    assert model[2][1].momentum is None and model[3].affine is False
    assert model[3].on_nonfinite == "raise" and model[1].timeout == 5.0
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert any(p is weight for group in optimizer.param_groups for p in group["params"])
    back = to_batch_norm(model)
    assert [type(m) for m in (back[1], back[2][1], back[3])] == [
        nn.BatchNorm2d,
        nn.BatchNorm1d,
        nk.BatchNorm1d,
    ]
    assert back[1].weight is weight
    assert all(torch.equal(back.state_dict()[k], v) for k, v in before.items())


def test_conversion_of_a_single_layer_and_of_torch_sync_batch_norm():
    torch_sync = nn.SyncBatchNorm(5, eps=1e-3, bias=False)
    torch_sync.eval()
    ours = nk.SyncBatchNorm.convert_sync_batchnorm(torch_sync)
    assert type(ours) is nk.SyncBatchNorm and not ours.training
    assert ours.eps == 1e-3 and ours.bias is None and ours.weight is torch_sync.weight
    local = nk.SyncBatchNorm.revert_sync_batchnorm(ours)
    assert type(local) is nk.BatchNorm  # any rank, as SyncBatchNorm is
    as_torch = to_batch_norm(nn.SyncBatchNorm(5), layer=nn.BatchNorm1d)
    assert type(as_torch) is nn.BatchNorm1d
    not_tracking = to_sync_batch_norm(nn.BatchNorm2d(3, track_running_stats=False))
    assert not_tracking.running_mean is None and not not_tracking.track_running_stats


def test_converted_model_computes_the_same_without_a_process_group():
    model = _model()
    x = torch.randn(4, 3, 6, 6)
    reference_model = _model()
    to_sync_batch_norm(model)
    assert_close(model(x), reference_model(x), torch.float32, "train")
    model.eval()
    reference_model.eval()
    assert_close(model(x), reference_model(x), torch.float32, "eval")


# --- the synchronized step under PyTorch's transforms ---------------------------------------------


@pytest.fixture
def synchronizing(monkeypatch):
    """A layer that believes it has peers: the refusals come before any collective, so none runs."""
    from normkit.distributed import sync_batch_norm

    monkeypatch.setattr(sync_batch_norm, "synchronizing_group", lambda group: _PEERS)
    layer = nk.SyncBatchNorm(3).train()
    monkeypatch.setattr(layer, "_synchronized_forward", _no_collectives)
    return layer


_PEERS = object()  # stands for a process group of two ranks


def _no_collectives(*args):
    raise AssertionError("a collective would have run")


def test_synchronized_step_refuses_transforms_that_cannot_hold_it(synchronizing):
    """torch.func, torch.jit.trace and torch.export refuse the synchronized step with its reason
    (docs/transforms.md); torch.compile breaks the graph with it."""
    from normkit.errors import UnsupportedTransformError
    from normkit.functional._transforms import SYNCHRONIZED_STEP

    x = torch.randn(4, 3, 2)
    attempts = {
        "grad": lambda: torch.func.grad(lambda t: synchronizing(t).sum())(x),
        "jvp": lambda: torch.func.jvp(synchronizing, (x,), (x,)),
        "jit.trace": lambda: torch.jit.trace(synchronizing, (x,), check_trace=False),
        "export": lambda: torch.export.export(synchronizing, (x,)),
    }
    for attempt in attempts.values():
        with pytest.raises(UnsupportedTransformError, match="synchronized training step"):
            attempt()
    torch._dynamo.reset()
    with pytest.raises(RuntimeError) as info:
        torch.compile(synchronizing, fullgraph=True, backend="eager")(x)
    assert SYNCHRONIZED_STEP.reason in str(info.value)

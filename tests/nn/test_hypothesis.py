"""Random shapes and configurations against torch.nn (hypothesis): train steps, then eval."""

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import normkit as nk
from helpers import TorchBatchNormAnyRank, assert_close, randomize_parameters

spatial = st.lists(st.integers(1, 4), min_size=0, max_size=3)
backends = st.sampled_from(["native", "reference"])
dtypes = st.sampled_from([torch.float32, torch.float64])


def _compare(ours, theirs, shape, dtype, backend, steps, channels_last=False):
    randomize_parameters(ours)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    generator = torch.Generator().manual_seed(len(shape))
    for step, training in enumerate(steps):
        x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        ours.train(training)
        theirs.train(training)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        with nk.backend(backend):
            ya = ours(a)
        yb = theirs(b)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(ya, yb, dtype, f"step {step} output")
        assert_close(a.grad, b.grad, dtype, f"step {step} input grad")
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(p.grad, q.grad, dtype, f"step {step} grad of {name}")
            p.grad, q.grad = None, None
    for (key, value), expected in zip(
        ours.state_dict().items(), theirs.state_dict().values(), strict=True
    ):
        assert_close(value, expected, value.dtype if value.is_floating_point() else dtype, key)


@given(
    n=st.integers(2, 5),
    c=st.integers(1, 5),
    rest=spatial,
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, 1.0, None]),
    eps=st.sampled_from([1e-5, 1e-3]),
    backend=backends,
    dtype=dtypes,
)
def test_batch_norm_any_rank(n, c, rest, affine, track, momentum, eps, backend, dtype):
    kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    _compare(
        nk.BatchNorm(c, **kwargs),
        TorchBatchNormAnyRank(c, **kwargs),
        (n, c, *rest),
        dtype,
        backend,
        [True, True, False],
    )


@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    normalized=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    affine=st.booleans(),
    bias=st.booleans(),
    backend=backends,
    dtype=dtypes,
)
def test_layer_norm(lead, normalized, affine, bias, backend, dtype):
    assume(math.prod(normalized) >= 2)  # groups of one element: tests/functional/test_numerics.py
    kwargs = dict(elementwise_affine=affine, bias=bias)
    _compare(
        nk.LayerNorm(normalized, **kwargs),
        torch.nn.LayerNorm(normalized, **kwargs),
        (*lead, *normalized),
        dtype,
        backend,
        [True, False],
    )


@given(
    n=st.integers(1, 4),
    groups=st.integers(1, 4),
    per_group=st.integers(1, 3),
    rest=spatial,
    affine=st.booleans(),
    backend=backends,
    dtype=dtypes,
)
def test_group_norm(n, groups, per_group, rest, affine, backend, dtype):
    assume(per_group * math.prod(rest) >= 2)  # groups of one element: tests/functional/test_numerics.py
    c = groups * per_group
    _compare(
        nk.GroupNorm(groups, c, affine=affine),
        torch.nn.GroupNorm(groups, c, affine=affine),
        (n, c, *rest),
        dtype,
        backend,
        [True, False],
    )


@given(
    n=st.integers(1, 4),
    c=st.integers(1, 4),
    h=st.integers(2, 5),
    w=st.integers(1, 5),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.4]),
    channels_last=st.booleans(),
    backend=backends,
    dtype=dtypes,
)
def test_instance_norm_2d(n, c, h, w, affine, track, momentum, channels_last, backend, dtype):
    kwargs = dict(affine=affine, track_running_stats=track, momentum=momentum)
    ours = nk.InstanceNorm2d(c, **kwargs)
    theirs = torch.nn.InstanceNorm2d(c, **kwargs)
    if track:  # torch never counts InstanceNorm batches; copy our count so the states compare

        def copy_count(module, *_):
            module.num_batches_tracked.copy_(ours.num_batches_tracked)

        theirs.register_forward_hook(copy_count)
    _compare(ours, theirs, (n, c, h, w), dtype, backend, [True, True, False], channels_last)

"""Ghost Batch Normalization (Hoffer et al. 2017): each ghost batch normalized on its own, against the
float64 oracle (the paper's loop over ghost batches); v >= N is BatchNorm; eval is BatchNorm eval at
any batch size; the split rule for batches not divisible by v; running statistics over ghost batches."""

import numpy as np
import pytest
import torch

import normkit as nk
from helpers import (
    assert_close,
    make_input,
    randomize_parameters,
    reference_directional_derivative,
)
from normkit import reference as R
from normkit.errors import BatchTooSmallError, ConfigError
from normkit.functional._ghost_batch_norm import ghost_batch_sizes

# (shape, virtual batch size): divisible, not divisible (17 + 16), one ghost batch, any rank
CASES = [
    ((8, 3), 2),
    ((12, 3, 5), 4),
    ((33, 2, 3), 16),
    ((10, 3, 3, 4), 3),
    ((6, 3, 2, 3, 2), 2),
    ((5, 3, 4, 4), 8),
]
DTYPES = [torch.float32, torch.float64]


def test_split_rule():
    assert ghost_batch_sizes(64, 16) == (16, 16, 16, 16)
    assert ghost_batch_sizes(33, 16) == (17, 16)
    assert ghost_batch_sizes(10, 3) == (4, 3, 3)
    assert ghost_batch_sizes(8, 16) == (8,)
    for n in range(1, 40):
        for v in range(1, 12):
            sizes = ghost_batch_sizes(n, v)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert min(sizes) >= min(v, n) and list(sizes) == R.ghost_batch_sizes(n, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "v"), CASES, ids=str)
def test_training_matches_the_ghost_batch_loop(shape, v, dtype, backend):
    layer = nk.GhostBatchNorm(shape[1], virtual_batch_size=v, momentum=0.3).to(dtype)
    randomize_parameters(layer)
    gamma, beta = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    mean, var = np.zeros(shape[1]), np.ones(shape[1])
    ghosts = len(ghost_batch_sizes(shape[0], v))
    for step in range(2):
        x = make_input(shape, torch.float64, seed=step)
        expected, _ = R.ghost_batch_norm_train(x.numpy(), gamma, beta, v, layer.eps)
        mean, var = R.ghost_running_average(mean, var, x.numpy(), v, 0.3)
        y = layer(x.to(dtype))
        assert_close(y, torch.tensor(expected), dtype, f"step {step} output")
        assert_close(layer.running_mean, torch.tensor(mean), dtype, f"step {step} running_mean")
        assert_close(layer.running_var, torch.tensor(var), dtype, f"step {step} running_var")
        assert int(layer.num_batches_tracked) == ghosts * (step + 1)


@pytest.mark.parametrize(("shape", "v"), CASES[1:4], ids=str)
def test_gradients_match_the_oracle(shape, v, backend):
    """<dL/dx, u> and <dL/dgamma, g> against central differences of the float64 oracle."""
    rng = np.random.default_rng(1)
    x, u, w = rng.normal(0.5, 2.0, shape), rng.normal(size=shape), rng.normal(size=shape)
    gamma, beta = rng.normal(1.0, 0.3, shape[1]), rng.normal(0.0, 0.3, shape[1])
    g = rng.normal(size=shape[1])
    layer = nk.GhostBatchNorm(shape[1], virtual_batch_size=v).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gamma)), layer.bias.copy_(torch.tensor(beta))
    leaf = torch.tensor(x, requires_grad=True)
    (layer(leaf) * torch.tensor(w)).sum().backward()
    oracle = lambda x_, gamma_: R.ghost_batch_norm_train(x_, gamma_, beta, v, layer.eps)[0]
    zero_x, zero_g = np.zeros_like(x), np.zeros_like(gamma)
    dx = reference_directional_derivative(oracle, [x, gamma], [u, zero_g], w)
    dgamma = reference_directional_derivative(oracle, [x, gamma], [zero_x, g], w)
    assert (leaf.grad * torch.tensor(u)).sum().item() == pytest.approx(dx, rel=1e-7, abs=1e-8)
    got = (layer.weight.grad * torch.tensor(g)).sum().item()
    assert got == pytest.approx(dgamma, rel=1e-7, abs=1e-8)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_virtual_batch_at_least_the_batch_is_batch_norm(layout, backend):
    channels_last = layout == "channels_last"
    ours = nk.GhostBatchNorm(4, virtual_batch_size=8)
    theirs = torch.nn.BatchNorm2d(4)
    randomize_parameters(ours)
    theirs.load_state_dict(ours.state_dict())
    for seed, n in enumerate((8, 5, 8)):
        x = make_input((n, 4, 3, 3), channels_last=channels_last, seed=seed)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = make_input(x.shape, seed=10 + seed, scale=1.0, shift=0.0)
        ours.zero_grad(), theirs.zero_grad()
        y_ours, y_theirs = ours(a), theirs(b)
        y_ours.backward(dy), y_theirs.backward(dy)
        assert_close(y_ours, y_theirs, what="output")
        assert_close(a.grad, b.grad, what="dx")
        assert_close(ours.weight.grad, theirs.weight.grad, what="dgamma")
        if channels_last:
            assert y_ours.is_contiguous(memory_format=torch.channels_last)
            assert a.grad.is_contiguous(memory_format=torch.channels_last)
    for key, value in theirs.state_dict().items():
        if value.is_floating_point():
            assert_close(ours.state_dict()[key], value, what=key)
        else:
            assert torch.equal(ours.state_dict()[key], value), key


def test_eval_uses_running_statistics_at_any_batch_size(backend):
    layer = nk.GhostBatchNorm(3, virtual_batch_size=4)
    randomize_parameters(layer)
    for seed in range(3):
        layer(make_input((16, 3, 5), seed=seed))
    bn = torch.nn.BatchNorm1d(3)
    bn.load_state_dict(layer.state_dict())
    layer.eval(), bn.eval()
    for n in (1, 3, 16):  # a batch of one, and sizes the virtual split would cut differently
        x = make_input((n, 3, 5), seed=7)
        torch.testing.assert_close(layer(x), bn(x))


def test_without_running_statistics_eval_uses_ghost_batches(backend):
    layer = nk.GhostBatchNorm(3, virtual_batch_size=4, track_running_stats=False).eval()
    x = make_input((8, 3, 6))
    expected, _ = R.ghost_batch_norm_train(x.numpy(), np.ones(3), np.zeros(3), 4, layer.eps)
    assert_close(layer(x), torch.tensor(expected), torch.float32, "eval with ghost statistics")


def test_cumulative_average_is_over_ghost_batches(backend):
    """momentum=None: the running statistics are Algorithm 2's averages over every ghost batch."""
    layer = nk.GhostBatchNorm(3, virtual_batch_size=4, momentum=None).double()
    batches = [make_input((12, 3, 2), torch.float64, seed=s) for s in range(2)]
    for x in batches:
        layer(x)
    ghosts = [g.numpy() for x in batches for g in x.split(4)]
    mean, var = R.population_statistics(ghosts)
    assert_close(layer.running_mean, torch.tensor(mean), torch.float64, "E[x]")
    assert_close(layer.running_var, torch.tensor(var), torch.float64, "Var[x]")
    assert int(layer.num_batches_tracked) == 6


def test_non_finite_ghost_batch_counts_nothing():
    layer = nk.GhostBatchNorm(2, virtual_batch_size=2)
    x = torch.randn(8, 2)
    x[5, 1] = float("nan")
    before = layer.state_dict()
    layer(x)
    assert int(layer.num_batches_tracked) == 0 and int(layer.num_batches_skipped) == 1
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), key


def test_ghost_batch_of_one_value_is_refused():
    layer = nk.GhostBatchNorm(3, virtual_batch_size=1)
    with pytest.raises(BatchTooSmallError, match="virtual_batch_size=1"):
        layer(torch.randn(4, 3))
    assert int(layer.num_batches_tracked) == 0
    with pytest.raises(ConfigError, match="virtual_batch_size"):
        nk.GhostBatchNorm(3, virtual_batch_size=0)

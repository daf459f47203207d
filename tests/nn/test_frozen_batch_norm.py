"""FrozenBatchNorm: BatchNorm's eval map in every mode, any rank, BatchNorm checkpoints, eps > 0."""

import pytest
import torch

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters
from normkit import reference as R
from normkit.errors import ChannelMismatchError, ConfigError

SHAPES = [(5, 4), (3, 4, 6), (2, 4, 3, 5), (2, 4, 2, 3, 2), (2, 4, 2, 2, 2, 2)]


def _trained_batch_norm(shape, cls=nk.BatchNorm):
    bn = cls(shape[1])
    randomize_parameters(bn)
    for seed in range(3):
        bn(make_input(shape, seed=seed))
    return bn


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_equals_batch_norm_eval_in_both_modes(shape, backend):
    bn = _trained_batch_norm(shape)
    frozen = nk.FrozenBatchNorm(shape[1])
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked accepted and ignored
    x = make_input(shape, seed=8)
    expected = R.batch_norm_inference(
        x.double().numpy(), bn.running_mean.double().numpy(), bn.running_var.double().numpy(),
        bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy(), bn.eps,
    )  # fmt: skip
    for mode in (True, False):
        assert_close(frozen.train(mode)(x), torch.tensor(expected), torch.float32, f"mode {mode}")
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    assert list(frozen.parameters()) == []


def test_input_gradient_passes_and_nothing_else_changes(backend):
    frozen = nk.FrozenBatchNorm.from_batch_norm(_trained_batch_norm((4, 3, 5, 5)))
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = make_input((4, 3, 5, 5), channels_last=True).requires_grad_()
    y = frozen(x)
    y.backward(torch.ones_like(y))
    scale = frozen.weight / torch.sqrt(frozen.running_var + frozen.eps)
    assert_close(x.grad, scale.view(1, 3, 1, 1).expand_as(x), what="dx")
    assert y.is_contiguous(memory_format=torch.channels_last)
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "source",
    [
        lambda: torch.nn.BatchNorm2d(3),
        lambda: nk.BatchNorm2d(3),
        lambda: torch.nn.BatchNorm2d(3, affine=False),
        lambda: nk.BatchNorm2d(3, bias=False),
        lambda: nk.BatchRenorm2d(3),
    ],
    ids=["torch", "normkit", "not_affine", "no_bias", "renorm"],
)
def test_from_batch_norm_copies_any_batch_norm(source):
    bn = source()
    randomize_parameters(bn)
    bn(make_input((6, 3, 4, 4)))
    frozen = nk.FrozenBatchNorm.from_batch_norm(bn)
    x = make_input((2, 3, 4, 4), seed=3)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    assert frozen.eps == bn.eps
    assert frozen.running_mean.data_ptr() != bn.running_mean.data_ptr()  # a copy


def test_state_dict_keys_and_round_trip():
    frozen = nk.FrozenBatchNorm.from_batch_norm(_trained_batch_norm((4, 3, 2)))
    keys = {"weight", "bias", "running_mean", "running_var"}
    assert set(frozen.state_dict()) == keys
    other = nk.FrozenBatchNorm(3)
    other.load_state_dict(frozen.state_dict())
    for key in keys:
        assert torch.equal(other.state_dict()[key], frozen.state_dict()[key])
    with pytest.raises(RuntimeError, match="Missing key"):
        nk.FrozenBatchNorm(3).load_state_dict({"weight": torch.ones(3)})


def test_eps_must_be_positive():
    with pytest.raises(ConfigError, match="eps must be > 0"):
        nk.FrozenBatchNorm(3, eps=0.0)
    bn = torch.nn.BatchNorm2d(3, eps=0.0)
    with pytest.raises(ConfigError, match="eps=1e-5"):
        nk.FrozenBatchNorm.from_batch_norm(bn)
    frozen = nk.FrozenBatchNorm.from_batch_norm(bn, eps=1e-3)
    with torch.no_grad():
        frozen.running_var.zero_()
    assert torch.isfinite(frozen(torch.randn(2, 3, 2, 2))).all()


def test_bad_input_and_sources_are_refused():
    with pytest.raises(ConfigError, match="no running statistics"):
        nk.FrozenBatchNorm.from_batch_norm(torch.nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ChannelMismatchError, match="FrozenBatchNorm"):
        nk.FrozenBatchNorm(3)(torch.randn(2, 4, 5))


def test_caffe2_checkpoints_of_weight_and_bias_load():
    """Caffe2/Detectron checkpoints fold the statistics into weight and bias; detectron2's
    FrozenBatchNorm2d loads them with mean 0 and variance 1, and so does this one (issue 20)."""
    weight, bias = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([0.1, 0.2, 0.3])
    frozen = nk.FrozenBatchNorm(3, eps=1e-5)
    with torch.no_grad():  # not the defaults, so the load must write them
        frozen.running_mean.fill_(7.0)
        frozen.running_var.fill_(9.0)
    frozen.load_state_dict({"weight": weight, "bias": bias})  # strict
    assert torch.equal(frozen.running_mean, torch.zeros(3))
    assert torch.equal(frozen.running_var, torch.ones(3))
    x = torch.randn(2, 3, 4)
    expected = x * (weight / (1 + 1e-5) ** 0.5).view(1, 3, 1) + bias.view(1, 3, 1)
    torch.testing.assert_close(frozen(x), expected)
    with pytest.raises(RuntimeError, match="Missing key"):  # a partial BatchNorm is still refused
        nk.FrozenBatchNorm(3).load_state_dict({"weight": weight, "bias": bias, "running_mean": bias})

"""nk.tools.convert and nk.tools.freeze: what is replaced, what carries over, and that nothing else
changes (sharing, nesting, device, dtype, modes, the user's model)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_architectures import build, exact, trained
from torch import nn

import normkit as nk
from helpers import assert_close
from normkit.errors import ConfigError
from normkit.tools import carry_state, convert, freeze

needs_create_norm = pytest.mark.skipif(
    not hasattr(nk, "create_norm"), reason="nk.create_norm is not in this tree"
)
needs_frozen = pytest.mark.skipif(
    not hasattr(nk, "FrozenBatchNorm"), reason="nk.FrozenBatchNorm is not in this tree"
)


def _types(model):
    return [type(m) for m in model.modules()]


def test_torch_to_normkit_and_back_keeps_state_and_outputs():
    model, x = build("resnet")
    model = convert(model, "torch")[0]  # start from torch.nn layers only
    assert not any(t.__module__.startswith("normkit") for t in _types(model))
    converted, replaced = convert(model, "normkit")
    assert len(replaced) == 6 and all(r.target == "nk.BatchNorm2d" for r in replaced)
    assert all(
        isinstance(m, nk.BatchNorm2d)
        for m in converted.modules()
        if "BatchNorm" in type(m).__name__
    )
    assert replaced[0].carried == [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]
    assert converted.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert_close(converted(x), exact(model, x), torch.float32)
    back, replaced_back = convert(converted, "torch")
    assert type(back[1]) is nn.BatchNorm2d and replaced_back[0].not_carried == ["on_nonfinite"]
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_every_torch_normalizer_has_a_normkit_namesake():
    model = nn.Sequential(
        nn.BatchNorm1d(8), nn.Unflatten(1, (4, 2, 1)), nn.BatchNorm2d(4), nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True), nn.LayerNorm(1, bias=False),
    )  # fmt: skip
    converted, replaced = convert(model, "normkit")
    assert [r.target for r in replaced] == [
        "nk.BatchNorm1d", "nk.BatchNorm2d", "nk.GroupNorm", "nk.InstanceNorm2d", "nk.LayerNorm",
    ]  # fmt: skip
    assert converted[5].bias is None
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), model.eval()(x))


def test_shared_and_nested_layers_stay_shared():
    shared = nn.BatchNorm2d(4)
    inner = nn.Sequential(nn.Conv2d(4, 4, 1), shared)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Sequential(inner, nn.ReLU()))
    converted, replaced = convert(model, "normkit")
    assert len(replaced) == 1 and replaced[0].paths == ["1", "2.0.1"]
    assert converted[1] is converted[2][0][1] and isinstance(converted[1], nk.BatchNorm2d)
    assert model[1] is shared and type(shared) is nn.BatchNorm2d  # the user's model is untouched


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_dtype_and_mode_are_kept(dtype):
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (4, 3, 6, 6)).to(dtype)
    model[1].train()
    converted, _ = convert(model, "normkit")
    bn = converted[1]
    assert bn.training and bn.weight.dtype == dtype and bn.running_mean.dtype == dtype
    assert bn.weight.device == model[1].weight.device


def test_requires_grad_is_carried():
    model = nn.Sequential(nn.BatchNorm1d(4))
    model[0].weight.requires_grad_(False)
    converted, _ = convert(model, "normkit")
    assert not converted[0].weight.requires_grad and converted[0].bias.requires_grad


def test_the_root_itself_can_be_converted():
    converted, replaced = convert(nn.BatchNorm1d(3), "normkit")
    assert isinstance(converted, nk.BatchNorm1d) and replaced[0].paths == [""]


def test_layers_without_a_namesake_are_skipped_with_the_reason():
    model = nn.Sequential(nk.BatchNorm(4), nk.LayerNorm2d(4))
    converted, replaced = convert(model, "torch")
    assert not replaced and converted[0] is not model[0]  # a copy, unchanged
    assert [s.paths for s in replaced.skipped] == [["0"], ["1"]]
    assert "pass example_inputs=" in replaced.skipped[0].reason  # any rank: which torch class?
    assert "no namesake in torch.nn" in replaced.skipped[1].reason


@pytest.mark.parametrize("shape, cls", [((4, 4), nn.BatchNorm1d), ((2, 4, 3, 3), nn.BatchNorm2d)])
def test_any_rank_batch_norm_becomes_torchs_by_the_rank_of_its_input(shape, cls):
    model = trained(nn.Sequential(nk.BatchNorm(4)), shape).eval()
    x = torch.randn(shape)
    converted, replaced = convert(model, "torch", example_inputs=x)
    assert type(converted[0]) is cls and replaced[0].target == f"nn.{cls.__name__}"
    with torch.no_grad():
        assert_close(converted(x), exact(model, x), torch.float32)


def test_already_the_target_kind_is_skipped():
    model = nn.Sequential(nk.BatchNorm2d(4))
    _, replaced = convert(model, lambda m: nk.BatchNorm2d(m.num_features))
    assert not replaced and "already BatchNorm2d" in replaced.skipped[0].reason


def test_a_callable_target_gets_state_carried_by_meaning():
    """BN -> GroupNorm: γ/β carry (one scale and shift per channel in both), statistics do not."""
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3)), (4, 3, 6, 6))
    converted, replaced = convert(model, lambda m: nn.GroupNorm(2, m.num_features))
    gn = converted[1]
    assert torch.equal(gn.weight, model[1].weight) and torch.equal(gn.bias, model[1].bias)
    assert gn.eps == 1e-3
    assert replaced[0].carried == ["weight", "bias", "eps"]
    assert replaced[0].not_carried == ["running_mean", "running_var", "num_batches_tracked"]


def test_carry_state_between_batch_norm_family_carries_statistics():
    source = trained(nn.Sequential(nn.BatchNorm1d(5, momentum=0.3)), (8, 5))[0]
    target = nk.BatchNorm1d(5)
    carried, not_carried = carry_state(source, target)
    assert not not_carried and "running_var" in carried and target.momentum == source.momentum
    assert torch.equal(target.running_var, source.running_var)


def test_instance_norm_statistics_do_not_become_batch_norm_statistics():
    source = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
    _, not_carried = carry_state(source, nn.BatchNorm2d(4))
    assert {"running_mean", "running_var"} <= set(not_carried)


def test_which_selects_the_layers():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4))
    _, replaced = convert(model, "normkit", which=nn.LayerNorm)
    assert [r.source for r in replaced] == ["nn.LayerNorm"]
    _, replaced = convert(model, "normkit", which="batch")
    assert [r.source for r in replaced] == ["nn.BatchNorm1d"]
    _, replaced = convert(model, "normkit", which=lambda m: False)
    assert not replaced
    with pytest.raises(ConfigError, match="which must be"):
        convert(model, "normkit", which="some")


def test_torch_and_normkit_sync_batch_norm_convert_both_ways():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    converted, replaced = convert(model, "normkit")
    assert (replaced[0].source, replaced[0].target) == ("nn.SyncBatchNorm", "nk.SyncBatchNorm")
    back, replaced = convert(converted, "torch")
    assert type(back[1]) is nn.SyncBatchNorm and replaced[0].not_carried == ["on_nonfinite"]


def test_sync_leaves_layers_with_their_own_maths():
    model = nn.Sequential(nk.BatchRenorm2d(4), nk.FrozenBatchNorm(4))
    _, replaced = convert(model, "sync")
    assert not replaced and len(replaced.skipped) == 2
    assert "not a plain BatchNorm" in replaced.skipped[0].reason


def test_sync_conversion_uses_normkit_distributed():
    model, x = build("mobilenet")
    converted, replaced = convert(model, "sync")
    assert len(replaced) == 6 and {r.target for r in replaced} == {"nk.SyncBatchNorm"}
    assert all(isinstance(converted.get_submodule(r.paths[0]), nk.SyncBatchNorm) for r in replaced)
    with torch.no_grad():  # eval mode: SyncBatchNorm is BatchNorm with its running statistics
        assert_close(converted(x), exact(model, x), torch.float32)


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ConfigError, match="spec string or a callable"):
        convert(nn.BatchNorm1d(3), 3)


@needs_create_norm
@pytest.mark.parametrize("spec", ["group:2", "layer2d", "instance"])
def test_create_norm_specs_carry_gamma_and_beta(spec):
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (4, 3, 6, 6))
    converted, replaced = convert(model, spec)
    (record,) = replaced
    assert record.source == "nn.BatchNorm2d"
    new = converted[1]
    if getattr(new, "weight", None) is not None and new.weight.shape == (4,):
        assert "weight" in record.carried and torch.equal(new.weight, model[1].weight)
    assert "running_mean" in record.not_carried
    converted(torch.randn(2, 3, 6, 6))


@needs_create_norm
def test_renorm_carries_statistics_and_equals_batch_norm_in_eval():
    model, x = build("resnet")
    converted, replaced = convert(model, "renorm")
    assert len(replaced) == 6
    assert all("running_var" in r.carried for r in replaced)
    with torch.no_grad():
        assert_close(converted(x), exact(model, x), torch.float32)


@needs_frozen
def test_freeze_makes_every_batch_norm_frozen_with_the_same_outputs():
    model, x = build("resnet")
    frozen, replaced = freeze(model)
    assert len(replaced) == 6
    assert all(isinstance(frozen.get_submodule(r.paths[0]), nk.FrozenBatchNorm) for r in replaced)
    frozen.train()  # frozen BN ignores the mode
    before = copy.deepcopy(frozen.state_dict())
    with torch.no_grad():
        assert_close(frozen(x), exact(model, x), torch.float32)
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())


def test_an_error_names_the_layer_and_changes_nothing():
    """group:3 does not divide 8 channels: the second layer fails, the first is not replaced either."""
    model = nn.Sequential(nn.BatchNorm2d(6), nn.Sequential(nn.BatchNorm2d(8)))
    with pytest.raises(ConfigError, match=r"converting '1.0' to 'group:3'.*divisible"):
        convert(model, "group:3", inplace=True)
    assert type(model[0]) is nn.BatchNorm2d and type(model[1][0]) is nn.BatchNorm2d


def test_convert_without_create_norm_says_what_to_do(monkeypatch):
    monkeypatch.delattr(nk, "create_norm", raising=False)
    with pytest.raises(ConfigError, match="create_norm"):
        convert(nn.Sequential(nn.BatchNorm1d(3)), "group:1")

"""torch's own SyncBatchNorm converter on every normkit layer: only plain BatchNorm converts.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (and the converters other libraries copied from it)
replaces every ``isinstance(m, _BatchNorm)`` by plain SyncBatchNorm. normkit's layers that are not
plain BatchNorm are not ``_BatchNorm``s (normkit.nn._base.NormBase says why), so they stay, with their
activation, renormalization or virtual batches; and the doctor names a torch SyncBatchNorm that
stands where a normkit layer was, from the marks on the tensors the converter carried over.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.nn._origin import ORIGIN_ATTRIBUTE

# name -> (layer, an input it takes)
LAYERS = {
    "BatchNorm": (lambda: nk.BatchNorm(4), (8, 4, 3)),
    "BatchNorm1d": (lambda: nk.BatchNorm1d(4), (8, 4)),
    "BatchNorm2d": (lambda: nk.BatchNorm2d(4), (8, 4, 3, 3)),
    "BatchNorm3d": (lambda: nk.BatchNorm3d(4), (8, 4, 2, 2, 2)),
    "SyncBatchNorm": (lambda: nk.SyncBatchNorm(4), (8, 4, 3, 3)),
    "BatchRenorm": (lambda: nk.BatchRenorm(4, r_max=1.5, d_max=0.5), (8, 4, 3)),
    "BatchRenorm1d": (lambda: nk.BatchRenorm1d(4, r_max=1.5, d_max=0.5), (8, 4)),
    "BatchRenorm2d": (lambda: nk.BatchRenorm2d(4, r_max=1.5, d_max=0.5), (8, 4, 3, 3)),
    "BatchRenorm3d": (lambda: nk.BatchRenorm3d(4, r_max=1.5, d_max=0.5), (8, 4, 2, 2, 2)),
    "GhostBatchNorm": (lambda: nk.GhostBatchNorm(4, virtual_batch_size=2), (8, 4, 3, 3)),
    "BatchNormAct": (lambda: nk.BatchNormAct(4, activation="silu"), (8, 4, 3, 3)),
    "InPlaceABN": (lambda: nk.InPlaceABN(4, inplace=False), (8, 4, 3, 3)),
    "BatchInstanceNorm": (lambda: nk.BatchInstanceNorm(4), (8, 4, 3, 3)),
    "BatchLayerNorm": (lambda: nk.BatchLayerNorm(4), (8, 4, 3, 3)),
    "SwitchableNorm": (lambda: nk.SwitchableNorm(4), (8, 4, 3, 3)),
    "InstanceNorm1d": (
        lambda: nk.InstanceNorm1d(4, affine=True, track_running_stats=True),
        (8, 4, 5),
    ),
    "InstanceNorm2d": (lambda: nk.InstanceNorm2d(4, affine=True), (8, 4, 3, 3)),
    "InstanceNorm3d": (lambda: nk.InstanceNorm3d(4, affine=True), (8, 4, 2, 2, 2)),
    "GroupNorm": (lambda: nk.GroupNorm(2, 4), (8, 4, 3, 3)),
    "LayerNorm": (lambda: nk.LayerNorm(4), (8, 3, 4)),
    "LayerNorm2d": (lambda: nk.LayerNorm2d(4), (8, 4, 3, 3)),
    "FrozenBatchNorm": (lambda: nk.FrozenBatchNorm(4), (8, 4, 3, 3)),
    "RMSNorm": (lambda: nk.RMSNorm(4), (8, 3, 4)),
    "RMSNorm2d": (lambda: nk.RMSNorm2d(4), (8, 4, 3, 3)),
    "FilterResponseNorm": (lambda: nk.FilterResponseNorm(4), (8, 4, 3, 3)),
    "EvoNormB0": (lambda: nk.EvoNormB0(4), (8, 4, 3, 3)),
    "EvoNormS0": (lambda: nk.EvoNormS0(4, groups=2), (8, 4, 3, 3)),
    "MovingAverageBatchNorm": (lambda: nk.MovingAverageBatchNorm(4), (8, 4, 3, 3)),
    "CrossIterationBatchNorm": (
        lambda: nk.CrossIterationBatchNorm(4, compensate=False),
        (8, 4, 3, 3),
    ),
    "StdConv2d": (lambda: nk.StdConv2d(4, 4, 3), (8, 4, 5, 5)),
    "ScaledStdConv2d": (lambda: nk.ScaledStdConv2d(4, 4, 3), (8, 4, 5, 5)),
    "CenteredConv2d": (lambda: nk.CenteredConv2d(4, 4, 3), (8, 4, 5, 5)),
}
PLAIN_BATCH_NORMS = {"BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"}


def test_every_public_normalizer_is_covered():
    public = {
        name
        for name in nk.__all__
        if isinstance(getattr(nk, name), type) and issubclass(getattr(nk, name), nn.Module)
    }
    assert public == set(LAYERS)


def _randomized(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for tensor in [*layer.parameters(), *layer.buffers()]:
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5)
    return layer, torch.randn(shape) * 2 + 1


@pytest.mark.parametrize("name", sorted(set(LAYERS) - PLAIN_BATCH_NORMS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_converter_leaves_every_layer_that_is_not_plain_batch_norm(name, training):
    layer, x = _randomized(name)
    layer.train(training)
    reference = copy.deepcopy(layer)
    model = nn.Sequential(nn.Identity(), layer)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted[1] is layer  # not a plain SyncBatchNorm: activation and maths kept
    assert not isinstance(layer, nn.modules.batchnorm._BatchNorm)
    with nk.backend("reference"):
        torch.testing.assert_close(converted(x.clone()), reference(x.clone()), rtol=0, atol=0)
    assert nk.SyncBatchNorm.convert_sync_batchnorm(model)[1] is layer  # normkit's converter too
    assert not nk.tools.doctor(converted).codes().count("converted-to-torch-sync")


@pytest.mark.parametrize("name", sorted(PLAIN_BATCH_NORMS))
def test_torch_converter_takes_plain_batch_norm_and_the_doctor_says_what_it_lost(name):
    layer, x = _randomized(name)
    model = nn.Sequential(nn.Identity(), layer)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is nn.SyncBatchNorm and converted[1].weight is layer.weight
    converted.eval()
    expected = nn.functional.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
    )
    torch.testing.assert_close(converted(x), expected)  # the same numbers (eval, on the CPU)
    (finding,) = [f for f in nk.tools.doctor(converted).findings if f.code.startswith("converted")]
    assert (finding.path, finding.severity) == ("1", "warning")
    assert f"nk.{name}" in finding.message and "nk.SyncBatchNorm" in finding.fix


def _naive_convert(module: nn.Module) -> nn.Module:
    """A converter that takes anything with running statistics (no isinstance check), moving its
    tensors into a torch SyncBatchNorm as torch's does."""
    for name, child in module.named_children():
        if getattr(child, "running_mean", None) is not None and hasattr(child, "num_features"):
            sync = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum)
            sync.weight, sync.bias = child.weight, child.bias
            sync.running_mean, sync.running_var = child.running_mean, child.running_var
            sync.num_batches_tracked = child.num_batches_tracked
            module._modules[name] = sync
    return module


@pytest.mark.parametrize(
    "name", ["BatchRenorm2d", "GhostBatchNorm", "BatchNormAct", "InPlaceABN", "SwitchableNorm"]
)
def test_doctor_flags_a_layer_any_converter_turned_into_plain_sync_batch_norm(name):
    layer, _ = _randomized(name)
    converted = _naive_convert(nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), layer))
    assert type(converted[1]) is nn.SyncBatchNorm
    (finding,) = [f for f in nk.tools.doctor(converted).findings if f.code.startswith("converted")]
    assert finding.severity == "error" and f"nk.{name}" in finding.message
    assert "plain BatchNorm" in finding.why


def test_the_marks_survive_moves_and_loads_but_not_a_new_layer():
    model = nn.Sequential(nk.BatchNorm2d(4, affine=False)).to(torch.float64)  # new buffers
    model.load_state_dict(nn.Sequential(nn.BatchNorm2d(4, affine=False)).double().state_dict())
    for tensor in (model[0].running_mean, model[0].running_var, model[0].num_batches_tracked):
        assert getattr(tensor, ORIGIN_ATTRIBUTE) == "BatchNorm2d"
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert "converted-to-torch-sync" in nk.tools.doctor(converted).codes()
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))
    assert "converted-to-torch-sync" not in nk.tools.doctor(plain).codes()
    rebuilt = nn.SyncBatchNorm(4)  # a state_dict loaded into a new layer carries no mark
    rebuilt.load_state_dict(nk.BatchNorm2d(4).state_dict())
    assert "converted-to-torch-sync" not in nk.tools.doctor(nn.Sequential(rebuilt)).codes()


def test_normkit_conversions_pass_the_mark_to_the_new_owner():
    """to_sync_batch_norm and to_batch_norm share tensors: the mark follows the layer that holds
    them, and a torch layer's tensors carry none."""
    model = nn.Sequential(nn.BatchNorm2d(4))
    synced = nk.distributed.to_sync_batch_norm(model)
    assert getattr(synced[0].weight, ORIGIN_ATTRIBUTE) == "SyncBatchNorm"
    back = nk.distributed.to_batch_norm(synced)  # torch's BatchNorm2d again, same tensors
    assert type(back[0]) is nn.BatchNorm2d and not hasattr(back[0].weight, ORIGIN_ATTRIBUTE)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(back)
    assert "converted-to-torch-sync" not in nk.tools.doctor(converted).codes()

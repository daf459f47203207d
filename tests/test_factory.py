"""create_norm: every name builds its layer, names are forgiving, classes and partials work, and an
unknown name is a ConfigError (a ValueError) that lists the valid ones."""

import functools

import pytest
import torch

import normkit as nk
from normkit.errors import ConfigError

# (spec, expected class, an input it must accept)
SPECS = [
    ("batch", nk.BatchNorm, (4, 8, 3, 3, 2)),
    ("batch2d", nk.BatchNorm2d, (4, 8, 3, 3)),
    ("group:4", nk.GroupNorm, (2, 8, 5)),
    ("layer", nk.LayerNorm, (2, 5, 8)),
    ("layer2d", nk.LayerNorm2d, (2, 8, 3, 3)),
    ("instance", nk.InstanceNorm2d, (2, 8, 4, 4)),
    ("group_instance", nk.GroupNorm, (2, 8, 4, 4, 4)),
    ("instance2d", nk.InstanceNorm2d, (2, 8, 4, 4)),
    ("renorm", nk.BatchRenorm, (4, 8, 5)),
    ("renorm3d", nk.BatchRenorm3d, (2, 8, 2, 2, 2)),
    ("ghost:2", nk.GhostBatchNorm, (8, 8, 3)),
    ("batch_instance", nk.BatchInstanceNorm, (4, 8, 3, 3)),
    ("batch_layer", nk.BatchLayerNorm, (4, 8)),
    ("switchable", nk.SwitchableNorm, (4, 8, 3, 3)),
    ("frozen", nk.FrozenBatchNorm, (1, 8, 2, 2)),
    ("none", torch.nn.Identity, (1, 8)),
]


@pytest.mark.parametrize(("spec", "cls", "shape"), SPECS, ids=[s[0] for s in SPECS])
def test_every_name_builds_its_layer(spec, cls, shape):
    layer = nk.create_norm(spec, 8)
    assert type(layer) is cls
    y = layer(torch.randn(shape))
    assert y.shape == shape


def test_numbers_after_the_colon():
    assert nk.create_norm("group:4", 8).num_groups == 4
    assert nk.create_norm("group", 64).num_groups == 32  # Wu & He's default
    assert nk.create_norm("group", 64, num_groups=16).num_groups == 16
    assert nk.create_norm("ghost:16", 8).virtual_batch_size == 16
    assert nk.create_norm("ghost", 8).virtual_batch_size == 32
    instance = nk.create_norm("group_instance", 6)
    assert instance.num_groups == 6 and instance.num_channels == 6  # one channel per group


def test_instance_builds_an_instance_norm_as_its_name_says():
    layer = nk.create_norm("instance", 6)
    assert isinstance(layer, torch.nn.InstanceNorm2d) and type(layer) is nk.InstanceNorm2d
    assert not layer.affine and not layer.track_running_stats  # torch's defaults
    assert isinstance(nk.create_norm("in", 6), torch.nn.InstanceNorm2d)


@pytest.mark.parametrize(
    "spec",
    ["BATCH", "Batch_Norm", "batch-norm", "batchnorm", "bn", "Batch Norm"],
)
def test_names_are_normalized(spec):
    assert type(nk.create_norm(spec, 4)) is nk.BatchNorm


@pytest.mark.parametrize(
    ("spec", "cls"),
    [
        ("BatchInstance", nk.BatchInstanceNorm),
        ("batch-layer", nk.BatchLayerNorm),
        ("Switchable_Norm", nk.SwitchableNorm),
        ("GhostBatchNorm:8", nk.GhostBatchNorm),
        ("frozen_batch_norm", nk.FrozenBatchNorm),
    ],
)
def test_other_spellings(spec, cls):
    assert type(nk.create_norm(spec, 4)) is cls


def test_keywords_reach_the_constructor():
    layer = nk.create_norm("batch", 4, momentum=0.01, eps=1e-3, affine=False)
    assert layer.momentum == 0.01 and layer.eps == 1e-3 and layer.weight is None
    renorm = nk.create_norm("renorm", 4, r_max=2.0, d_max=1.0)
    assert renorm.r_max == 2.0 and renorm.d_max == 1.0
    with pytest.raises(TypeError):
        nk.create_norm("layer", 4, momentum=0.1)  # LayerNorm takes no momentum


def test_classes_functions_and_partials():
    assert type(nk.create_norm(nk.BatchNorm2d, 4)) is nk.BatchNorm2d
    assert type(nk.create_norm(torch.nn.BatchNorm1d, 4)) is torch.nn.BatchNorm1d
    partial = functools.partial(nk.GhostBatchNorm, virtual_batch_size=4, momentum=0.2)
    layer = nk.create_norm(partial, 6, momentum=0.05)  # the call's keywords win
    assert layer.virtual_batch_size == 4 and layer.momentum == 0.05 and layer.num_features == 6


def test_group_norm_classes_take_the_groups_first():
    assert nk.create_norm(nk.GroupNorm, 64).num_groups == 32
    assert nk.create_norm(torch.nn.GroupNorm, 64, num_groups=8).num_groups == 8
    layer = nk.create_norm(functools.partial(nk.GroupNorm, 4), 8)
    assert layer.num_groups == 4 and layer.num_channels == 8
    layer = nk.create_norm(functools.partial(nk.GroupNorm, num_groups=2), 8)
    assert layer.num_groups == 2


def test_none_is_identity():
    assert isinstance(nk.create_norm(None, 4), torch.nn.Identity)
    assert isinstance(nk.create_norm("identity", 4), torch.nn.Identity)


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("batchnrom", ["unknown norm 'batchnrom'", "batch", "group[:num_groups]", "switchable"]),
        ("layer:4", ["takes no number", "ghost[:virtual_batch_size]"]),
        ("group:x", ["positive integer", "num_groups"]),
        ("group:0", ["positive integer"]),
        ("ghost:", ["no number"]),
        (3, ["name, a class"]),
    ],
)
def test_bad_specs_name_the_valid_ones(spec, fragments):
    with pytest.raises(ConfigError) as info:
        nk.create_norm(spec, 8)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_unknown_name_lists_every_valid_name():
    with pytest.raises(ValueError) as info:
        nk.create_norm("nope", 8)
    for name in (
        "batch", "group", "layer", "layer2d", "instance", "renorm", "ghost", "batch_instance",
        "batch_layer", "switchable", "frozen", "sync", "none",
    ):  # fmt: skip
        assert name in str(info.value), name


def test_sync_builds_normkit_sync_batch_norm():
    from normkit.distributed import SyncBatchNorm

    layer = nk.create_norm("sync", 8, momentum=0.2)
    assert isinstance(layer, SyncBatchNorm) and layer.momentum == 0.2

"""The one constructor (normkit.nn._base.NormBase): signatures, declaring a layer, and the momentum
default that ``decay=`` may replace."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.errors import ConfigError
from normkit.functional import batch_norm
from normkit.functional._checks import check_positive_int
from normkit.nn._base import NormBase

P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
BASE_POSITIONAL = [
    ("num_features", inspect.Parameter.empty),
    ("eps", 1e-5),
    ("momentum", 0.1),
    ("affine", True),
    ("track_running_stats", True),
    ("device", None),
    ("dtype", None),
]
BASE_KEYWORDS = [("bias", True), ("decay", None), ("on_nonfinite", "skip")]


def changed(params, **defaults):
    return [(name, defaults.get(name, default)) for name, default in params]


# What each layer's constructor takes: the base's arguments with the layer's own in place. These were
# the explicit signatures before the layers shared one constructor.
SIGNATURES = {
    nk.BatchNorm: (BASE_POSITIONAL, BASE_KEYWORDS),
    nk.BatchNorm2d: (BASE_POSITIONAL, BASE_KEYWORDS),
    nk.InstanceNorm2d: (
        changed(BASE_POSITIONAL, affine=False, track_running_stats=False),
        BASE_KEYWORDS,
    ),
    nk.GhostBatchNorm: (
        [BASE_POSITIONAL[0], ("virtual_batch_size", 32), *BASE_POSITIONAL[1:]],
        BASE_KEYWORDS,
    ),
    nk.BatchRenorm2d: (
        changed(BASE_POSITIONAL, momentum=0.01),
        [*BASE_KEYWORDS, ("r_max", None), ("d_max", None)],
    ),
    nk.BatchLayerNorm: (
        changed(BASE_POSITIONAL, eps=1e-3),
        [*BASE_KEYWORDS, ("batch_size", None), ("divide_by_sqrt_features", True)],
    ),
    nk.BatchNormAct: (
        BASE_POSITIONAL,
        [*BASE_KEYWORDS, ("activation", "relu"), ("activation_param", 0.01), ("residual", False)],
    ),
    nk.InPlaceABN: (
        BASE_POSITIONAL,
        [
            *BASE_KEYWORDS,
            ("activation", "leaky_relu"),
            ("activation_param", 0.01),
            ("min_abs_weight", 1e-3),
            ("inplace", True),
        ],
    ),
    nk.BatchInstanceNorm: (BASE_POSITIONAL, BASE_KEYWORDS),
    nk.SwitchableNorm: (BASE_POSITIONAL, BASE_KEYWORDS),
    nk.SyncBatchNorm: (
        [*BASE_POSITIONAL[:5], ("process_group", None), *BASE_POSITIONAL[5:]],
        [*BASE_KEYWORDS, ("check_ranks", "auto"), ("timeout", None)],
    ),
}


@pytest.mark.parametrize("cls", list(SIGNATURES), ids=lambda c: c.__name__)
def test_signatures_read_as_if_spelled_out(cls):
    positional, keywords = SIGNATURES[cls]
    expected = [(n, P, d) for n, d in positional] + [(n, K, d) for n, d in keywords]
    for signature in (inspect.signature(cls), inspect.signature(cls.__init__)):
        params = [p for p in signature.parameters.values() if p.name != "self"]
        assert [(p.name, p.kind, p.default) for p in params] == expected


def test_positional_arguments_land_where_the_signature_says():
    ghost = nk.GhostBatchNorm(4, 8, 1e-3, 0.2, False, False)
    assert (ghost.virtual_batch_size, ghost.eps, ghost.momentum) == (8, 1e-3, 0.2)
    assert (ghost.affine, ghost.track_running_stats) == (False, False)
    bln = nk.BatchLayerNorm(4, 1e-2, 0.3, True, True, "cpu", torch.float64, batch_size=5)
    assert (bln.eps, bln.momentum, bln.weight.dtype, bln.batch_size) == (
        1e-2,
        0.3,
        torch.float64,
        5,
    )
    inorm = nk.InstanceNorm2d(4, 1e-3, 0.2, True, True)
    assert (inorm.eps, inorm.momentum, inorm.affine, inorm.track_running_stats) == (
        1e-3, 0.2, True, True
    )  # fmt: skip
    sync = nk.SyncBatchNorm(4, 1e-3, 0.2, True, True, None, "cpu", torch.float64)
    assert (sync.process_group, sync.running_mean.dtype) == (None, torch.float64)


class TwoGroupNorm(NormBase):
    """The base docstring's recipe: a positional extra, a keyword extra and a parameter of its own."""

    def __init__(self, num_features, groups: int = 2, *args, clip: float = 3.0, **kwargs):
        check_positive_int(groups, "groups")
        super().__init__(num_features, *args, **kwargs)
        self.groups, self.clip = groups, clip

    def _init_parameters(self, factory: dict) -> None:
        self.gate = nn.Parameter(torch.ones(self.num_features, **factory))

    def forward(self, input):
        return self._normalize(batch_norm, input) * self.gate.view(1, -1, 1)


def test_a_new_layer_declares_only_its_own():
    layer = TwoGroupNorm(6, 3, 1e-3, clip=2.0, dtype=torch.float64, decay=0.9)
    assert (layer.groups, layer.clip, layer.eps) == (3, 2.0, 1e-3)
    assert layer.momentum == pytest.approx(0.1) and layer.gate.dtype == torch.float64
    names = list(inspect.signature(TwoGroupNorm).parameters)
    assert names[:3] == ["num_features", "groups", "eps"] and names[-1] == "clip"
    assert set(layer.state_dict()) == {*nn.BatchNorm1d(6).state_dict(), "gate"}
    y = layer(torch.randn(5, 6, 4, dtype=torch.float64))
    assert int(layer.num_batches_tracked) == 1 and y.shape == (5, 6, 4)
    with pytest.raises(ConfigError, match="groups"):
        TwoGroupNorm(6, 0)
    with pytest.raises(ConfigError, match="num_features"):
        TwoGroupNorm(0)


FAMILY = [
    nk.BatchNorm2d,
    nk.InstanceNorm2d,
    nk.GhostBatchNorm,
    nk.BatchRenorm2d,
    nk.BatchLayerNorm,
    nk.BatchNormAct,
    nk.InPlaceABN,
    nk.BatchInstanceNorm,
    nk.SwitchableNorm,
    nk.SyncBatchNorm,
]


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_decay_replaces_the_default_momentum_and_never_an_explicit_one(cls):
    default = inspect.signature(cls).parameters["momentum"].default
    layer = cls(4)
    assert layer.momentum == default and type(layer.momentum) is float
    assert cls(4, decay=0.8).momentum == pytest.approx(0.2)
    for explicit in (float(default), 0.1, 0.01, None):  # the default's own value too
        with pytest.raises(ConfigError, match="either momentum .* or decay"):
            cls(4, momentum=explicit, decay=0.8)


def test_renorm_paper_momentum_with_decay_is_refused():
    """The trap: momentum=0.01 is Batch Renorm's default, and used to let decay= win silently."""
    assert nk.BatchRenorm2d(4).momentum == 0.01
    with pytest.raises(ConfigError, match="not both"):
        nk.BatchRenorm2d(4, momentum=0.01, decay=0.9)


@pytest.mark.parametrize("cls", [nk.BatchNorm2d, nk.GhostBatchNorm, nk.SyncBatchNorm])
def test_keras_momentum_warning_points_at_the_caller(cls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls(4, momentum=0.99)
    (warning,) = [w for w in caught if "decay=0.99" in str(w.message)]
    assert warning.filename == __file__


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_repr_shows_a_policy_other_than_skip(cls):
    assert "on_nonfinite" not in repr(cls(4))
    assert "on_nonfinite='raise'" in repr(cls(4, on_nonfinite="raise"))

"""``create_norm``: one factory for every normalization layer in normkit, by name, class or partial.

Model code that takes a ``norm_layer`` argument (as timm's and torchvision's do) can then switch
normalizers from a config string: ``create_norm("group:32", 256)``, ``create_norm("ghost:16", 64)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from normkit.errors import ConfigError
from normkit.nn import (
    BatchInstanceNorm,
    BatchLayerNorm,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    CrossIterationBatchNorm,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    MovingAverageBatchNorm,
    RMSNorm,
    RMSNorm2d,
    SwitchableNorm,
)

DEFAULT_GROUPS = 32  # Wu & He (2018), §4: G = 32 works well across models


def _sync_batch_norm():
    # normkit.distributed sits above nn in the import order; import it only when asked for.
    from normkit.distributed import SyncBatchNorm

    return SyncBatchNorm


@dataclass(frozen=True)
class _Spec:
    """How a name builds its layer: ``build(num_features, argument, **kw)``."""

    build: Callable[..., nn.Module]
    argument: str | None = None  # what the number after ':' means, if the name takes one
    layer: str = ""  # what is built, for the error message and the docs


def _plain(cls) -> Callable[..., nn.Module]:
    def build(num_features, argument, **kw):
        return cls(num_features, **kw)

    return build


def _group(num_features, groups, **kw):
    keyword = kw.pop("num_groups", None)
    return GroupNorm(groups or keyword or DEFAULT_GROUPS, num_features, **kw)


def _group_instance(num_features, argument, **kw):
    return GroupNorm(num_features, num_features, **kw)


def _ghost(num_features, size, **kw):
    if size is not None:
        kw["virtual_batch_size"] = size
    return GhostBatchNorm(num_features, **kw)


def _fitted_groups(num_features: int, limit: int = DEFAULT_GROUPS) -> int:
    """The largest number of groups up to ``limit`` that divides ``num_features``."""
    return max(g for g in range(1, min(limit, num_features) + 1) if num_features % g == 0)


def _evo_norm_s0(num_features, groups, **kw):
    if groups is None and "group_size" not in kw:
        groups = kw.pop("groups", None) or _fitted_groups(num_features)
    if groups is not None:
        kw["groups"] = groups
    return EvoNormS0(num_features, **kw)


def _cross_iteration(num_features, window, **kw):
    if window is not None:
        kw["window"] = window
    return CrossIterationBatchNorm(num_features, **kw)


def _sync(num_features, argument, **kw):
    return _sync_batch_norm()(num_features, **kw)


def _none(num_features, argument, **kw):
    return nn.Identity()


SPECS: dict[str, _Spec] = {
    "batch": _Spec(_plain(BatchNorm), layer="nk.BatchNorm (any rank)"),
    "batch1d": _Spec(_plain(BatchNorm1d), layer="nk.BatchNorm1d"),
    "batch2d": _Spec(_plain(BatchNorm2d), layer="nk.BatchNorm2d"),
    "batch3d": _Spec(_plain(BatchNorm3d), layer="nk.BatchNorm3d"),
    "group": _Spec(_group, "num_groups", "nk.GroupNorm(G, C), G = 32 by default"),
    "layer": _Spec(_plain(LayerNorm), layer="nk.LayerNorm(C), over the last dim"),
    "layer2d": _Spec(_plain(LayerNorm2d), layer="nk.LayerNorm2d(C), over dim 1"),
    "instance": _Spec(_plain(InstanceNorm2d), layer="nk.InstanceNorm2d (torch's defaults)"),
    "group_instance": _Spec(
        _group_instance, layer="nk.GroupNorm(C, C): instance normalization for any rank, with γ, β"
    ),
    "instance1d": _Spec(_plain(InstanceNorm1d), layer="nk.InstanceNorm1d"),
    "instance2d": _Spec(_plain(InstanceNorm2d), layer="nk.InstanceNorm2d"),
    "instance3d": _Spec(_plain(InstanceNorm3d), layer="nk.InstanceNorm3d"),
    "renorm": _Spec(_plain(BatchRenorm), layer="nk.BatchRenorm (any rank)"),
    "renorm1d": _Spec(_plain(BatchRenorm1d), layer="nk.BatchRenorm1d"),
    "renorm2d": _Spec(_plain(BatchRenorm2d), layer="nk.BatchRenorm2d"),
    "renorm3d": _Spec(_plain(BatchRenorm3d), layer="nk.BatchRenorm3d"),
    "ghost": _Spec(_ghost, "virtual_batch_size", "nk.GhostBatchNorm"),
    "batch_instance": _Spec(_plain(BatchInstanceNorm), layer="nk.BatchInstanceNorm"),
    "batch_layer": _Spec(_plain(BatchLayerNorm), layer="nk.BatchLayerNorm"),
    "switchable": _Spec(_plain(SwitchableNorm), layer="nk.SwitchableNorm"),
    "frozen": _Spec(_plain(FrozenBatchNorm), layer="nk.FrozenBatchNorm"),
    "sync": _Spec(_sync, layer="nk.SyncBatchNorm"),
    "rms": _Spec(_plain(RMSNorm), layer="nk.RMSNorm(C), over the last dim"),
    "rms2d": _Spec(_plain(RMSNorm2d), layer="nk.RMSNorm2d(C), over dim 1"),
    "frn": _Spec(_plain(FilterResponseNorm), layer="nk.FilterResponseNorm (with its TLU)"),
    "evonorm_b0": _Spec(_plain(EvoNormB0), layer="nk.EvoNormB0"),
    "evonorm_s0": _Spec(
        _evo_norm_s0, "groups", "nk.EvoNormS0, G = the largest divisor of C up to 32 by default"
    ),
    "mabn": _Spec(_plain(MovingAverageBatchNorm), layer="nk.MovingAverageBatchNorm"),
    "cbn": _Spec(_cross_iteration, "window", "nk.CrossIterationBatchNorm(C, window=k)"),
    "none": _Spec(_none, layer="torch.nn.Identity()"),
}
# Other spellings users reach for; normalized like the names (lowercase, '_' and '-' dropped).
ALIASES = {
    "bn": "batch",
    "batchnorm": "batch",
    "gn": "group",
    "groupnorm": "group",
    "ln": "layer",
    "layernorm": "layer",
    "layernorm2d": "layer2d",
    "in": "instance",
    "instancenorm": "instance",
    "batchrenorm": "renorm",
    "brn": "renorm",
    "ghostbatchnorm": "ghost",
    "gbn": "ghost",
    "batchinstancenorm": "batch_instance",
    "bin": "batch_instance",
    "batchlayernorm": "batch_layer",
    "bln": "batch_layer",
    "switchablenorm": "switchable",
    "sn": "switchable",
    "frozenbatchnorm": "frozen",
    "syncbatchnorm": "sync",
    "rmsnorm": "rms",
    "rmsnorm2d": "rms2d",
    "filterresponsenorm": "frn",
    "evonormb0": "evonorm_b0",
    "evob0": "evonorm_b0",
    "evonorms0": "evonorm_s0",
    "evos0": "evonorm_s0",
    "movingaveragebatchnorm": "mabn",
    "crossiterationbatchnorm": "cbn",
    "identity": "none",
}


def _normalized(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


_LOOKUP = {_normalized(name): name for name in SPECS} | {
    _normalized(alias): name for alias, name in ALIASES.items()
}


def valid_names() -> list[str]:
    """The spec names, with ``:N`` where the name takes a number."""
    return [name + (f"[:{spec.argument}]" if spec.argument else "") for name, spec in SPECS.items()]


def create_norm(
    spec: str | type | Callable[..., nn.Module] | None, num_features: int, **kwargs
) -> nn.Module:
    """Build a normalization layer for ``num_features`` channels from a name, a class or a partial.

    Names (case, ``_`` and ``-`` ignored; a number after ``:`` where shown):

    ================= ============================================================================
    ``batch``         ``nk.BatchNorm``; ``batch1d`` / ``batch2d`` / ``batch3d`` for torch's ranks
    ``group[:G]``     ``nk.GroupNorm(G, C)``, G = 32 unless given (or ``num_groups=``)
    ``layer``         ``nk.LayerNorm(C)``: over the last dim ((N, L, C) inputs, transformers)
    ``layer2d``       ``nk.LayerNorm2d(C)``: over the channels of (N, C, \\*) maps (ConvNeXt)
    ``instance``      ``nk.InstanceNorm2d`` (torch's defaults: no affine, no running
                      statistics); ``instance1d/3d`` for the other ranks
    ``group_instance`` ``nk.GroupNorm(C, C)``: one channel per group, which is instance
                      normalization for any rank with a per-channel γ, β (Wu & He 2018's IN)
    ``renorm``        ``nk.BatchRenorm``; ``renorm1d/2d/3d`` for the rank-checked ones
    ``ghost[:v]``     ``nk.GhostBatchNorm(C, virtual_batch_size=v)``
    ``batch_instance`` ``nk.BatchInstanceNorm``
    ``batch_layer``   ``nk.BatchLayerNorm``
    ``switchable``    ``nk.SwitchableNorm``
    ``frozen``        ``nk.FrozenBatchNorm``
    ``sync``          ``nk.SyncBatchNorm`` (from :mod:`normkit.distributed`, imported when asked)
    ``rms``           ``nk.RMSNorm(C)`` over the last dim; ``rms2d``: ``nk.RMSNorm2d(C)`` over dim 1
    ``frn``           ``nk.FilterResponseNorm`` (FRN + TLU)
    ``evonorm_b0``    ``nk.EvoNormB0``
    ``evonorm_s0[:G]`` ``nk.EvoNormS0(C, groups=G)``, G the largest divisor of C up to 32 unless
                      given
    ``mabn``          ``nk.MovingAverageBatchNorm``
    ``cbn[:k]``       ``nk.CrossIterationBatchNorm(C, window=k)`` (attach its producer:
                      ``nk.tools.convert(model, "cbn")`` does)
    ``none``          ``torch.nn.Identity()`` (also ``spec=None``)
    ================= ============================================================================

    The rank: a name builds normkit's any-rank layer (``batch`` is ``nk.BatchNorm``, which takes
    (N, C, \\*) of any rank, not ``nk.BatchNorm2d``); to get a rank-checked drop-in, name its rank
    (``batch2d``) or pass the class. ``kwargs`` go to the layer's constructor.

    A class, function or ``functools.partial`` is called as ``spec(num_features, **kwargs)``, the
    partial's keywords first and ``kwargs`` overriding them. GroupNorm classes, whose first argument
    is the number of groups, are called as ``spec(num_groups, num_features)`` with ``num_groups``
    from the keywords (default 32) unless the partial already binds it positionally.

    Raises:
        ConfigError (a ValueError): an unknown name (the message lists the valid ones), a number
            where the name takes none, or a number that is not a positive integer.

    Example::

        >>> import normkit as nk
        >>> nk.create_norm("group:8", 64).num_groups
        8
        >>> nk.create_norm("Ghost-BatchNorm", 64, momentum=0.01).virtual_batch_size
        32
        >>> type(nk.create_norm(nk.BatchNorm2d, 64)).__name__
        'BatchNorm2d'
    """
    if spec is None:
        return nn.Identity()
    if isinstance(spec, str):
        name, argument = _parse(spec)
        return SPECS[name].build(num_features, argument, **kwargs)
    if callable(spec):
        return _call(spec, num_features, kwargs)
    raise ConfigError(
        f"norm spec must be a name, a class, a function or a functools.partial, got "
        f"{type(spec).__name__}; valid names: {', '.join(valid_names())}"
    )


def _parse(spec: str) -> tuple[str, int | None]:
    text, _, number = spec.partition(":")
    name = _LOOKUP.get(_normalized(text))
    if name is None:
        raise ConfigError(
            f"unknown norm {spec!r}; valid names: {', '.join(valid_names())} (case, '_' and '-' "
            "are ignored), or pass a class or functools.partial"
        )
    if not number:
        if spec.endswith(":"):
            raise ConfigError(f"norm spec {spec!r} has ':' but no number after it")
        return name, None
    what = SPECS[name].argument
    if what is None:
        raise ConfigError(
            f"norm {name!r} takes no number, got {spec!r}; names that take one: "
            f"{', '.join(n for n in valid_names() if '[' in n)}"
        )
    if not number.strip().isdigit() or int(number) <= 0:
        raise ConfigError(
            f"the number in {spec!r} is the {what} and must be a positive integer, got {number!r}"
        )
    return name, int(number)


def _call(spec: Callable[..., nn.Module], num_features: int, kwargs: dict) -> nn.Module:
    func, args, keywords = spec, (), {}
    if isinstance(spec, functools.partial):  # unbind, so that kwargs override the partial's
        func, args, keywords = spec.func, spec.args, dict(spec.keywords)
    keywords.update(kwargs)
    if inspect.isclass(func) and issubclass(func, nn.GroupNorm) and not args:
        return func(keywords.pop("num_groups", DEFAULT_GROUPS), num_features, **keywords)
    return func(*args, num_features, **keywords)

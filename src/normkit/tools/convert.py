"""Replace the normalization layers of a model with another kind, carrying the state that carries over.

Typical uses: BatchNorm → GroupNorm for small per-device batches (Wu & He 2018), BatchNorm →
SyncBatchNorm for training across processes, BatchNorm → frozen BatchNorm for fine-tuning (the
statistics and γ/β become constants), BatchNorm → Batch Renorm (Ioffe 2017), and torch.nn's layers
↔ normkit's drop-ins.

What carries over is decided by meaning, not by name:

- γ and β (``weight``/``bias``) when both layers hold one scale and one shift per channel, applied
  after normalizing (BatchNorm, GroupNorm, InstanceNorm, LayerNorm over channels all do);
- running mean and variance, and the batch count, only between layers whose running statistics are
  the population statistics of the input per channel: the BatchNorm family (BatchNorm, SyncBatchNorm,
  Batch Renorm, Ghost BN, frozen BatchNorm). InstanceNorm's running statistics average per-sample
  statistics, another quantity; GroupNorm and LayerNorm have none;
- ``eps`` (and ``momentum`` between layers that have one), train/eval mode, device and dtype.

Every replacement is listed with what was carried and what was not. A layer shared by several parents
is replaced once and stays shared.

What a layer computes besides its normalization is kept: a BatchNorm + activation layer (normkit's
``BatchNormAct`` and ``InPlaceABN``, timm's ``BatchNormAct2d``) becomes a
:class:`~normkit.tools.NormAct` holding the new normalization, then the layer's drop module and
activation (a residual input too). A normalizer whose ``forward`` normkit does not know (a subclass
that overrides it) may compute anything, so it is left as it was and listed in ``skipped`` with the
reason, unless ``to`` is a callable, which then gets the layer itself and decides.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from normkit.errors import ConfigError, NormkitError
from normkit.tools import small_batch_convert
from normkit.tools._norms import (
    Split,
    has_running_stats,
    is_batch_norm,
    is_frozen_batch_norm,
    is_normalizer,
    num_channels,
    split,
)
from normkit.tools.norm_act import NormAct
from normkit.tools.small_batch_convert import small_batch_spec

# Specs handled here rather than by nk.create_norm: a change of library, not of normalizer.
_LIBRARY_SPECS = ("torch", "normkit")
_WHICH = ("batch", "all")
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# How a replacement gets its state: by meaning (carry_state), by sharing tensors, or by state_dict.
_HOW = {"sync": "shared", "torch": "state_dict", "normkit": "state_dict"}


@dataclass
class Replacement:
    """One layer replaced (at every path where it is registered)."""

    paths: list[str]
    source: str  # the old layer's class: nn.BatchNorm2d (torch.nn), nk.BatchNorm2d (normkit), ...
    target: str  # the new normalization's class (inside a NormAct when ``kept`` is not empty)
    carried: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # what follows the normalization, kept as it was


@dataclass
class Skipped:
    """A selected layer left as it was, and why."""

    paths: list[str]
    layer: str
    reason: str


class Replacements(list):
    """The list of :class:`Replacement` made by :func:`convert`; ``.skipped`` lists the selected
    layers left as they were, with the reason."""

    def __init__(self, items=(), skipped=None):
        super().__init__(items)
        self.skipped: list[Skipped] = list(skipped or [])

    def as_dict(self) -> dict:
        return {
            "replaced": [asdict(r) for r in self],
            "skipped": [asdict(s) for s in self.skipped],
        }


def class_name(module: nn.Module) -> str:
    """``nn.BatchNorm2d`` for torch.nn's layers, ``nk.BatchNorm2d`` for normkit's, else the full name."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn."):
        return f"nn.{cls.__qualname__}"
    if cls.__module__.startswith("normkit."):
        return f"nk.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _population_statistics(module: nn.Module) -> bool:
    return (is_batch_norm(module) or is_frozen_batch_norm(module)) and has_running_stats(module)


def _per_channel(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) and value.dim() == 1 else None


def carry_state(source: nn.Module, target: nn.Module) -> tuple[list[str], list[str]]:
    """Copy into ``target`` what means the same in ``source`` (module docstring); in place.

    Returns ``(carried, not_carried)``: names of the tensors and settings copied, and of the
    source's tensors that had no counterpart.
    """
    carried, not_carried = [], []
    with torch.no_grad():
        for name in ("weight", "bias"):
            mine, theirs = _per_channel(source, name), _per_channel(target, name)
            if mine is None:
                continue
            if theirs is not None and theirs.shape == mine.shape:
                theirs.copy_(mine)
                if isinstance(theirs, nn.Parameter):
                    theirs.requires_grad_(mine.requires_grad)
                carried.append(name)
            else:
                not_carried.append(name)
        statistics = [n for n in _STATISTICS if isinstance(getattr(source, n, None), torch.Tensor)]
        if _population_statistics(source) and _population_statistics(target):
            for name in statistics:
                theirs = getattr(target, name, None)
                if isinstance(theirs, torch.Tensor) and theirs.shape == getattr(source, name).shape:
                    theirs.copy_(getattr(source, name))
                    carried.append(name)
                else:
                    not_carried.append(name)
        else:
            not_carried.extend(statistics)
    for name in ("eps", "momentum"):
        value = getattr(source, name, None)
        if value is not None and isinstance(getattr(target, name, None), (int, float)):
            setattr(target, name, value)
            carried.append(name)
    return carried, not_carried


def _placement(module: nn.Module) -> dict:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    floating = [t for t in tensors if t.is_floating_point()]
    device = tensors[0].device if tensors else None
    return {"device": device, "dtype": floating[0].dtype if floating else None}


def _namesakes() -> dict[type, type]:
    """torch.nn layer -> normkit drop-in (normkit's subclass torch's, with the same state)."""
    import normkit as nk

    pairs = {
        nn.BatchNorm1d: nk.BatchNorm1d,
        nn.BatchNorm2d: nk.BatchNorm2d,
        nn.BatchNorm3d: nk.BatchNorm3d,
        nn.InstanceNorm1d: nk.InstanceNorm1d,
        nn.InstanceNorm2d: nk.InstanceNorm2d,
        nn.InstanceNorm3d: nk.InstanceNorm3d,
        nn.GroupNorm: nk.GroupNorm,
        nn.LayerNorm: nk.LayerNorm,
    }
    sync = getattr(nk, "SyncBatchNorm", None)
    if sync is not None:
        pairs[nn.SyncBatchNorm] = sync
    return pairs


def _constructor_arguments(module: nn.Module) -> tuple[tuple, dict]:
    from torch.nn.modules.batchnorm import _NormBase

    from normkit.nn._base import GROUP_NORM_HAS_BIAS, NORM_BASE_HAS_BIAS, bias_kwargs

    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.GroupNorm):
        args = (module.num_groups, module.num_channels, module.eps, module.affine)
        return args, bias_kwargs(GROUP_NORM_HAS_BIAS and module.affine, has_bias)
    if isinstance(module, nn.LayerNorm):
        affine = module.elementwise_affine
        args = (module.normalized_shape, module.eps, affine)
        return args, ({"bias": has_bias} if affine else {})
    if isinstance(module, _NormBase):
        args = (module.num_features, module.eps, module.momentum, module.affine)
        kwargs = {"track_running_stats": module.track_running_stats}
        kwargs.update(bias_kwargs(NORM_BASE_HAS_BIAS and module.affine, has_bias))
        return args, kwargs
    raise ConfigError(f"no constructor arguments known for {type(module).__name__}")


# torch.nn's BatchNorm by the rank of its input: (N, C) and (N, C, L) -> 1d, (N, C, H, W) -> 2d, ...
_TORCH_BATCH_NORM_BY_RANK = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def _change_library(module: nn.Module, to: str, rank: int | None = None) -> nn.Module | str:
    """The same layer from the other library, with the same state; or the reason there is none.
    ``rank``: the input rank seen in a forward, for normkit's any-rank BatchNorm."""
    import normkit as nk

    pairs = _namesakes()
    if to == "torch":
        pairs = {mine: theirs for theirs, mine in pairs.items()}
    cls = pairs.get(type(module))
    if cls is None and to == "torch" and type(module) is nk.BatchNorm:
        cls = _TORCH_BATCH_NORM_BY_RANK.get(rank)
        if cls is None:
            return (
                "nk.BatchNorm takes any rank and torch.nn's BatchNorm1d/2d/3d one each; pass "
                "example_inputs= so that normkit reads the rank from a forward"
                if rank is None
                else f"its input has rank {rank}, which no torch.nn BatchNorm takes"
            )
    if cls is None:
        other = "torch.nn" if to == "torch" else "normkit"
        return f"{type(module).__name__} has no namesake in {other}"
    args, kwargs = _constructor_arguments(module)
    if to == "torch" and issubclass(cls, nn.SyncBatchNorm):
        kwargs.pop("bias", None)
    new = cls(*args, **kwargs)
    new.load_state_dict(module.state_dict())
    for name, parameter in module.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(parameter.requires_grad)
    return new


def _to_sync(module: nn.Module) -> nn.Module | str:
    from normkit.distributed import to_sync_batch_norm

    new = to_sync_batch_norm(module)
    if new is module:
        return (
            f"{type(module).__name__} is not a plain BatchNorm: synchronizing it would turn its "
            "own maths (Batch Renorm, Ghost BN, frozen BN) into plain BatchNorm"
        )
    return new


def _to_frozen(module: nn.Module, **kwargs) -> nn.Module | str:
    import normkit as nk

    frozen = getattr(nk, "FrozenBatchNorm", None)
    if frozen is not None and is_batch_norm(module) and hasattr(frozen, "from_batch_norm"):
        if not has_running_stats(module):
            return "it keeps no running statistics (track_running_stats=False) to freeze"
        return frozen.from_batch_norm(module)
    return _create(module, "frozen", **kwargs)


def _create(module: nn.Module, spec: str, **kwargs) -> nn.Module | str:
    import normkit as nk

    create_norm = getattr(nk, "create_norm", None)
    if create_norm is None:
        raise ConfigError(
            f"convert(model, {spec!r}) needs nk.create_norm, which this normkit does not have; "
            "pass a callable that builds the new layer from the old one instead"
        )
    channels = num_channels(module)
    if channels is None:
        shape = getattr(module, "normalized_shape", None)
        if shape is not None and len(shape) == 1:
            channels = shape[0]
        else:
            return f"the number of channels of {type(module).__name__} is not known"
    return create_norm(spec, channels, **kwargs)


def _selector(which, to) -> Callable[[nn.Module], bool]:
    if which is None:
        which = "all" if to in _LIBRARY_SPECS else "batch"
    if callable(which) and not isinstance(which, type):
        return which
    if isinstance(which, type) or (
        isinstance(which, tuple) and all(isinstance(t, type) for t in which)
    ):
        return lambda module: isinstance(module, which)
    if which == "batch":
        return lambda module: is_batch_norm(module) or is_frozen_batch_norm(module)
    if which == "all":
        return is_normalizer
    raise ConfigError(
        f"which must be one of {_WHICH}, a layer class, a tuple of classes or a predicate, got "
        f"{which!r}"
    )


def convert(
    model: nn.Module,
    to: str | Callable[[nn.Module], nn.Module],
    *,
    which=None,
    inplace: bool = False,
    example_inputs=None,
    **kwargs,
) -> tuple[nn.Module, Replacements]:
    """Replace every selected normalization layer of ``model`` with another kind.

    Args:
        model: any model; it may itself be a normalization layer.
        to: what to build instead:

            - a spec of :func:`normkit.create_norm` (``"group:32"``, ``"layer"``, ``"renorm"``,
              ``"ghost:16"``, ``"batch"``, ``"none"``, ...), built with the old layer's channels
              and ``**kwargs``;
            - ``"frozen"``: frozen BatchNorm (``nk.FrozenBatchNorm.from_batch_norm``);
            - ``"sync"``: normkit's SyncBatchNorm (:func:`normkit.distributed.to_sync_batch_norm`;
              the new layer shares the old one's tensors);
            - ``"torch"`` / ``"normkit"``: the same layer from the other library (normkit's
              drop-ins and torch.nn's namesakes have the same ``state_dict``, copied whole).
              A BatchNorm + activation layer becomes the library's BatchNorm and torch.nn
              activation modules in a :class:`~normkit.tools.NormAct`: the form torch.ao's
              quantization fuses and quantizes (``convert(model, "torch")`` first);
            - ``"ws_gn[:G]"``, ``"mabn"``, ``"cbn[:k]"``: the small-batch remedies that change the
              convolutions too — Weight Standardization + GroupNorm, MABN with centred filters,
              Cross-Iteration BN attached to the layer that feeds it
              (:mod:`normkit.tools.small_batch_convert`);
            - a callable ``old_layer -> new_layer``; for a BatchNorm + activation layer it gets
              the normalization alone, and the activation is kept around what it builds.
        which: the layers to replace: ``"batch"`` (the BatchNorm family, frozen included; the
            default), ``"all"`` (every normalizer; the default for ``"torch"``/``"normkit"``), a
            class or tuple of classes, or a predicate ``module -> bool``.
        inplace: replace in ``model`` itself instead of a deep copy. Every new layer is built
            before any is put in place, so an error leaves the model as it was.
        example_inputs: a tensor or tuple of the forward's inputs; with ``"torch"``, the input
            rank of normkit's any-rank ``nk.BatchNorm`` (and its BatchNorm + activation layers)
            is read from one forward on them, to pick torch's BatchNorm1d/2d/3d.
        **kwargs: passed to ``nk.create_norm`` (or to the callable).

    Returns:
        ``(new_model, replacements)``: a list of :class:`Replacement` (paths, old and new class,
        what was carried and what was not, what was kept beside the normalization);
        ``replacements.skipped`` lists the selected layers left as they were, with the reason
        (among them every normalizer whose forward normkit does not know).

    Example::

        >>> import torch, normkit as nk
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> new, replaced = nk.tools.convert(model, "normkit")
        >>> type(new[1]).__name__, replaced[0].paths, replaced[0].carried
        ('BatchNorm2d', ['1'], ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'])
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (callable(to) or isinstance(to, str)):
        raise ConfigError(f"to must be a spec string or a callable, got {type(to).__name__}")
    if small_batch_spec(to) is not None:  # "ws_gn", "mabn", "cbn": convolutions change too
        return _convert_for_small_batches(model, to, which, inplace, example_inputs, kwargs)
    select = _selector(which, to)
    target = model if inplace else copy.deepcopy(model)
    ranks = _input_ranks(target, example_inputs, select) if example_inputs is not None else {}
    replacements = Replacements()
    done: dict[int, tuple[nn.Module, Replacement | Skipped | None]] = {}

    def replace(module: nn.Module, path: str) -> nn.Module:
        if id(module) in done:
            new, record = done[id(module)]
            if record is not None:
                record.paths.append(path)
            return new
        if not select(module):
            done[id(module)] = (module, None)
            return module
        parts = split(module)
        if isinstance(parts, str) and callable(to):
            parts = Split(module)  # the callable gets the layer itself and decides
        if isinstance(parts, str):
            return skip(module, path, parts)
        try:
            built = _build(parts.norm, to, rank=ranks.get(id(module)), **kwargs)
        except NormkitError as error:  # name the layer; nothing has been replaced yet
            raise type(error)(f"converting '{path or '(model)'}' to {to!r}: {error}") from None
        if isinstance(built, str) and parts.norm is not module and _in_library(parts.norm, to):
            built = parts.norm  # splitting the layer was the whole change of library
        if isinstance(built, str):
            return skip(module, path, built)
        if built is not parts.norm and type(built) is type(parts.norm):
            return skip(module, path, f"it is already {type(module).__name__}")
        how = _HOW.get(to, "meaning") if isinstance(to, str) else "meaning"
        if built is parts.norm:
            how = "state_dict"
        record = _finish(parts.norm, built, path, how)
        record.source = class_name(module)
        if not parts.plain:
            built = NormAct(built, parts.drop, parts.act, residual=parts.residual)
            built.train(module.training)
            record.kept = list(parts.kept)
        replacements.append(record)
        done[id(module)] = (built, record)
        return built

    def skip(module: nn.Module, path: str, reason: str) -> nn.Module:
        skipped = Skipped([path], class_name(module), reason)
        replacements.skipped.append(skipped)
        done[id(module)] = (module, skipped)
        return module

    plan: list[tuple[nn.Module, str, nn.Module]] = []  # applied only once every layer is built

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}.{name}" if prefix else name
            seen = id(child) in done
            new = replace(child, path)
            if new is not child:
                plan.append((parent, name, new))
            elif not seen:
                walk(child, path)

    root = replace(target, "")
    if root is target:
        walk(target, "")
    for parent, name, new in plan:
        setattr(parent, name, new)
    return root, replacements


def _convert_for_small_batches(model, to, which, inplace, example_inputs, kwargs):
    """``"ws_gn[:G]"``, ``"mabn"``, ``"cbn[:k]"``: the normalizations, then the convolutions
    (:mod:`normkit.tools.small_batch_convert`)."""
    name, number = small_batch_spec(to)
    target = model if inplace else copy.deepcopy(model)
    selected = small_batch_convert.selector(which)
    producers, unfed, pick = {}, [], selected
    if name == "cbn":  # only the layers that a convolution or linear layer alone feeds
        producers, unfed = small_batch_convert.cross_iteration_targets(
            target, selected, example_inputs
        )
        paths = {id(m): p for p, m in target.named_modules()}
        pick = lambda m: selected(m) and paths.get(id(m)) in producers  # noqa: E731
    kw = {} if name == "cbn" else kwargs  # for "cbn" the keywords build the layers
    spec = small_batch_convert.norm_spec(name, number, target, selected, **kwargs)
    target, replaced = convert(target, spec, which=pick, inplace=True, **kw)
    if name == "cbn":
        small_batch_convert.attach_producers(
            target, [p for r in replaced for p in r.paths], producers
        )
        modules = dict(target.named_modules())
        for path in unfed:
            layer = type(modules[path]).__name__
            replaced.skipped.append(Skipped([path], layer, small_batch_convert.UNFED_REASON))
    for path, cls, carried in small_batch_convert.transform_convolutions(name, target):
        replaced.append(Replacement([path], "nn.Conv2d", f"nk.{cls}", carried))
    return target, replaced


def _in_library(module: nn.Module, to) -> bool:
    """Whether ``module`` is already from the library ``to`` names ("torch" / "normkit")."""
    library = {"torch": "torch.", "normkit": "normkit."}.get(to) if isinstance(to, str) else None
    return library is not None and type(module).__module__.startswith(library)


def _input_ranks(model: nn.Module, example_inputs, select) -> dict[int, int]:
    """id(layer) -> the rank of its input in one forward on ``example_inputs`` (statistics kept)."""
    from normkit.nn.snapshot import frozen_running_stats
    from normkit.tools._graph import as_inputs

    ranks: dict[int, int] = {}

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(id(module), args[0].dim())

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if select(m)]
    inputs = tuple(
        x.clone() if isinstance(x, torch.Tensor) else x for x in as_inputs(example_inputs)
    )
    try:
        with torch.no_grad(), frozen_running_stats(model):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ranks


def _build(module: nn.Module, to, rank: int | None = None, **kwargs) -> nn.Module | str:
    if callable(to):
        return to(module, **kwargs)
    if to in _LIBRARY_SPECS:
        return _change_library(module, to, rank)
    if to == "sync":
        return _to_sync(module)
    if to == "frozen":
        return _to_frozen(module, **kwargs)
    return _create(module, to, **kwargs)


def _finish(source: nn.Module, target: nn.Module, path: str, how: str) -> Replacement:
    """Place ``target`` where ``source`` was (device, dtype, mode) and record what it carries."""
    placement = _placement(source)
    if placement["device"] is not None:
        target.to(device=placement["device"])
    if placement["dtype"] is not None:
        target.to(dtype=placement["dtype"])
    if how == "meaning":
        carried, not_carried = carry_state(source, target)
    else:  # "shared" tensors (sync) or the whole "state_dict" (a change of library)
        carried = [name for name, _ in source.named_parameters(recurse=False)]
        carried += [
            name
            for name, b in source.named_buffers(recurse=False)
            if b is not None and name in source.state_dict()
        ]
        not_carried = []
        if getattr(source, "on_nonfinite", None) is not None and not hasattr(
            target, "on_nonfinite"
        ):
            not_carried.append("on_nonfinite")
    target.train(source.training)
    return Replacement([path], class_name(source), class_name(target), carried, not_carried)


def freeze(model: nn.Module, *, which=None, inplace: bool = False):
    """Freeze every BatchNorm for fine-tuning: ``convert(model, "frozen")``.

    Frozen BatchNorm (Wu & Johnson 2021, §4: "FrozenBN" for the last epochs, and the standard for
    fine-tuning detectors) is the eval-mode map of Algorithm 2 with γ, β, μ, σ² as constants: it
    neither uses batch statistics nor updates running ones, whatever ``model.train()`` says.
    A BatchNorm + activation layer keeps its activation (and drop path, residual) after the frozen
    BatchNorm, in a :class:`~normkit.tools.NormAct`; a normalizer whose forward normkit does not
    know is left as it was and listed in ``replacements.skipped``.
    Returns ``(new_model, replacements)`` as :func:`convert`.
    """
    return convert(model, "frozen", which=which, inplace=inplace)

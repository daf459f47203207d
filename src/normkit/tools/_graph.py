"""Which layer feeds each normalizer: the data flow of a model, read with torch.fx.

Folding a BatchNorm into the convolution before it, or removing the bias before it, is only correct
when that convolution's output goes to the BatchNorm and nowhere else, and when nothing else uses the
convolution. Module order says nothing about that (a residual block registers its layers in any order
and adds a shortcut between them), so the tools trace the forward with torch.fx and read the graph.

Normalizers and every normkit module are leaves of the trace (recorded as one call each). When a model
cannot be traced (Python control flow on tensor values, for example), the tools fall back to what is
certain without a trace: inside an ``nn.Sequential`` each child's output goes only to the next child.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from normkit.tools._norms import is_normalizer

# Layers with a weight whose output channels a per-channel affine map can be folded into.
WEIGHTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d, nn.Linear)  # fmt: skip


def as_inputs(example_inputs) -> tuple | None:
    """A forward's positional inputs as a tuple: one tensor, or a tuple/list of them, or None."""
    if example_inputs is None:
        return None
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


class NormTracer(fx.Tracer):
    """torch.fx's tracer with every normalizer and every normkit module kept as one call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        from normkit.tools.norm_act import NormAct

        if isinstance(module, NormAct):  # traced through: its norm, drop and act are calls
            return False
        return (
            super().is_leaf_module(module, qualified_name)
            or is_normalizer(module)
            or type(module).__module__.startswith("normkit.")
        )


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as a GraphModule (same submodules, by the same names); raises what fx raises."""
    graph = NormTracer().trace(model)
    name = type(model).__name__
    module = fx.GraphModule(model, graph, class_name=name)
    module.training = model.training  # the root's flag only: submodules keep their own modes
    return module


@dataclass
class Site:
    """One call of a normalizer, and the layer whose output is its input (when there is one that the
    tools may change for this normalizer alone)."""

    norm: str  # qualified name of the normalizer
    producer: str | None = None  # qualified name of the Conv/Linear feeding it, when usable
    obstacle: str | None = None  # why the producer cannot be changed for this call alone
    node: fx.Node | None = None
    producer_node: fx.Node | None = None
    index: int | None = None  # position in its Sequential (fallback only)
    parent: str | None = None  # the Sequential's name (fallback only)
    candidate: str | None = None  # the Conv/Linear feeding it, usable or not
    producer_shape: torch.Size | None = None  # its output shape, when example inputs were given


def _describe(node) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the model's input '{node.target}'"
    if node.op == "call_module":
        return f"'{node.target}'"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "get_attr":
        return f"the attribute '{node.target}'"
    return str(node)


def _tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> names of other modules that hold one of its parameters (weight tying)."""
    owners: dict[int, set[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), set()).add(module_name)
    tied: dict[str, list[str]] = {}
    for names in owners.values():
        if len(names) > 1:
            for name in names:
                tied.setdefault(name, []).extend(sorted(names - {name}))
    return tied


def _takes_residual(module: nn.Module) -> bool:
    """normkit's BatchNormAct built with ``residual=True``: its second input is added after the
    normalization, so the first is still the normalized one."""
    import normkit as nk

    layer = getattr(nk, "BatchNormAct", None)
    return layer is not None and isinstance(module, layer) and getattr(module, "residual", False)


def _other_users(node: fx.Node, keep: fx.Node) -> str:
    return ", ".join(_describe(user) for user in node.users if user is not keep)


def graph_sites(module: fx.GraphModule, select: Callable[[nn.Module], bool]) -> list[Site]:
    """Every call of a selected normalizer in the traced forward, with its producer or obstacle."""
    modules = dict(module.named_modules())
    calls = Counter(n.target for n in module.graph.nodes if n.op == "call_module")
    attributes = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    tied = _tied_parameters(module)
    sites = []
    for node in module.graph.nodes:
        if node.op != "call_module" or not select(modules[node.target]):
            continue
        site = Site(norm=node.target, node=node)
        sites.append(site)
        source = node.args[0] if node.args else node.kwargs.get("input")
        allowed = 2 if _takes_residual(modules[node.target]) else 1
        if len(node.args) + len(node.kwargs) > allowed or not set(node.kwargs) <= {
            "input",
            "residual",
        }:
            site.obstacle = "it is called with more than one argument"
            continue
        if not isinstance(source, fx.Node) or source.op != "call_module":
            site.obstacle = f"its input comes from {_describe(source)}, not from a Conv or Linear"
            continue
        producer = modules[source.target]
        if not isinstance(producer, WEIGHTED_LAYERS):
            site.obstacle = (
                f"its input comes from {_describe(source)} ({type(producer).__name__}), not from a "
                "Conv or Linear"
            )
            continue
        site.candidate = source.target
        if len(source.users) > 1:
            site.obstacle = (
                f"'{source.target}' also feeds {_other_users(source, node)}, which must keep "
                "seeing its unchanged output"
            )
        elif calls[source.target] > 1:
            site.obstacle = (
                f"'{source.target}' is called {calls[source.target]} times in forward; changing "
                "its weights would change its other calls"
            )
        elif source.target in tied:
            site.obstacle = (
                f"the parameters of '{source.target}' are shared with "
                f"{', '.join(repr(n) for n in tied[source.target])}"
            )
        elif any(a == source.target or a.startswith(source.target + ".") for a in attributes):
            site.obstacle = f"forward also reads the parameters of '{source.target}' directly"
        else:
            site.producer, site.producer_node = source.target, source
    return sites


def sequential_sites(
    model: nn.Module, select: Callable[[nn.Module], bool], trace_error: str
) -> list[Site]:
    """Without a trace: only a Sequential's previous child is known to feed a normalizer alone."""
    occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    tied = _tied_parameters(model)
    sites, placed = [], set()
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for index, (child_name, child) in enumerate(children):
            if not select(child):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            placed.add(id(child))
            site = Site(norm=name, index=index, parent=parent_name)
            sites.append(site)
            if occurrences[id(child)] > 1:
                site.obstacle = "it is registered in more than one place in the model"
                continue
            if index == 0:
                site.obstacle = f"it is the first layer of the Sequential '{parent_name}'"
                continue
            producer_name, producer = children[index - 1]
            path = f"{parent_name}.{producer_name}" if parent_name else producer_name
            if not isinstance(producer, WEIGHTED_LAYERS):
                site.obstacle = (
                    f"its input comes from '{path}' ({type(producer).__name__}), not from a Conv "
                    "or Linear"
                )
                continue
            site.candidate = path
            if occurrences[id(producer)] > 1:
                site.obstacle = f"'{path}' is registered in more than one place in the model"
            elif path in tied:
                site.obstacle = f"the parameters of '{path}' are shared with {tied[path]}"
            else:
                site.producer = path
    for name, module in model.named_modules():
        if select(module) and id(module) not in placed:
            sites.append(
                Site(
                    norm=name,
                    obstacle=(
                        "the model could not be traced with torch.fx "
                        f"({trace_error}) and the layer is not inside an nn.Sequential"
                    ),
                )
            )
    return sites


def find_sites(
    model: nn.Module, select: Callable[[nn.Module], bool], example_inputs: tuple | None
) -> tuple[list[Site], fx.GraphModule | None, str | None]:
    """The calls of the selected normalizers and their producers: ``(sites, graph_module,
    trace_error)``. ``graph_module`` is None when the model does not trace; with example inputs,
    each usable producer's output shape is filled in."""
    if example_inputs is not None:  # copies: a model may write over its input (InPlaceABN first)
        example_inputs = tuple(
            x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs
        )
    try:
        graph_module = trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...)
        trace_error = f"{type(error).__name__}: {error}"
        sites = sequential_sites(model, select, trace_error)
        if example_inputs is not None:
            names = [site.producer for site in sites if site.producer is not None]
            found = output_shapes(model, example_inputs, names)
            for site in sites:
                site.producer_shape = found.get(site.producer)
        return sites, None, trace_error
    sites = graph_sites(graph_module, select)
    if example_inputs is not None:
        found = shapes(graph_module, example_inputs)
        for site in sites:
            if site.producer_node is not None:
                site.producer_shape = found.get(site.producer_node.name)
    return sites, graph_module, None


def channel_obstacle(norm: nn.Module, producer: nn.Module, shape: torch.Size | None) -> str | None:
    """Why ``producer``'s output channels are not ``norm``'s channels (dim 1); None when they are."""
    from normkit.tools._norms import num_channels

    linear = isinstance(producer, nn.Linear)
    outputs = producer.out_features if linear else producer.out_channels
    channels = num_channels(norm)
    if channels != outputs:
        return f"it has {channels} channels but its producer has {outputs} outputs"
    if linear:
        # A BatchNorm normalizes dim 1, which is the Linear's output features only for (N, features).
        if shape is None:
            return (
                "a Linear's outputs are a BatchNorm's channels only when its output is "
                "(N, features); pass example_inputs so that normkit can check the shapes"
            )
        if len(shape) != 2:
            return (
                f"the Linear's output has shape {tuple(shape)}: the BatchNorm normalizes dim 1, "
                "not the Linear's features"
            )
    elif shape is not None and len(shape) < 3:
        return f"the convolution runs unbatched (output shape {tuple(shape)})"
    return None


def shapes(module: fx.GraphModule, example_inputs: tuple) -> dict[str, torch.Size]:
    """Output shape of every node for the example inputs (the running statistics stay as they were)."""
    from torch.fx.passes.shape_prop import ShapeProp

    from normkit.nn.snapshot import frozen_running_stats

    with torch.no_grad(), frozen_running_stats(module):
        ShapeProp(module).propagate(*example_inputs)
    found = {}
    for node in module.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            found[node.name] = meta.shape
    return found


def output_shapes(model: nn.Module, example_inputs: tuple, names: list[str]) -> dict:
    """Output shape of the named submodules for the example inputs, read with forward hooks."""
    from normkit.nn.snapshot import frozen_running_stats

    found: dict[str, torch.Size] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def record(_module, _args, output, name=name):
            if isinstance(output, torch.Tensor):
                found.setdefault(name, output.shape)

        handles.append(modules[name].register_forward_hook(record))
    try:
        with torch.no_grad(), frozen_running_stats(model):
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found

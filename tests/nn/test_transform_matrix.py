"""The transform matrix: every public layer x every transform PyTorch offers (issue 20).

Each cell either works — and gives the numbers eager mode gives on a copy of the layer: outputs,
gradients, running statistics — or is a refusal the layer declares (``transform_refusals``, made of
:class:`normkit.functional._transforms.Refusal`) and raises with the declared message. The layers
come from ``normkit.__all__``, so a layer added later joins the matrix by being exported; one whose
constructor or input is not the default ``cls(4)`` on an (N, C, H, W) input declares an example in
``EXAMPLES``. docs/transforms.md publishes the table made from the same declarations
(``test_docs_table_is_current``; ``python tests/nn/test_transform_matrix.py`` rewrites it).

Cost on 2 cores: Dynamo's ``eager`` backend checks "no graph break" in every compile cell; inductor's
numerics run once, on one model of the layers the family test does not compile
(``test_inductor_numerics``); shapes are tiny.

Tolerances: cells compare two computations of the same float32 maths (ATen's kernels, normkit's
composite reference forms, Dynamo's and the exporters' graphs, onnxruntime's kernels), which round
differently: within helpers.TOLERANCES[float32] (1e-5 of the values' scale). Double backward compares
the default backend in float32 with the float64 reference; second derivatives of a normalization
cancel three O(1) terms twice, observed <= 2e-6 of the scale: the same bound holds.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import normkit as nk
from helpers import assert_close, make_input, randomize_parameters
from normkit.errors import UnsupportedTransformError
from normkit.functional._transforms import TRANSFORMS, VMAP_RUNNING_STATISTICS, Refusal

DOCS = Path(__file__).resolve().parents[2] / "docs" / "transforms.md"
F32 = torch.float32


# --- the layers and their examples ----------------------------------------------------------------


def public_layers() -> list[type[nn.Module]]:
    """Every layer class normkit exports."""
    classes = {getattr(nk, name) for name in nk.__all__}
    return sorted(
        (c for c in classes if isinstance(c, type) and issubclass(c, nn.Module)),
        key=lambda c: c.__name__,
    )


@dataclass(frozen=True)
class Example:
    """One configuration of a layer and the shape of its input."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...] = (4, 4, 3, 3)

    def make(self, training: bool) -> nn.Module:
        layer = self.build()
        randomize_state(layer)
        return layer.train(training)

    def input(self, seed: int = 0) -> torch.Tensor:
        return make_input(self.shape, seed=seed)

    def __str__(self) -> str:
        return self.name


ONE_D, THREE_D = (4, 4, 5), (2, 4, 2, 3, 3)

# Layers whose example is not cls(4) on a (4, 4, 3, 3) input, and extra configurations of some.
EXAMPLES: dict[str, list[Example]] = {
    "BatchNorm1d": [Example("BatchNorm1d", lambda: nk.BatchNorm1d(4), ONE_D)],
    "BatchNorm3d": [Example("BatchNorm3d", lambda: nk.BatchNorm3d(4), THREE_D)],
    "BatchNorm2d": [
        Example("BatchNorm2d", lambda: nk.BatchNorm2d(4)),
        Example("BatchNorm2d(momentum=None)", lambda: nk.BatchNorm2d(4, momentum=None)),
        Example(
            "BatchNorm2d(track_running_stats=False)",
            lambda: nk.BatchNorm2d(4, track_running_stats=False),
        ),
        Example(
            "BatchNorm2d(on_nonfinite='raise')", lambda: nk.BatchNorm2d(4, on_nonfinite="raise")
        ),
    ],
    "BatchRenorm": [Example("BatchRenorm", lambda: nk.BatchRenorm(4, r_max=1.5, d_max=0.5))],
    "BatchRenorm1d": [
        Example("BatchRenorm1d", lambda: nk.BatchRenorm1d(4, r_max=1.5, d_max=0.5), ONE_D)
    ],
    "BatchRenorm2d": [Example("BatchRenorm2d", lambda: nk.BatchRenorm2d(4, r_max=1.5, d_max=0.5))],
    "BatchRenorm3d": [
        Example("BatchRenorm3d", lambda: nk.BatchRenorm3d(4, r_max=1.5, d_max=0.5), THREE_D)
    ],
    "BatchNormAct": [
        Example("BatchNormAct", lambda: nk.BatchNormAct(4)),
        Example("BatchNormAct(silu)", lambda: nk.BatchNormAct(4, activation="silu")),
    ],
    "GhostBatchNorm": [
        Example("GhostBatchNorm", lambda: nk.GhostBatchNorm(4, virtual_batch_size=2))
    ],
    "GroupNorm": [Example("GroupNorm", lambda: nk.GroupNorm(2, 4))],
    "InstanceNorm1d": [Example("InstanceNorm1d", lambda: nk.InstanceNorm1d(4), ONE_D)],
    "InstanceNorm2d": [
        Example("InstanceNorm2d", lambda: nk.InstanceNorm2d(4)),
        Example(
            "InstanceNorm2d(affine, track_running_stats)",
            lambda: nk.InstanceNorm2d(4, affine=True, track_running_stats=True),
        ),
    ],
    "InstanceNorm3d": [
        Example("InstanceNorm3d", lambda: nk.InstanceNorm3d(4, affine=True), THREE_D)
    ],
    "LayerNorm": [Example("LayerNorm", lambda: nk.LayerNorm(3))],
    # eps=None is the machine epsilon of the input's dtype: float32's and the float64 reference's
    # would differ, and double backward would compare two functions (|diff| 1e-4 of the scale)
    "RMSNorm": [Example("RMSNorm", lambda: nk.RMSNorm(3, eps=1e-6))],
    "EvoNormS0": [Example("EvoNormS0", lambda: nk.EvoNormS0(4, groups=2))],
    "StdConv2d": [Example("StdConv2d", lambda: nk.StdConv2d(4, 4, 3, padding=1))],
    "ScaledStdConv2d": [Example("ScaledStdConv2d", lambda: nk.ScaledStdConv2d(4, 4, 3, padding=1))],
    # compensate=True needs the producer's weight, from which the input must come (its own tests)
    "CrossIterationBatchNorm": [
        Example(
            "CrossIterationBatchNorm(compensate=False)",
            lambda: nk.CrossIterationBatchNorm(4, compensate=False),
        ),
        Example(
            "CrossIterationBatchNorm(window=1)", lambda: nk.CrossIterationBatchNorm(4, window=1)
        ),
    ],
    "CenteredConv2d": [Example("CenteredConv2d", lambda: nk.CenteredConv2d(4, 4, 3, padding=1))],
}


def examples() -> list[Example]:
    found = []
    for cls in public_layers():
        found += EXAMPLES.get(cls.__name__, [Example(cls.__name__, lambda cls=cls: cls(4))])
    return found


def randomize_state(layer: nn.Module) -> None:
    """Parameters, running statistics and frozen buffers away from their defaults, so that no cell
    can pass by ignoring them; gates inside their range."""
    randomize_parameters(layer)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, buffer in layer.named_buffers():
            if not buffer.is_floating_point():
                continue
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0, generator=generator)
            else:  # running_mean, and FrozenBatchNorm's weight and bias
                buffer.uniform_(-1.0, 1.0, generator=generator)
        if isinstance(layer, nk.BatchInstanceNorm):
            layer.rho.uniform_(0.2, 0.8, generator=generator)


def refusal_for(layer: nn.Module, transform: str, training: bool) -> Refusal | None:
    for refusal in getattr(type(layer), "transform_refusals", ()):
        if refusal.covers(transform, training, layer):
            return refusal
    return None


# --- comparisons ------------------------------------------------------------------------------------


def output_grad(shape, seed=5) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_same_state(actual: nn.Module | dict, expected: nn.Module, what: str) -> None:
    """Every buffer (running statistics, counters) of ``expected`` equals ``actual``'s."""
    mine = dict(actual.named_buffers()) if isinstance(actual, nn.Module) else actual
    for name, buffer in expected.named_buffers():
        if buffer.is_floating_point():
            assert_close(mine[name], buffer, F32, f"{what}: buffer {name}")
        else:
            assert torch.equal(mine[name].cpu(), buffer), f"{what}: buffer {name}"


def eager_grads(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor, run=None):
    """Output, input gradient and parameter gradients of sum(layer(x) * weights): eagerly on the
    ``native`` backend (ATen's numbers, torch.nn's), or through ``run`` (e.g. the layer compiled,
    on the default backend)."""
    leaf = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with nk.backend("native" if run is None else "auto"):
        y = (layer if run is None else run)(leaf.clone())  # InPlaceABN may overwrite its input
        (y * weights).sum().backward()
    return y.detach(), leaf.grad, {n: p.grad for n, p in layer.named_parameters()}


def eager(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eager output on the ``native`` backend, the reference each transform is held to."""
    with nk.backend("native"):
        return layer(x.clone())


@contextlib.contextmanager
def quiet():
    """Tracing and exporting warn about what they cannot record (torch.nn's layers too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- the cells ----------------------------------------------------------------------------------------


def check_eager(example, layer, training):
    x = example.input().requires_grad_()
    y = layer(x.clone())
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y * output_grad(y.shape)).sum().backward()
    assert torch.isfinite(x.grad).all()


def check_compile(example, layer, training):
    torch._dynamo.reset()  # every cell compiles afresh: no recompile limit, no cached graph
    twin = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    for seed in (1, 2):
        x, weights = example.input(seed), output_grad(example.shape, seed)
        y, dx, grads = eager_grads(layer, x, weights, run=compiled)
        y_twin, dx_twin, grads_twin = eager_grads(twin, x, weights)
        assert_close(y, y_twin, F32, "output")
        assert_close(dx, dx_twin, F32, "input grad")
        for name, grad in grads.items():
            assert_close(grad, grads_twin[name], F32, f"grad of {name}")
        assert_same_state(layer, twin, f"step {seed}")


def check_grad(example, layer, training):
    twin = copy.deepcopy(layer)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    buffers = dict(layer.named_buffers())
    x, weights = example.input(1), output_grad(example.shape)

    def loss(p, inp):
        return (torch.func.functional_call(layer, (p, buffers), (inp,)) * weights).sum()

    grad_params, grad_x = torch.func.grad(loss, argnums=(0, 1))(params, x)
    _, dx, grads = eager_grads(twin, x, weights)
    assert_close(grad_x, dx, F32, "input grad")
    for name, grad in grads.items():
        assert_close(grad_params[name], grad, F32, f"grad of {name}")
    assert_same_state(layer, twin, "after the step")  # grad updates the running statistics


def per_sample_grads(layer, x, weights):
    """Opacus-style per-sample gradients: vmap over the batch of grad of each sample's loss."""
    params = {n: p.detach() for n, p in layer.named_parameters()}
    buffers = dict(layer.named_buffers())

    def loss(p, sample, weight):
        y = torch.func.functional_call(layer, (p, buffers), (sample.unsqueeze(0),))
        return (y * weight.unsqueeze(0)).sum()

    return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(
        params, x, weights
    )


def assert_per_sample_grads_match_a_loop(layer, x, weights):
    grad_params, grad_x = per_sample_grads(layer, x, weights)
    for i in range(x.shape[0]):
        _, dx, grads = eager_grads(copy.deepcopy(layer), x[i : i + 1], weights[i : i + 1])
        assert_close(grad_x[i : i + 1], dx, F32, f"sample {i}: input grad")
        for name, grad in grads.items():
            assert_close(grad_params[name][i], grad, F32, f"sample {i}: grad of {name}")


def check_vmap(example, layer, training):
    x, weights = example.input(1), output_grad(example.shape)
    assert_per_sample_grads_match_a_loop(layer, x, weights)


def check_jvp(example, layer, training):
    """Forward-mode AD through functional_call, w.r.t. the input and the parameters: <u, J v>
    equals <J^T u, v> from eager backward on a copy."""
    twin = copy.deepcopy(layer)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    buffers = dict(layer.named_buffers())
    x = example.input(1)
    tangent_x = output_grad(example.shape, 7)
    tangent_params = {n: torch.randn_like(p) for n, p in params.items()}

    def forward(p, inp):
        return torch.func.functional_call(layer, (p, buffers), (inp,))

    y, jv = torch.func.jvp(forward, (params, x), (tangent_params, tangent_x))
    u = output_grad(example.shape, 9)
    y_twin, dx, grads = eager_grads(twin, x, u)
    assert_close(y, y_twin, F32, "output")
    expected = (dx * tangent_x).sum() + sum((grads[n] * tangent_params[n]).sum() for n in params)
    assert_close((u * jv).sum(), expected, F32, "<u, Jv> against <J^T u, v>")
    assert_same_state(layer, twin, "after the step")


def check_functional_call(example, layer, training):
    """Other parameters and buffers, given by name: the numbers of a layer holding them, whose own
    state is left alone."""
    own = copy.deepcopy(dict(layer.named_buffers())), copy.deepcopy(dict(layer.named_parameters()))
    params = {n: torch.randn_like(p) * 0.3 + 1 for n, p in layer.named_parameters()}
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    with torch.no_grad():
        for buffer in buffers.values():
            if buffer.is_floating_point():
                buffer.mul_(1.5).add_(0.25)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        for name, value in params.items():
            twin.get_parameter(name).copy_(value)
        for name, value in buffers.items():
            twin.get_buffer(name).copy_(value)
    x = example.input(1)
    y = torch.func.functional_call(layer, (params, buffers), (x.clone(),))
    assert_close(y, eager(twin, x), F32, "output")
    assert_same_state(buffers, twin, "the given buffers")
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, own[0][name]), f"the layer's own {name} changed"


def check_export(example, layer, training):
    twin = copy.deepcopy(layer)
    with quiet():
        exported = torch.export.export(layer, (example.input(),)).module()
    for seed in (1, 2):
        x = example.input(seed)
        assert_close(exported(x.clone()), eager(twin, x), F32, f"step {seed} output")
        assert_same_state(exported, twin, f"step {seed}")


def _onnx_output(onnx_bytes_or_path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_bytes_or_path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def check_onnx_dynamo(example, layer, training):
    x = example.input(1)
    with quiet(), tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "layer.onnx")
        torch.onnx.export(
            copy.deepcopy(layer), (example.input(),), dynamo=True, verbose=False
        ).save(path)
        actual = _onnx_output(path, x)
    assert_close(actual, eager(layer, x), F32, "onnxruntime output")


def check_onnx_legacy(example, layer, training):
    x = example.input(1)
    buffer = io.BytesIO()
    with quiet():
        torch.onnx.export(copy.deepcopy(layer), (example.input(),), buffer, dynamo=False)
    assert_close(_onnx_output(buffer.getvalue(), x), eager(layer, x), F32, "onnxruntime output")


def check_jit_trace(example, layer, training):
    twin = copy.deepcopy(layer)
    x = example.input()
    with quiet():
        traced = torch.jit.trace(layer, (x.clone(),), check_trace=False)
    eager(twin, x)  # tracing ran the layer once
    for seed in (1, 2):
        x = example.input(seed)
        assert_close(traced(x.clone()), eager(twin, x), F32, f"step {seed} output")
        assert_same_state(traced, twin, f"step {seed}")


def check_jit_script(example, layer, training):
    with quiet():
        scripted = torch.jit.script(layer)
    x = example.input(1)
    assert_close(scripted(x.clone()), eager(copy.deepcopy(layer), x), F32, "output")


def check_copy(example, layer, training):
    eager(layer, example.input())  # some state to carry
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(twin) is type(layer)
        reference = copy.deepcopy(layer)
        for seed in (1, 2):
            x = example.input(seed)
            assert_close(eager(twin, x), eager(reference, x), F32, f"step {seed}")
        assert_same_state(twin, reference, "copy")


def penalty_grads(layer, x, weights, backend):
    """The gradients of a gradient penalty, sum((d sum(y * weights) / d inputs)^2): double backward."""
    leaf = x.clone().requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]
    with nk.backend(backend):
        y = layer(leaf.clone())
        first = torch.autograd.grad((y * weights).sum(), [leaf, *params], create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        if not penalty.requires_grad:  # a map linear in its input without parameters: zero
            return [None] * (1 + len(params))
        return torch.autograd.grad(penalty, [leaf, *params], allow_unused=True)


def check_double_backward(example, layer, training):
    """The default backend (float32; on the CPU `compiled` for BatchNormAct and Batch-Layer) against
    normkit's reference in float64, from the same state."""
    exact = copy.deepcopy(layer).double()
    x, weights = example.input(1), output_grad(example.shape)
    actual = penalty_grads(layer, x, weights, "auto")
    expected = penalty_grads(exact, x.double(), weights.double(), "reference")
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if e is None:  # the penalty does not depend on this parameter (a bias)
            assert a is None or not a.abs().max() > 0, f"gradient {i}"
            continue
        assert_close(a, e, F32, f"gradient {i} of the penalty")


CHECKS: dict[str, Callable] = {
    "eager": check_eager,
    "compile": check_compile,
    "grad": check_grad,
    "vmap": check_vmap,
    "jvp": check_jvp,
    "functional_call": check_functional_call,
    "export": check_export,
    "onnx_dynamo": check_onnx_dynamo,
    "onnx_legacy": check_onnx_legacy,
    "jit_trace": check_jit_trace,
    "jit_script": check_jit_script,
    "copy": check_copy,
    "double_backward": check_double_backward,
}
EVAL_ONLY = {"onnx_dynamo", "onnx_legacy", "jit_script", "copy"}  # deployment: one mode suffices


def test_every_transform_has_a_check():
    assert set(CHECKS) == set(TRANSFORMS)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("example", examples(), ids=str)
def test_cell(example, transform):
    """The cell works with eager mode's numbers, or is a declared refusal with its message."""
    for training in (False,) if transform in EVAL_ONLY else (True, False):
        torch.manual_seed(0)
        layer = example.make(training)
        refusal = refusal_for(layer, transform, training)
        mode = "train" if training else "eval"
        if refusal is None:
            CHECKS[transform](example, layer, training)
            continue
        with pytest.raises(RuntimeError) as info:  # torch's kind, ours or Dynamo's around it
            CHECKS[transform](example, layer, training)
        assert refusal.reason in str(info.value), f"{mode}: {info.value}"
        if transform != "compile":  # Dynamo reports our reason inside its own error
            assert isinstance(info.value, UnsupportedTransformError), f"{mode}: {info.value!r}"


# --- beyond the cells -------------------------------------------------------------------------------


def _updating_layers() -> list[Example]:
    """The layers whose training step under vmap is refused for its running statistics (not for
    another reason declared first: MABN's and CBN's steps refuse every transform)."""
    return [
        e
        for e in examples()
        if refusal_for(e.make(True), "vmap", True) is VMAP_RUNNING_STATISTICS
        and not isinstance(e.build(), nk.BatchRenorm)  # needs them: per-sample gradients in eval
    ]


@pytest.mark.parametrize("example", _updating_layers(), ids=str)
def test_the_vmap_refusals_advice_works(example):
    """Per-sample gradients in training: `layer.track_running_stats = False` for that pass (what
    torch.func.replace_all_batch_norm_modules_ does to BatchNorm), as the refusal says."""
    layer = example.make(True)
    assert "layer.track_running_stats = False" in VMAP_RUNNING_STATISTICS.reason
    layer.track_running_stats = False
    before = {n: b.clone() for n, b in layer.named_buffers()}
    assert_per_sample_grads_match_a_loop(layer, example.input(1), output_grad(example.shape))
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_torchs_batch_norm_replacement_reaches_normkits_batch_norms():
    model = nn.Sequential(nk.BatchNorm2d(4), nk.SyncBatchNorm(4), nk.BatchNorm(4)).train()
    torch.func.replace_all_batch_norm_modules_(model)
    x, weights = make_input((4, 4, 3, 3)), output_grad((4, 4, 3, 3))
    assert_per_sample_grads_match_a_loop(model, x, weights)


class Branches(nn.Module):
    """Each layer on its own copy of the input, the outputs stacked: one graph to compile, and no
    layer's rounding amplified by the next one's normalization."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer(x.clone()) for layer in self.layers])


def test_inductor_numerics():
    """Inductor on the layers the family test (test_family.py) does not compile, in one graph, over
    two training steps and an eval step: outputs, gradients and running statistics as eager mode's
    (float32 tolerance). torch's aot_eager is not used (docs/transforms.md)."""
    torch.manual_seed(0)
    layers = [
        nk.BatchNorm2d(4, momentum=None),
        nk.GroupNorm(2, 4),
        nk.LayerNorm2d(4),
        nk.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nk.BatchNormAct(4, activation="silu"),
        nk.InPlaceABN(4),
        nk.SyncBatchNorm(4),
    ]
    for layer in layers:
        randomize_state(layer)
    model = Branches(*layers)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for step, training in enumerate((True, True, False)):
        model.train(training), twin.train(training)
        x = make_input((6, 4, 4, 4), seed=step)
        weights = output_grad((len(layers), 6, 4, 4, 4), step)
        y, dx, grads = eager_grads(model, x, weights, run=compiled)
        y_twin, dx_twin, grads_twin = eager_grads(twin, x, weights)
        assert_close(y, y_twin, F32, f"step {step} output")
        assert_close(dx, dx_twin, F32, f"step {step} input grad")
        for name, grad in grads.items():
            assert_close(grad, grads_twin[name], F32, f"step {step} grad of {name}")
        assert_same_state(model, twin, f"step {step}")


# --- the published table ------------------------------------------------------------------------------

TITLES = {
    "eager": "eager",
    "compile": "compile",
    "grad": "func.grad",
    "vmap": "vmap (per-sample)",
    "jvp": "jvp",
    "functional_call": "functional_call",
    "export": "export",
    "onnx_dynamo": "ONNX dynamo",
    "onnx_legacy": "ONNX legacy",
    "jit_trace": "jit.trace",
    "jit_script": "jit.script",
    "copy": "deepcopy, pickle",
    "double_backward": "double backward",
}


def render_table() -> str:
    """docs/transforms.md's matrix, made from the layers' declared refusals."""
    notes: list[Refusal] = []

    def note(refusal: Refusal) -> int:
        if refusal not in notes:
            notes.append(refusal)
        return notes.index(refusal) + 1

    header = "| layer | " + " | ".join(TITLES[t] for t in TRANSFORMS) + " |"
    lines = [header, "|---" * (len(TRANSFORMS) + 1) + "|"]
    for cls in public_layers():
        cells = []
        for transform in TRANSFORMS:
            refusals = [
                r for r in getattr(cls, "transform_refusals", ()) if transform in r.transforms
            ]
            if not refusals:
                cells.append("✓")
            elif any(r.mode == "any" and not r.when for r in refusals):
                cells.append("✗ " + " ".join(f"[{note(r)}]" for r in refusals))
            else:
                modes = dict.fromkeys(r.mode for r in refusals)  # in order, once each
                cells.append(
                    "✓, "
                    + ", ".join(
                        f"{mode} ✗ " + " ".join(f"[{note(r)}]" for r in refusals if r.mode == mode)
                        for mode in modes
                    )
                )
        lines.append(f"| `{cls.__name__}` | " + " | ".join(cells) + " |")
    lines.append("")
    for i, refusal in enumerate(notes, 1):
        scope = f"{refusal.mode}, {refusal.when}" if refusal.when else refusal.mode
        if refusal.mode == "any":
            scope = refusal.when or "always"
        lines.append(f"{i}. ({scope}) {refusal.reason}.")
    return "\n".join(lines)


START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"
BLOCK = re.compile(f"{START}\n(.*?){END}", re.S)


def test_docs_table_is_current():
    """The table in docs/transforms.md is the one the declarations make. To rewrite it:
    NORMKIT_WRITE_DOCS=1 pytest tests/nn/test_transform_matrix.py -k docs_table"""
    text = DOCS.read_text(encoding="utf-8")
    assert BLOCK.search(text), f"docs/transforms.md has no {START} ... {END} block"
    table = render_table() + "\n"
    if os.environ.get("NORMKIT_WRITE_DOCS") == "1":
        DOCS.write_text(BLOCK.sub(lambda _: f"{START}\n{table}{END}", text), encoding="utf-8")
        text = DOCS.read_text(encoding="utf-8")
    assert BLOCK.search(text).group(1) == table, (
        "docs/transforms.md's matrix is out of date: NORMKIT_WRITE_DOCS=1 pytest "
        "tests/nn/test_transform_matrix.py -k docs_table"
    )

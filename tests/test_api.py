"""The public surface: names, import cost, docstring examples, torch.compile."""

import doctest
import importlib
import pkgutil
import subprocess
import sys

import pytest
import torch

import normkit as nk

PUBLIC = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "LayerNorm2d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "functional",
    "set_backend", "backend", "get_backend", "available_backends", "snapshot_running_stats",
    "frozen_running_stats", "momentum_from_decay", "reference", "errors",
]  # fmt: skip


def test_public_names():
    for name in PUBLIC:
        assert getattr(nk, name) is not None, name
    for name in nk.__all__:
        assert hasattr(nk, name), name


def test_import_is_light():
    """`import normkit` loads torch and normkit, never triton, the CLI stack or the lab's libraries."""
    code = "import sys, normkit; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.check_output([sys.executable, "-c", code], text=True).split())
    for heavy in ("triton", "typer", "rich", "sklearn", "matplotlib", "normkit.reference"):
        assert heavy not in loaded, f"import normkit loaded {heavy}"


def _normkit_modules():
    package = importlib.import_module("normkit")
    yield "normkit"
    for info in pkgutil.walk_packages(package.__path__, "normkit."):
        if ".lab" not in info.name and ".cli" not in info.name:
            yield info.name


@pytest.mark.parametrize("module_name", list(_normkit_modules()))
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in finder.find(module, module_name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def _every_layer():
    torch.manual_seed(0)
    # ReLUs between the layers, and no conv bias before BN, so every parameter has a real gradient
    # (a bias right before a normalizer has a gradient of exactly zero, compared as noise).
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        nk.BatchNorm2d(4),
        torch.nn.ReLU(),
        nk.GroupNorm(2, 4),
        torch.nn.ReLU(),
        nk.LayerNorm2d(4),
        torch.nn.ReLU(),
        nk.InstanceNorm2d(4, affine=True, track_running_stats=True),
        torch.nn.ReLU(),
        nk.LayerNorm(6),
    )


@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_torch_compile_traces_without_graph_breaks(backend_name):
    with nk.backend(backend_name):
        explanation = torch._dynamo.explain(_every_layer())(torch.randn(4, 3, 8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_torch_compile_gives_the_same_numbers():
    """Compiled and eager agree on outputs and running statistics, and the compiled gradients are
    as accurate as eager's against float64 (they are summed in another order, so not bit-equal; a
    parameter whose true gradient is ~0 is noise in both)."""
    eager, compiled, exact = _every_layer(), _every_layer(), _every_layer().double()
    # The default (inductor) backend. torch 2.13's debugging backend "aot_eager" returns wrong input
    # gradients for group_norm followed by a channels-last layer_norm, in plain torch as well.
    compiled_fn = torch.compile(compiled)
    x = torch.randn(4, 3, 8, 8)
    y_eager, y_compiled, y_exact = eager(x), compiled_fn(x), exact(x.double())
    torch.testing.assert_close(y_compiled, y_eager)
    # a random projection: sum(y**2) of a normalized output is nearly constant, its gradient noise
    weights = torch.randn(y_eager.shape, generator=torch.Generator().manual_seed(1))
    (y_eager * weights).sum().backward()
    (y_compiled * weights).sum().backward()
    (y_exact * weights.double()).sum().backward()
    for (name, p), q, r in zip(
        compiled.named_parameters(), eager.parameters(), exact.parameters(), strict=True
    ):
        compiled_error = (p.grad.double() - r.grad).abs().max().item()
        eager_error = (q.grad.double() - r.grad).abs().max().item()
        assert compiled_error <= max(4 * eager_error, 1e-5 * r.grad.abs().max().item()), name
    for (name, b), c in zip(compiled.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)

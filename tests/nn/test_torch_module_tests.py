"""PyTorch's own module tests for the normalization layers, run against normkit (issue 20).

The cases are PyTorch's (``torch/testing/_internal/common_modules.py`` of torch 2.13:
``module_inputs_torch_nn_BatchNorm1d/2d/3d``, ``..._GroupNorm``, ``..._InstanceNormNd``,
``..._LayerNorm`` and the error inputs of BatchNorm and GroupNorm: ``not_affine``, ``momentum``,
``not_tracking_stats``, ``zero_batch``, ``affine_not_bias``, ``no_batch_dim``, ...), transcribed
so that no test depends on torch's private testing package. The checks are the generic ones of
PyTorch's ``test/test_modules.py``, written for normkit: forward, factory kwargs, repr, pickle,
non-contiguous inputs, gradcheck and gradgradcheck, memory format, whether train and eval differ,
construction under ``torch.device("meta")``, the error inputs — plus what the drop-ins promise
beyond them: every number equal to torch.nn's on the same case. The deviations that remain are
``DEVIATIONS`` below, each with its reason, and docs/transforms.md lists them.
"""

from __future__ import annotations

import copy
import io
import re
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import normkit as nk
from helpers import assert_close, randomize_parameters


@dataclass(frozen=True)
class Case:
    """One of torch's ModuleInputs: a module, its constructor arguments and its input shape."""

    module: str  # torch.nn's (and normkit's) class name
    desc: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    no_batch_dim: bool = False  # torch compares it with the batched input of one sample

    def build(self, library, **extra) -> nn.Module:
        return getattr(library, self.module)(*self.args, **self.kwargs, **extra)

    def __str__(self) -> str:
        return f"{self.module}-{self.desc or 'default'}"


def _batch_norm_cases(module, shape, momentum, zero_shape):
    return [
        Case(module, "", (3,), shape=shape),
        Case(module, "simple_average", (3, 1e-3, None), shape=shape),
        Case(module, "momentum", (3, 1e-3, momentum), shape=shape),
        Case(module, "not_affine", (3, 1e-3, momentum, False), shape=shape),
        Case(module, "not_tracking_stats", (3, 1e-3, momentum, True, False), shape=shape),
        Case(module, "zero_batch", (5, 1e-3, 0.3, False), shape=zero_shape),
        Case(module, "affine_not_bias", (3,), {"bias": False}, shape=shape),
    ]


def _instance_norm_cases(module, batch_shape):
    no_batch = batch_shape[1:]
    return [
        Case(module, "", (3, 1e-3, 0.3), shape=batch_shape),
        Case(module, "tracking_stats", (3, 1e-3, 0.3, False, True), shape=batch_shape),
        Case(
            module, "tracking_stats_no_batch_dim", (3, 1e-3, 0.3), shape=no_batch, no_batch_dim=True
        ),  # fmt: skip
        Case(
            module, "no_batch_dim", (3, 1e-3, 0.3, False, True), shape=no_batch, no_batch_dim=True
        ),  # fmt: skip
        Case(module, "affine", (3, 1e-3, 0.3), {"affine": True}, shape=batch_shape),
        Case(
            module,
            "affine_not_bias",
            (3, 1e-3, 0.3),
            {"affine": True, "bias": False},
            shape=batch_shape,
        ),  # fmt: skip
    ]


CASES: list[Case] = [
    Case("BatchNorm1d", "affine", (10,), shape=(4, 10)),
    Case("BatchNorm1d", "3d_input", (5,), shape=(4, 5, 3)),
    Case("BatchNorm1d", "affine_simple_average", (10, 1e-3, None), shape=(4, 10)),
    Case("BatchNorm1d", "not_affine", (10, 1e-3, 0.3, False), shape=(4, 10)),
    Case("BatchNorm1d", "not_tracking_stats", (10, 1e-3, 0.3, True, False), shape=(4, 10)),
    Case("BatchNorm1d", "3d_input_not_affine", (5, 1e-3, 0.3, False), shape=(4, 5, 3)),
    Case("BatchNorm1d", "zero_batch", (5, 1e-3, 0.3, False), shape=(0, 5, 9)),
    Case("BatchNorm1d", "affine_not_bias", (10,), {"bias": False}, shape=(4, 10)),
    *_batch_norm_cases("BatchNorm2d", (2, 3, 6, 6), 0.8, (0, 5, 2, 2)),
    *_batch_norm_cases("BatchNorm3d", (2, 3, 4, 4, 4), 0.7, (0, 5, 2, 2, 2)),
    Case("GroupNorm", "1d_affine", (3, 6, 1e-3), shape=(4, 6, 5)),
    Case("GroupNorm", "1d_affine_not_bias", (3, 6, 1e-3), {"bias": False}, shape=(4, 6, 5)),
    Case("GroupNorm", "1d_affine_GN", (3, 12, 1e-3), shape=(4, 12)),
    Case("GroupNorm", "1d_affine_large_batch", (1, 6, 1e-3), shape=(150, 6)),
    Case("GroupNorm", "1d_no_affine_IN", (5, 5, 1e-3, False), shape=(4, 5, 5)),
    Case("GroupNorm", "1d_no_affine_LN", (1, 10, 1e-3, False), shape=(4, 10)),
    Case("GroupNorm", "2d_affine", (3, 6, 1e-3), shape=(4, 6, 2, 3)),
    Case("GroupNorm", "2d_affine_not_bias", (3, 9, 1e-3), {"bias": False}, shape=(4, 9, 2, 3)),
    Case("GroupNorm", "2d_no_affine_IN", (3, 3, 1e-3, False), shape=(4, 3, 2, 3)),
    Case("GroupNorm", "2d_no_affine_LN", (1, 3, 1e-3, False), shape=(4, 3, 2, 3)),
    *_instance_norm_cases("InstanceNorm1d", (4, 3, 15)),
    *_instance_norm_cases("InstanceNorm2d", (4, 3, 6, 6)),
    *_instance_norm_cases("InstanceNorm3d", (4, 3, 4, 4, 4)),
    Case("LayerNorm", "1d_elementwise_affine", ([5], 1e-3), shape=(4, 5, 5)),
    Case("LayerNorm", "1d_elementwise_affine_large_batch", ([5], 1e-3), shape=(128, 5, 5)),
    Case("LayerNorm", "1d_no_elementwise_affine", ([5], 1e-3, False), shape=(4, 5, 5)),
    Case("LayerNorm", "3d_elementwise_affine", ([2, 2, 5], 1e-3), shape=(4, 2, 2, 5)),
    Case("LayerNorm", "3d_no_elementwise_affine", ([2, 2, 5], 1e-3, False), shape=(4, 2, 2, 5)),
    Case("LayerNorm", "1d_empty_elementwise_affine", ([5], 1e-3), shape=(0, 5)),
    Case(
        "LayerNorm",
        "3d_elementwise_affine_no_bias",
        ([2, 2, 5], 1e-3),
        {"elementwise_affine": True, "bias": False},
        shape=(4, 2, 2, 5),
    ),  # fmt: skip
]

# torch's ModuleInfo flag: train and eval modes compute differently.
TRAIN_AND_EVAL_DIFFER = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d",
                         "InstanceNorm2d", "InstanceNorm3d"}  # fmt: skip

# Where normkit deliberately differs from torch.nn on these cases (docs/transforms.md): the state
# key that differs, and why.
DEVIATIONS = {
    ("zero_batch", "num_batches_tracked"): "an empty batch is not counted (torch counts it, which "
    "skews momentum=None's cumulative average)",
    ("InstanceNorm", "num_batches_tracked"): "InstanceNorm counts its batches (torch never does; "
    "momentum=None needs the count)",
}


def deviates(case: Case, key: str) -> bool:
    return (case.desc == "zero_batch" and key == "num_batches_tracked") or (
        case.module.startswith("InstanceNorm") and key == "num_batches_tracked"
    )


def make_input(case: Case, dtype=torch.float32, seed=0, requires_grad=False) -> torch.Tensor:
    """torch's make_tensor draws uniformly from [-9, 9]; so do these (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(case.shape, generator=generator, dtype=torch.float64) * 18 - 9
    return x.to(dtype).requires_grad_(requires_grad)


def pair(case: Case, dtype=torch.float32):
    """normkit's layer and torch.nn's, from the same arguments and the same (random) state."""
    ours, theirs = case.build(nk).to(dtype), case.build(nn).to(dtype)
    randomize_parameters(ours)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
# torch's momentum cases (0.8, 0.7) draw normkit's warning that they look like a Keras decay
pytestmark = pytest.mark.filterwarnings("ignore:momentum=0.[78] follows PyTorch's convention")
EACH = pytest.mark.parametrize("case", CASES, ids=str)


# --- what the drop-ins promise: torch.nn's numbers ----------------------------------------------------


@TRAINING
@EACH
def test_forward_matches_torch(case, training):
    """Outputs, input and parameter gradients and the state after two steps equal torch.nn's
    (helpers.TOLERANCES[float32]), but for DEVIATIONS."""
    ours, theirs = pair(case)
    ours.train(training), theirs.train(training)
    for seed in (0, 1):
        a, b = make_input(case, seed=seed, requires_grad=True), make_input(case, seed=seed)
        b.requires_grad_()
        ya, yb = ours(a), theirs(b)
        assert_close(ya, yb, torch.float32, f"step {seed} output")
        weights = torch.randn(yb.shape, generator=torch.Generator().manual_seed(seed))
        (ya * weights).sum().backward()
        (yb * weights).sum().backward()
        assert_close(a.grad, b.grad, torch.float32, f"step {seed} input grad")
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(p.grad, q.grad, torch.float32, f"step {seed} grad of {name}")
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if deviates(case, key):
            continue
        if value.is_floating_point():
            assert_close(value, theirs_state[key], torch.float32, key)
        else:
            assert torch.equal(value, theirs_state[key]), key


@pytest.mark.parametrize("case", [c for c in CASES if c.no_batch_dim], ids=str)
def test_no_batch_dim_equals_a_batch_of_one(case):
    """torch's no_batch_dim_reference_fn: the unbatched input is the batched one's sample."""
    layer = case.build(nk)
    x = make_input(case)
    torch.testing.assert_close(layer.eval()(x), layer(x.unsqueeze(0)).squeeze(0))


# --- test_modules.py's generic checks ------------------------------------------------------------------


@TRAINING
@EACH
def test_forward_then_dtype_methods(case, training):
    """test_forward: forward runs; after .double()/.float(), every parameter and buffer has the
    dtype and the forward still runs."""
    layer = case.build(nk).train(training)
    layer(make_input(case))
    for method, dtype in (("double", torch.float64), ("float", torch.float32)):
        getattr(layer, method)()
        layer(make_input(case, dtype))
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            if tensor.is_floating_point():
                assert tensor.dtype == dtype, f"{method}(): {name} is {tensor.dtype}"


@pytest.mark.parametrize("device", ["cpu", "meta"])
@EACH
def test_factory_kwargs(case, device):
    """device= and dtype= reach every parameter and floating-point buffer."""
    layer = case.build(nk, device=device, dtype=torch.float64)
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        assert tensor.device.type == device, name
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float64, name


@EACH
def test_device_context_init(case):
    """Built under `with torch.device("meta")`: the same parameters and buffers, on meta."""
    cpu = case.build(nk)
    with torch.device("meta"):
        meta = case.build(nk)
    pairs = [*zip(meta.parameters(), cpu.parameters(), strict=True),
             *zip(meta.buffers(), cpu.buffers(), strict=True)]  # fmt: skip
    for on_meta, on_cpu in pairs:
        assert on_meta.is_meta and on_meta.shape == on_cpu.shape
        assert on_meta.dtype == on_cpu.dtype and on_meta.requires_grad == on_cpu.requires_grad


@EACH
def test_repr(case):
    layer = case.build(nk)
    text = repr(layer)
    assert str(layer) == text and text.startswith(case.module)


@TRAINING
@EACH
def test_pickle(case, training):
    """torch.save of the whole module, then torch.load: the same output."""
    layer = case.build(nk).train(training)
    randomize_parameters(layer)
    x = make_input(case)
    twin = copy.deepcopy(layer)
    output = layer(x)
    buffer = io.BytesIO()
    torch.save(twin, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), output)


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """torch's recipe: repeat the last dim twice and take every other element."""
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    return out.requires_grad_(t.requires_grad)


@TRAINING
@EACH
def test_non_contiguous_tensors(case, training):
    """Non-contiguous inputs and output gradients give the contiguous ones' outputs and gradients
    (torch's tolerance for input gradients: atol 1e-4)."""
    layer = case.build(nk).train(training)
    randomize_parameters(layer)
    x = make_input(case, requires_grad=True)
    grad = torch.randn(case.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for inp, g in ((x, grad), (_non_contiguous(x), _non_contiguous(grad))):
        if inp.dim() > 0 and inp.numel() > 1 and inp is not x:
            assert not inp.is_contiguous()
        twin = copy.deepcopy(layer)
        out = twin(inp)
        out.backward(g)
        results.append((out, inp.grad, [p.grad for p in twin.parameters()]))
    (out, dx, grads), (nc_out, nc_dx, nc_grads) = results
    torch.testing.assert_close(nc_out, out)
    torch.testing.assert_close(nc_dx, dx, atol=1e-4, rtol=0)
    for a, b in zip(nc_grads, grads, strict=True):
        torch.testing.assert_close(a, b)


def _check_gradients(case, training, check, partial=True):
    """test_grad / test_gradgrad: the total derivative (input and every parameter), then (with
    ``partial``) each parameter alone, in float64. fast_mode keeps torch's large-batch cases
    cheap."""
    layer = case.build(nk).double().train(training)
    randomize_parameters(layer)
    names = [n for n, _ in layer.named_parameters()]
    params = [p for _, p in layer.named_parameters()]
    x = make_input(case, torch.float64, requires_grad=True)

    def run(inp, *values):
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (inp,))

    assert check(run, (x, *params), fast_mode=True)
    for i, p in enumerate(params if partial else ()):
        others = [q.detach() for q in params]

        def one(inp, param, i=i, others=others):
            return run(inp, *others[:i], param, *others[i + 1 :])

        assert check(one, (x.detach(), p), fast_mode=True)


# Each mode where they differ; GroupNorm and LayerNorm compute the same in both, checked once.
CASES_AND_MODES = [
    pytest.param(case, training, id=f"{case}-{'train' if training else 'eval'}")
    for case in CASES
    for training in ((True, False) if case.module in TRAIN_AND_EVAL_DIFFER else (True,))
]


@pytest.mark.parametrize(("case", "training"), CASES_AND_MODES)
def test_grad(case, training):
    _check_gradients(case, training, torch.autograd.gradcheck)


@pytest.mark.parametrize(("case", "training"), CASES_AND_MODES)
def test_gradgrad(case, training):
    """The total second derivative (the partial ones' code paths are test_grad's)."""
    _check_gradients(case, training, torch.autograd.gradgradcheck, partial=False)


@TRAINING
@pytest.mark.parametrize("case", [c for c in CASES if not c.no_batch_dim], ids=str)
def test_memory_format(case, training):
    """channels_last inputs (4-D, and channels_last_3d for 5-D) and modules give the contiguous
    result, and the output keeps the input's memory format (torch skips this for InstanceNorm,
    whose output is contiguous; normkit keeps channels_last, on purpose). Unbatched inputs are left
    out: channels_last of an unbatched (C, D, H, W) volume makes D the innermost dim, which is not
    a channels-last volume (torch skips every InstanceNorm here)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    layer = case.build(nk).train(training)
    randomize_parameters(layer)
    x = make_input(case, requires_grad=True)
    desired = copy.deepcopy(layer)(x)
    fmt = formats.get(x.dim())
    inputs = [torch.contiguous_format] + ([fmt] if fmt else [])
    for input_format in inputs:
        for module_format in (torch.preserve_format, torch.contiguous_format, *inputs[1:]):
            twin = copy.deepcopy(layer).to(memory_format=module_format)
            inp = x.detach().clone().to(memory_format=input_format).requires_grad_()
            out = twin(inp)
            torch.testing.assert_close(out, desired)
            expected = input_format if input_format != torch.contiguous_format else None
            if expected is not None:
                assert out.is_contiguous(memory_format=expected), (input_format, module_format)
            else:
                assert out.is_contiguous(), (input_format, module_format)


@EACH
def test_if_train_and_eval_modes_differ(case):
    """With `training` deleted, only a layer whose modes differ may fail, and only by reading it."""
    layer = case.build(nk).train()
    del layer.training
    try:
        layer(make_input(case))
    except AttributeError as error:
        assert "'training'" in str(error)
        assert case.module in TRAIN_AND_EVAL_DIFFER, f"{case}: reads `training` in forward"


# torch's error inputs, and where normkit's answer differs (DEVIATIONS' sibling, documented).
def test_batch_norm_error_inputs():
    """torch: eps <= 0 fails in forward with ValueError "eps must be positive". normkit refuses it
    in the constructor, with a ValueError (ConfigError) whose message says why and what to use:
    the earlier, clearer error is normkit's choice (docs/transforms.md)."""
    shapes = {"BatchNorm1d": (2, 10), "BatchNorm2d": (2, 10, 5, 5), "BatchNorm3d": (2, 10, 4, 4, 4)}
    for module, shape in shapes.items():
        for eps in (-1.0, 0.0):
            with pytest.raises(ValueError, match="eps must be > 0"):
                getattr(nk, module)(10, eps=eps)
            with pytest.raises(ValueError, match="eps must be positive"):  # torch's, in forward
                getattr(nn, module)(10, eps=eps)(torch.randn(shape))


def test_group_norm_error_inputs():
    """torch's construction errors, word for word: the message includes the actual values."""
    for groups, channels in ((3, 10), (5, 13)):
        pattern = re.escape(f"num_channels ({channels}) must be divisible by num_groups ({groups})")
        with pytest.raises(ValueError, match=pattern):
            nk.GroupNorm(groups, channels)

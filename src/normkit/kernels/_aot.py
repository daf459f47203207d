"""Ahead-of-time compilation of the kernels for GPUs that are not here: registers, spills,
shared memory and the occupancy they allow.

A launch recorded by :func:`normkit.kernels._utils.recording` carries everything triton's JIT
would see on a GPU: the kernel, its arguments (tensors on the ``meta`` device have the dtype and the
16-byte alignment of a real allocation) and its compile-time constants. :func:`compile_launch`
specializes it exactly as ``JITFunction.run`` does (the same binder: integer arguments equal to 1
become constants, and pointers and integers divisible by 16 are marked so), compiles it with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32))`` to PTX and a cubin,
and reads the ``-v`` report of the ``ptxas`` that ships in the triton wheel (the run that made the
cubin, or a second run on the PTX when the cubin comes from triton's cache): the registers per
thread, the spill stores and loads, and the stack frame. The same source, target and options
make the same cubin as the JIT on a device, so ``benchmarks/gpu_check.py`` can compare these
registers with the ones the driver reports.

Occupancy (:func:`occupancy`, NVIDIA's CUDA occupancy calculator for compute capability 8.0 and
9.0): a streaming multiprocessor has 65,536 32-bit registers, allocated per warp in units of 256
(a warp of a kernel with r registers per thread takes ceil(32 r / 256) * 256), at most 2,048
resident threads (64 warps) and 32 resident CTAs, and 164 KiB (sm_80) or 228 KiB (sm_90) of shared
memory with 1 KiB reserved per CTA. A CTA of w warps (threads = 32 w) fits

    by registers: floor(floor(65536 / (ceil(32 r / 256) * 256)) / w)
    by threads:   floor(2048 / (32 w))
    by shared:    floor(shared_per_sm / (shared_per_cta + 1024))

times; the resident CTAs are the least of these and 32. The check wants at least
:data:`MIN_CTAS_BY_REGISTERS` by registers: a kernel that keeps a single CTA resident cannot
overlap one CTA's loads with another's reductions. Every launch states that budget to ptxas
(``maxnreg``, :func:`normkit.kernels._utils.register_budget`), so a kernel that needs more spills
instead, and the check reports it.

This module imports triton's compiler but needs no GPU and no CUDA driver.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton

from normkit.kernels._utils import MIN_CTAS_PER_SM, Launch

MIN_CTAS_BY_REGISTERS = MIN_CTAS_PER_SM


@dataclass(frozen=True)
class Target:
    """A GPU architecture: triton's capability, ptxas's name, and the per-SM limits."""

    name: str
    capability: int
    gpu_name: str  # ptxas --gpu-name (triton compiles capability 90 for sm_90a)
    registers_per_sm: int = 65536
    register_unit: int = 256  # registers allocated per warp in multiples of this
    max_registers_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    shared_reserved_per_cta: int = 1024


SM80 = Target("sm_80 (A100)", 80, "sm_80", shared_per_sm=164 * 1024)
SM90 = Target("sm_90 (H100)", 90, "sm_90a", shared_per_sm=228 * 1024)
TARGETS = {"sm_80": SM80, "sm_90": SM90}


def target_for_capability(capability: int) -> Target:
    """The target of a device's compute capability (e.g. 90 for an H100; 80 for an A100)."""
    for target in TARGETS.values():
        if target.capability == capability:
            return target
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    arch = sm_arch_from_capability(capability)
    return Target(arch, capability, arch)


@dataclass(frozen=True)
class Occupancy:
    by_registers: int
    by_threads: int
    by_shared: int
    ctas: int  # resident CTAs per SM: the least of the limits

    @property
    def warps(self) -> int:
        return self.ctas


def occupancy(registers: int, num_warps: int, shared: int, target: Target) -> Occupancy:
    """Resident CTAs per SM of a kernel with ``registers`` per thread, ``num_warps`` warps per CTA
    and ``shared`` bytes of shared memory per CTA (the formula of the module docstring)."""
    if registers <= 0:
        by_registers = target.max_ctas_per_sm
    else:
        unit = target.register_unit
        per_warp = -(-registers * 32 // unit) * unit
        by_registers = target.registers_per_sm // per_warp // num_warps
    by_threads = target.max_threads_per_sm // (32 * num_warps)
    by_shared = target.shared_per_sm // (shared + target.shared_reserved_per_cta)
    ctas = min(by_registers, by_threads, by_shared, target.max_ctas_per_sm)
    return Occupancy(by_registers, by_threads, by_shared, ctas)


# --- configurations ------------------------------------------------------------------------------


def config_label(launch: Launch) -> str:
    """The launcher's choices: compile-time constants and warps, e.g. ``BLOCK_A=64 ... warps=8``."""
    parts = []
    for key, value in launch.constexprs.items():
        parts.append(f"{key}={int(value) if isinstance(value, bool) else value}")
    return " ".join([*parts, f"warps={launch.num_warps}"])


def input_dtype(launch: Launch) -> str:
    """The dtype of the kernel's first tensor argument (the input, or float32 partials)."""
    for value in launch.args:
        if isinstance(value, torch.Tensor):
            return str(value.dtype).removeprefix("torch.")
    return "-"


def _specialize(launch: Launch, target: Target):
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` computes them for ``target``
    (triton 3.6: the kernel's own binder, then its argument packing)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(triton.backends.compiler.GPUTarget("cuda", target.capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps)
    if launch.maxnreg is not None:
        kwargs["maxnreg"] = launch.maxnreg
    kwargs["debug"] = kernel.debug or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return signature, constexprs, attrs, options, backend


def signature_label(launch: Launch, target: Target = SM90) -> str:
    """The runtime argument types as the JIT specializes them (``*bf16:16`` = a 16-byte-aligned
    bfloat16 pointer, ``i32:16`` = an int divisible by 16, ``=1`` = the constant 1)."""
    signature, constexprs, attrs, _, _ = _specialize(launch, target)
    names = [p.name for p in launch.kernel.params]
    aligned = {path[0] for path in attrs}
    labels = []
    for i, name in enumerate(names):
        kind = signature[name]
        if launch.kernel.params[i].is_constexpr:
            continue
        if kind == "constexpr":
            labels.append(f"{name}={constexprs[(i,)]}")
        else:
            labels.append(kind + (":16" if i in aligned else ""))
    return ",".join(labels)


@dataclass
class Compiled:
    """One configuration compiled for one target, with what ptxas reported."""

    kernel: str
    config: str
    dtype: str
    target: str
    registers: int
    spills: int  # spill stores + spill loads, bytes
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    num_warps: int
    ctas_by_registers: int
    ctas: int
    warps_per_sm: int
    compile_seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.error and self.spills == 0 and self.ctas_by_registers >= MIN_CTAS_BY_REGISTERS
        )

    def problems(self) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.spills:
            out.append(f"{self.spill_stores} B spill stores, {self.spill_loads} B spill loads")
        if self.ctas_by_registers < MIN_CTAS_BY_REGISTERS:
            out.append(
                f"{self.registers} registers x {32 * self.num_warps} threads keep "
                f"{self.ctas_by_registers} CTA(s) per SM (< {MIN_CTAS_BY_REGISTERS})"
            )
        return out

    def as_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok, "problems": self.problems()}


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def ptxas_path(capability: int) -> str:
    """The ptxas that triton itself runs for ``capability`` (the one shipped in its wheel)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(capability).path


def parse_ptxas(log: str) -> dict[str, int] | None:
    """Registers, stack, spill stores and loads (bytes) from a ``ptxas -v`` log; None if absent."""
    usage = _PTXAS_USAGE.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if usage is None or spills is None:
        return None
    stack, stores, loads = (int(v) for v in spills.groups())
    return {"registers": int(usage.group(1)), "stack": stack, "spill_stores": stores,
            "spill_loads": loads}  # fmt: skip


def ptxas_report(ptx: str, target: Target) -> dict[str, int]:
    """Run the wheel's ptxas -v on ``ptx``: registers, stack, spill stores and loads (bytes)."""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [ptxas_path(target.capability), "-v", f"--gpu-name={target.gpu_name}", source,
             "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = result.stdout + result.stderr
    report = parse_ptxas(log)
    if report is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return report


def _compile(src, gpu, options: dict):
    """triton.compile with its own ptxas -v log captured (TRITON_DUMP_PTXAS_LOG prints it): the
    report of the very ptxas run that made the cubin. None in the log when the cubin came from
    triton's cache."""
    knobs = triton.knobs.nvidia
    before = knobs.dump_ptxas_log
    knobs.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            compiled = triton.compile(src, target=gpu, options=options)
    finally:
        knobs.dump_ptxas_log = before
    return compiled, parse_ptxas(out.getvalue())


def compile_launch(launch: Launch, target: Target) -> Compiled:
    """Compile one recorded launch for ``target`` and read its resources (see the module doc)."""
    import time

    from triton.compiler import ASTSource

    started = time.perf_counter()
    base = dict(
        kernel=launch.name, config=config_label(launch), dtype=input_dtype(launch),
        target=target.name, num_warps=launch.num_warps,
    )  # fmt: skip
    try:
        signature, constexprs, attrs, options, _ = _specialize(launch, target)
        src = ASTSource(launch.kernel, signature, constexprs, attrs)
        gpu = triton.backends.compiler.GPUTarget("cuda", target.capability, 32)
        compiled, report = _compile(src, gpu, options.__dict__)
        if report is None:  # from the cache: run ptxas -v on its PTX again
            report = ptxas_report(compiled.asm["ptx"], target)
    except Exception as error:  # a compile error is a result: recorded and reported
        message = f"{type(error).__name__}: {error}".strip().splitlines()
        return Compiled(
            **base, registers=0, spills=0, spill_stores=0, spill_loads=0, stack=0, shared=0,
            ctas_by_registers=0, ctas=0, warps_per_sm=0,
            compile_seconds=time.perf_counter() - started, error=" | ".join(message[-3:]),
        )  # fmt: skip
    shared = int(compiled.metadata.shared)
    occ = occupancy(report["registers"], launch.num_warps, shared, target)
    return Compiled(
        **base, registers=report["registers"],
        spills=report["spill_stores"] + report["spill_loads"],
        spill_stores=report["spill_stores"], spill_loads=report["spill_loads"],
        stack=report["stack"], shared=shared, ctas_by_registers=occ.by_registers, ctas=occ.ctas,
        warps_per_sm=occ.ctas * launch.num_warps,
        compile_seconds=time.perf_counter() - started,
    )  # fmt: skip


# --- the configurations the launchers can choose -------------------------------------------------

# Shapes that put each launcher on each of its paths at 132 SMs: (shape, layout).
BATCH_NORM_SHAPES = {
    "planar split": ((32, 64, 56, 56), "NCHW"),  # 1 x 4096 tiles, A split in chunks
    "planar fused": ((256, 2048, 7, 7), "NCHW"),  # one program per channel
    "interleaved split": ((32, 64, 56, 56), "NHWC"),  # 64 x 64 tiles of (positions, channels)
    "interleaved fused": ((64, 4096), "NHWC"),  # (N, C): 64 rows, one chunk per channel block
}
GROUP_NORM_SHAPES = {
    "planar": ((2, 320, 64, 64), "NCHW"),
    "interleaved": ((2, 320, 64, 64), "NHWC"),
}
LAYER_NORM_WIDTHS = (1024, 16384, 20000)  # a 4 x 1024 tile; one 16384 row; two sweeps per row
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grad_choices(affine: bool) -> list[tuple[bool, bool]]:
    """(input needs grad, parameters need grad) as autograd can ask for them."""
    return [(True, True), (True, False), (False, True)] if affine else [(True, False)]


def _scenarios(dtype: torch.dtype, full: bool):
    """Calls of the ops entry points on meta tensors that reach the launchers' configurations:
    every activation, residual or not, training or eval, affine or not (in ``full`` also weight
    without bias and bias without weight), running statistics or not, and which gradients autograd
    asks for; InPlace-ABN with its invertible activations; group and layer norm."""
    from normkit.kernels import ops
    from normkit.kernels._math import ACTIVATIONS

    affines = [(True, True), (False, False)] + ([(True, False), (False, True)] if full else [])
    for shape, layout in BATCH_NORM_SHAPES.values():
        c = shape[1]
        for training in (True, False):
            for has_w, has_b in affines:
                for x_grad, p_grad in _grad_choices(has_w or has_b):
                    for running in (True, False) if training else (True,):
                        for act in ACTIVATIONS:
                            for residual in (False, True):
                                yield _bn_call(
                                    ops.batch_norm_act, shape, layout, dtype, c, training,
                                    has_w, has_b, x_grad, p_grad, running, act, residual,
                                )  # fmt: skip
                            if act in ("identity", "leaky_relu", "elu"):
                                yield _bn_call(
                                    ops.inplace_abn, shape, layout, dtype, c, training,
                                    has_w, has_b, x_grad, p_grad, running, act, None,
                                )  # fmt: skip
    for shape, layout in GROUP_NORM_SHAPES.values():
        for affine in (True, False):
            for x_grad, p_grad in _grad_choices(affine):
                yield _norm_call(ops.group_norm, shape, layout, dtype, affine, x_grad, p_grad)
    for width in LAYER_NORM_WIDTHS:
        for affine in (True, False):
            for x_grad, p_grad in _grad_choices(affine):
                yield _norm_call(ops.layer_norm, (64, width), "rows", dtype, affine, x_grad, p_grad)


def _meta(shape, dtype, layout, requires_grad):
    from normkit.kernels._launch_plans import meta_input

    return meta_input(shape, dtype, layout, requires_grad)


def _bn_call(entry, shape, layout, dtype, c, training, has_w, has_b, x_grad, p_grad, running, act,
             residual):  # fmt: skip
    from normkit.kernels._math import ACTIVATIONS

    param = {"leaky_relu": 0.01, "elu": 1.0}.get(act, 0.0)

    def run():
        x = _meta(shape, dtype, layout, x_grad)
        w = torch.empty(c, device="meta").requires_grad_(p_grad) if has_w else None
        b = torch.empty(c, device="meta").requires_grad_(p_grad) if has_b else None
        stats = (torch.empty(c, device="meta"), torch.empty(c, device="meta"))
        stats = stats if running else (None, None)
        inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
        if residual is None:  # InPlace-ABN (out of place: a leaf input)
            y = entry(x, *stats, w, b, training, 0.1, 1e-5, act, param, False)
        else:
            z = _meta(shape, dtype, layout, False) if residual else None
            y = entry(x, z, *stats, w, b, training, 0.1, 1e-5, act, param)
        return y, inputs

    assert act in ACTIVATIONS
    return run


def _norm_call(entry, shape, layout, dtype, affine, x_grad, p_grad):
    def run():
        x = _meta(shape, dtype, layout, x_grad)
        c = shape[-1] if layout == "rows" else shape[1]
        w = torch.empty(c, device="meta").requires_grad_(p_grad) if affine else None
        b = torch.empty(c, device="meta").requires_grad_(p_grad) if affine else None
        inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
        if layout == "rows":
            return entry(x, (c,), w, b, 1e-5), inputs
        return entry(x, 32, w, b, 1e-5), inputs

    return run


def _launches_of(run, multiprocessors: int) -> list[Launch]:
    from normkit.kernels._utils import launch_overrides, recording

    with launch_overrides(multiprocessors=multiprocessors), recording() as launches:
        y, inputs = run()
        if inputs:
            torch.autograd.grad(y, inputs, torch.empty_like(y))
    return launches


def configurations(full: bool = True, multiprocessors: int = 132) -> list[Launch]:
    """One launch per distinct (kernel, configuration, input dtype) that the entry points reach,
    in the order first met. ``full`` adds the tile shapes and warps that the plans choose on the
    shapes of docs/benchmarks.md (:mod:`normkit.kernels._launch_plans`) at 132 and 108 SMs."""
    from normkit.kernels import _launch_plans as launch_plans

    seen: dict[tuple, Launch] = {}

    def add(launches):
        for launch in launches:
            seen.setdefault((launch.name, config_label(launch), input_dtype(launch)), launch)

    for dtype in DTYPES:
        for run in _scenarios(dtype, full):
            add(_launches_of(run, multiprocessors))
        if full:
            for device in launch_plans.DEVICES:
                for case in launch_plans.doc_cases():
                    case = launch_plans.Case(case.op, case.shape, case.layout, dtype)
                    add(launch_plans.record_case(case, device.multiprocessors))
    return list(seen.values())

"""Speed and memory of normkit's kernels and fused layers against PyTorch, on the CPU or a GPU.

The table behind ``benchmarks/bench_kernels.py``, ``benchmarks/bench_memory.py``,
``benchmarks/gpu_check.py`` and ``normkit bench``, so that anyone can check the figures in
docs/benchmarks.md on their own machine. Every row times normkit and PyTorch on the same tensors
in the same process:

- CPU: medians of ``torch.utils.benchmark.Timer.blocked_autorange``, normkit and torch alternated
  over several rounds (median of the round medians);
- GPU: medians of ``triton.testing.do_bench`` (warm-up, L2 flushed between runs).

Columns: op, shape, dtype, layout, ours ms, torch ms, ratio (ours / torch: below 1 is faster),
GB/s and % of a device-to-device copy (``y.copy_(x)`` of the same tensor, timed in the same run).
GB/s counts the *minimum* bytes (docs/benchmarks.md, "Byte counts"): T·s per tensor read or written
once, so a kernel that re-reads its input shows below its true traffic. Per op:

    bn_fwd, bn_eval, gn_fwd, ln_fwd:   read x, write y                      2Ts
    bn, gn, ln, bn_relu, iabn (fwd+bwd): forward 2Ts + backward (x, dy -> dx) 3Ts = 5Ts
    bn_add_relu (fwd+bwd):             forward (x, z -> y) 3Ts + backward (x, z, dy -> dx, dz) 5Ts

Memory (:func:`memory_table`): bytes saved for backward (unique storages packed by autograd,
through ``torch.autograd.graph.saved_tensors_hooks``) and the peak memory of one training step of
a small convolutional block (``max_memory_allocated`` on CUDA; on the CPU the running total of
the profiler's allocation events).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

import normkit as nk
from normkit.functional import _dispatch

# op -> (description, minimum bytes in units of T*s, shape family)
OPS: dict[str, tuple[str, int, str]] = {
    "bn_fwd": ("BatchNorm2d training forward", 2, "bn"),
    "bn": ("BatchNorm2d forward + backward", 5, "bn"),
    "bn_eval": ("BatchNorm2d eval forward", 2, "bn"),
    "bn_relu": ("BatchNormAct(relu) vs BatchNorm2d -> ReLU(inplace), fwd + bwd", 5, "bn"),
    "bn_add_relu": ("BatchNormAct(relu, residual) vs relu_(bn(x) + z), fwd + bwd", 8, "bn"),
    "iabn": ("InPlaceABN vs BatchNorm2d -> LeakyReLU(inplace), fwd + bwd", 5, "bn"),
    "gn_fwd": ("GroupNorm(32) forward", 2, "gn"),
    "gn": ("GroupNorm(32) forward + backward", 5, "gn"),
    "ln_fwd": ("LayerNorm forward", 2, "ln"),
    "ln": ("LayerNorm forward + backward", 5, "ln"),
}

# Shapes per family. CPU: sizes that run in milliseconds on a few cores. GPU: docs/benchmarks.md (ResNet-50
# batch norms, SD-UNet group norms, transformer layer norms).
SHAPES = {
    "cpu": {
        "bn": [(32, 64, 56, 56), (64, 256, 14, 14)],
        "gn": [(8, 128, 32, 32)],
        "ln": [(4096, 1024)],
    },
    "cuda": {
        "bn": [(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7), (32, 512, 28, 28)],
        "gn": [(2, 320, 64, 64), (2, 1280, 16, 16)],
        "ln": [(4096, 1024), (4096, 4096), (4096, 8192), (4096, 16384)],
    },
}
LAYOUTS = {"bn": ("NCHW", "NHWC"), "gn": ("NCHW", "NHWC"), "ln": ("rows",)}


@dataclass
class Row:
    op: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    ours_backend: str
    ours_ms: float
    torch_ms: float
    ratio: float
    gbps: float
    pct_copy: float
    bytes_formula: str
    device: str
    torch_variant: str = ""

    def cells(self) -> list[str]:
        return [
            self.op,
            self.ours_backend + (f" vs {self.torch_variant}" if self.torch_variant else ""),
            "x".join(map(str, self.shape)),
            self.dtype,
            self.layout,
            f"{self.ours_ms:.3f}",
            f"{self.torch_ms:.3f}",
            f"{self.ratio:.2f}",
            f"{self.gbps:.1f}",
            f"{self.pct_copy:.0f}%",
        ]


HEADER = [
    "op",
    "ours",
    "shape",
    "dtype",
    "layout",
    "ours ms",
    "torch ms",
    "ours/torch",
    "GB/s",
    "% copy",
]


# --- timing ------------------------------------------------------------------------------------------


def _cpu_time(fn: Callable[[], object], min_run_time: float, threads: int) -> float:
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _cpu_clock_samples(fn: Callable[[], object], calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return samples


def _gpu_time(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") / 1e3


@dataclass(frozen=True)
class Timing:
    """How to time: rounds and seconds per timing on the CPU, ``rep`` milliseconds on a GPU."""

    rounds: int = 3
    min_run_time: float = 0.3
    rep_ms: int = 100
    threads: int | None = None  # CPU threads while timing; default: torch.get_num_threads()
    # "wall" (default) or "cpu": the process's CPU time per call (time.process_time), medians of
    # `calls` calls per round. On a shared machine CPU time is far steadier than wall time; with one
    # thread it is the computation's time.
    clock: str = "wall"
    calls: int = 10

    def compare(self, device: str, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Median seconds of each function; alternated over rounds so that drift hits all."""
        threads = self.threads or torch.get_num_threads()
        if device == "cpu" and threads != torch.get_num_threads():
            torch.set_num_threads(threads)  # before the warm-up: compiled code depends on it
        for fn in fns.values():
            fn()  # warm-up: compilation, caches, allocator
        if device == "cuda":
            torch.cuda.synchronize()
            return {name: _gpu_time(fn, self.rep_ms) for name, fn in fns.items()}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(self.rounds):
            for name, fn in fns.items():
                if self.clock == "cpu":
                    samples[name] += _cpu_clock_samples(fn, self.calls)
                else:
                    samples[name].append(_cpu_time(fn, self.min_run_time, threads))
        return {name: statistics.median(values) for name, values in samples.items()}


# --- the ops -----------------------------------------------------------------------------------------


def _input(shape, dtype, layout, device, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, *extra) -> Callable:
    """Forward and backward through ``module`` in training mode, gradients returned (not
    accumulated, so no extra pass over .grad)."""
    leaf = x.detach().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        y = module(leaf, *extra)
        torch.autograd.grad(y, [leaf, *params], dy)

    return step


def _forward(module: nn.Module, x: torch.Tensor, training: bool) -> Callable:
    module.train(training)

    def step():
        with torch.no_grad():
            module(x)

    return step


class _Sequential(nn.Module):
    """torch's unfused pair, the way models write it (activation in place after the norm)."""

    def __init__(self, norm: nn.Module, act: nn.Module, residual: bool = False):
        super().__init__()
        self.norm, self.act, self.residual = norm, act, residual

    def forward(self, x, z=None):
        y = self.norm(x)
        return self.act(y + z if self.residual else y)


def _layers(op: str, shape, device, dtype) -> tuple[nn.Module, nn.Module]:
    """(ours, torch's) modules for an op, with the same parameters."""
    c = shape[1] if op not in ("ln", "ln_fwd") else shape[-1]
    param_dtype = torch.float32  # parameters stay float32 under autocast-style mixed precision
    if op.startswith("gn"):
        ours, theirs = nk.GroupNorm(32, c), nn.GroupNorm(32, c)
    elif op.startswith("ln"):
        ours, theirs = nk.LayerNorm(c), nn.LayerNorm(c)
    elif op == "bn_relu":
        ours = nk.BatchNormAct(c, activation="relu")
        theirs = _Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))
    elif op == "bn_add_relu":
        ours = nk.BatchNormAct(c, activation="relu", residual=True)
        theirs = _Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), residual=True)
    elif op == "iabn":
        ours = nk.InPlaceABN(c, activation="leaky_relu", activation_param=0.01)
        theirs = _Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True))
    else:
        ours, theirs = nk.BatchNorm2d(c), nn.BatchNorm2d(c)
    ours = ours.to(device=device, dtype=param_dtype)
    theirs = theirs.to(device=device, dtype=param_dtype)
    if dtype != torch.float32 and (op.startswith("gn") or op.startswith("ln")):
        # torch's CPU/CUDA group and layer norm want parameters in the input's dtype
        ours, theirs = ours.to(dtype), theirs.to(dtype)
    return ours, theirs


def _steps(op: str, shape, dtype, layout, device) -> tuple[Callable, Callable]:
    x = _input(shape, dtype, layout, device)
    dy = _input(shape, dtype, layout, device, seed=1)
    ours, theirs = _layers(op, shape, device, dtype)
    if op.endswith("_fwd") or op == "bn_eval":
        training = op != "bn_eval"
        return _forward(ours, x, training), _forward(theirs, x, training)
    extra = (_input(shape, dtype, layout, device, seed=2),) if op == "bn_add_relu" else ()
    return _train_step(ours, x, dy, *extra), _train_step(theirs, x, dy, *extra)


def _copy_seconds(shape, dtype, device, timing: Timing) -> float:
    x = _input(shape, dtype, "NCHW", device)
    y = torch.empty_like(x)
    return timing.compare(device, {"copy": lambda: y.copy_(x)})["copy"]


def speed_table(
    ops: Iterable[str] | None = None,
    device: str = "cpu",
    dtypes: Iterable[torch.dtype] = (torch.float32,),
    layouts: Iterable[str] | None = None,
    shapes: dict[str, list[tuple[int, ...]]] | None = None,
    backend: str = "auto",
    timing: Timing | None = None,
    torch_variants: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Time every (op, shape, dtype, layout); ``backend`` is the normkit backend for "ours".

    With ``torch_variants`` on CUDA, batch-norm rows are timed twice for torch: with cuDNN (its
    default) and with cuDNN disabled (ATen's own kernels).
    """
    ops = list(ops or OPS)
    timing = timing or Timing()
    family_shapes = shapes or SHAPES["cuda" if device == "cuda" else "cpu"]
    rows: list[Row] = []
    copies: dict[tuple, float] = {}
    for op in ops:
        if op not in OPS:
            raise nk.errors.ConfigError(f"unknown op {op!r}; choose from {sorted(OPS)}")
        _, multiple, family = OPS[op]
        for shape in family_shapes[family]:
            for dtype in dtypes:
                for layout in layouts or LAYOUTS[family]:
                    if layout not in LAYOUTS[family]:
                        continue
                    key = (tuple(shape), dtype)
                    if key not in copies:
                        copies[key] = _copy_seconds(shape, dtype, device, timing)
                    variants = [("", True)]
                    if torch_variants and device == "cuda" and family == "bn":
                        variants.append((" (cuDNN off)", False))
                    for suffix, cudnn in variants:
                        with nk.backend(backend), torch.backends.cudnn.flags(enabled=cudnn):
                            ours, theirs = _steps(op, shape, dtype, layout, device)
                            seconds = timing.compare(device, {"ours": ours, "torch": theirs})
                        rows.append(
                            _row(op, shape, dtype, layout, backend, device, seconds, copies[key])
                        )
                        rows[-1].torch_variant = suffix.strip(" ()")
                        if progress:
                            progress(" ".join(rows[-1].cells()) + suffix)
    return rows


def _row(op, shape, dtype, layout, backend, device, seconds, copy_seconds) -> Row:
    element = torch.empty((), dtype=dtype).element_size()
    multiple = OPS[op][1]
    nbytes = multiple * math.prod(shape) * element
    gbps = nbytes / seconds["ours"] / 1e9
    copy_gbps = 2 * math.prod(shape) * element / copy_seconds / 1e9
    return Row(
        op=op,
        shape=tuple(shape),
        dtype=str(dtype).removeprefix("torch."),
        layout=layout,
        ours_backend=backend,
        ours_ms=seconds["ours"] * 1e3,
        torch_ms=seconds["torch"] * 1e3,
        ratio=seconds["ours"] / seconds["torch"],
        gbps=gbps,
        pct_copy=100 * gbps / copy_gbps,
        bytes_formula=f"{multiple}Ts",
        device=device,
    )


# --- memory ------------------------------------------------------------------------------------------


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


class _Block(nn.Module):
    """conv -> norm+act -> conv -> norm+act: where the saved activations of a network come from."""

    def __init__(self, channels: int, make_norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = make_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(channels)

    def forward(self, x):
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


MEMORY_VARIANTS: dict[str, Callable[[int], nn.Module]] = {
    "torch BatchNorm2d -> ReLU": lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()),
    "torch BatchNorm2d -> ReLU(inplace)": lambda c: nn.Sequential(
        nn.BatchNorm2d(c), nn.ReLU(inplace=True)
    ),
    "nk.BatchNormAct(relu)": lambda c: nk.BatchNormAct(c, activation="relu"),
    "torch BatchNorm2d -> LeakyReLU": lambda c: nn.Sequential(
        nn.BatchNorm2d(c), nn.LeakyReLU(0.01)
    ),
    "torch BatchNorm2d -> LeakyReLU(inplace)": lambda c: nn.Sequential(
        nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True)
    ),
    "nk.InPlaceABN(leaky_relu)": lambda c: nk.InPlaceABN(c, activation="leaky_relu"),
}


def _cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the running total of the CPU allocations the profiler records during ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage != 0),
        key=lambda e: e.time_range.start,
    )
    total = peak = 0
    for event in events:
        total += event.cpu_memory_usage
        peak = max(peak, total)
    return peak


def memory_table(
    device: str = "cpu",
    shape: tuple[int, int, int, int] = (16, 64, 56, 56),
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> list[dict]:
    """Saved-for-backward bytes of one norm+activation layer and peak memory of a block's step."""
    x = _input(shape, dtype, "NCHW", device)
    rows = []
    for name, make in MEMORY_VARIANTS.items():
        op = "inplace_abn" if "InPlaceABN" in name else "batch_norm_act"
        with nk.backend(backend if backend in _dispatch.implementations(op) else "auto"):
            rows.append(_memory_row(name, make, x, device))
    return rows


def _memory_row(name: str, make: Callable[[int], nn.Module], x: torch.Tensor, device: str):
    channels = x.shape[1]
    layer = make(channels).to(device)
    leaf = x.detach().requires_grad_()
    layer_bytes = saved_bytes(lambda: layer(leaf * 1))  # a non-leaf input, as after a conv
    block = _Block(channels, make).to(device=device, dtype=x.dtype)
    inputs = x.detach().clone().requires_grad_()

    def step():
        block(inputs).sum().backward()

    step()  # warm-up (compilation, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _cpu_peak_bytes(step)
    block_bytes = saved_bytes(lambda: block(inputs))
    return {
        "variant": name,
        "shape": list(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "device": device,
        "layer_saved_bytes": layer_bytes,
        "layer_saved_in_T": layer_bytes / x.nbytes,
        "block_saved_bytes": block_bytes,
        "step_peak_bytes": peak,
    }


# --- reporting ---------------------------------------------------------------------------------------


def environment(device: str = "cpu") -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "normkit": nk.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def format_table(rows: list[Row]) -> str:
    cells = [HEADER] + [row.cells() for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADER))]
    lines = [
        "  ".join(
            c.rjust(w) if i >= 5 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_memory(rows: list[dict]) -> str:
    lines = [
        f"{'variant':42s} {'saved/layer':>12s} {'x T':>6s} {'saved/block':>12s} {'peak/step':>12s}"
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:42s} {r['layer_saved_bytes'] / 2**20:10.2f}MB "
            f"{r['layer_saved_in_T']:6.2f} {r['block_saved_bytes'] / 2**20:10.2f}MB "
            f"{r['step_peak_bytes'] / 2**20:10.2f}MB"
        )
    return "\n".join(lines)


def to_json(rows: list[Row], memory: list[dict] | None, device: str) -> str:
    return json.dumps(
        {
            "environment": environment(device),
            "speed": [asdict(r) for r in rows],
            "memory": memory or [],
        },
        indent=2,
    )

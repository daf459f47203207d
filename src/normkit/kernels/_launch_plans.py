"""Launch plans of the Triton kernels on the shapes that matter, computed without a GPU.

For each op (batch norm training forward and backward, eval forward; group norm and layer norm
forward and backward) and each shape of docs/benchmarks.md (ResNet-50's batch norms at batch 32
and 256, NCHW and NHWC; Stable Diffusion U-Net group norms; transformer layer norms), the op's entry
point in :mod:`normkit.kernels.ops` runs on tensors of the ``meta`` device inside
:func:`normkit.kernels._utils.recording`, planned for a device's multiprocessor count: every kernel
launch the launchers would start is recorded, and nothing runs. Each launch then gets

- its grid and programs per multiprocessor (H100 SXM: 132 SMs; A100: 108),
- the serial work of one program (tiles it sweeps, in a loop),
- the bytes it moves (:func:`traffic`: every sweep over a tensor counted as DRAM traffic, no
  credit for L2 hits; so the fused one-program-per-channel path counts its second read of x), and
- the time those bytes take at a stated bandwidth (:data:`H100_BANDWIDTH`, the H100 SXM's spec
  3.35 TB/s), which ``benchmarks/gpu_check.py`` divides by the time it measures.

:func:`check` states the rules the plans must keep: every launch fills the device with at least
MIN_PROGRAMS_PER_SM programs per SM, or says why it cannot (a second-stage merge of the partials:
a few hundred KiB at most, swept in at most MAX_STAGE_TILES tiles), and no reduction falls back
to one program per channel with a long serial loop while its tiles could be split across
programs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from normkit.kernels._utils import (
    DEFAULT_TILE,
    MIN_PROGRAMS_PER_SM,
    MIN_TILE,
    PROGRAMS_PER_SM,
    Launch,
)

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM (80 GB HBM3) spec; the device check measures a copy
SECOND_STAGES = ("_merge_moments_kernel", "_grad_coefficients_kernel")
MAX_STAGE_TILES = 32  # a second-stage program may sweep this many tiles of partials in a loop


@dataclass(frozen=True)
class Device:
    name: str
    multiprocessors: int


H100 = Device("H100 SXM", 132)
A100 = Device("A100", 108)
DEVICES = (H100, A100)

# ResNet-50's batch norms (torchvision v1.5: stride on the 3x3 conv): (channels, height = width).
RESNET50_BATCH_NORMS = [
    (64, 112), (64, 56), (128, 56), (256, 56), (128, 28), (256, 28), (512, 28),
    (256, 14), (512, 14), (1024, 14), (512, 7), (2048, 7),
]  # fmt: skip
RESNET50_BATCHES = (32, 256)
# Stable Diffusion 1.x U-Net at 512x512 (64x64 latents), batch 2 (classifier-free guidance),
# 32 groups: (channels, height = width) of its group norms, skip concatenations included.
SD_UNET_GROUP_NORMS = [
    (320, 64), (640, 64), (960, 64), (320, 32), (640, 32), (960, 32), (1280, 32), (1920, 32),
    (640, 16), (1280, 16), (1920, 16), (2560, 16), (1280, 8), (2560, 8),
]  # fmt: skip
SD_UNET_BATCH, SD_UNET_GROUPS = 2, 32
# Transformer layer norms (rows = tokens, width = hidden size): docs/benchmarks.md's and GPT-2's.
TRANSFORMER_LAYER_NORMS = [(4096, 1024), (4096, 4096), (4096, 8192), (4096, 16384), (8192, 768)]


@dataclass(frozen=True)
class Case:
    """One op on one shape: what a plan row describes."""

    op: str  # bn_fwd, bn_bwd, bn_eval, gn_fwd, gn_bwd, ln_fwd, ln_bwd
    shape: tuple[int, ...]
    layout: str  # NCHW, NHWC or rows
    dtype: torch.dtype = torch.bfloat16

    @property
    def family(self) -> str:
        return self.op.split("_")[0]

    @property
    def label(self) -> str:
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.layout}"


def doc_cases() -> list[Case]:
    """Every (op, shape, layout) of docs/benchmarks.md's GPU shapes."""
    cases = []
    for batch in RESNET50_BATCHES:
        for channels, size in RESNET50_BATCH_NORMS:
            for layout in ("NCHW", "NHWC"):
                for op in ("bn_fwd", "bn_bwd", "bn_eval"):
                    cases.append(Case(op, (batch, channels, size, size), layout))
    for channels, size in SD_UNET_GROUP_NORMS:
        for layout in ("NCHW", "NHWC"):
            for op in ("gn_fwd", "gn_bwd"):
                cases.append(Case(op, (SD_UNET_BATCH, channels, size, size), layout))
    for rows, width in TRANSFORMER_LAYER_NORMS:
        for op in ("ln_fwd", "ln_bwd"):
            cases.append(Case(op, (rows, width), "rows"))
    return cases


# --- recording the launches of one op -------------------------------------------------------------


def meta_input(shape, dtype, layout: str, requires_grad: bool = False) -> torch.Tensor:
    """An input on the meta device; NHWC = channels_last (an (N, C) input has its channels
    innermost already)."""
    return make_input(shape, dtype, layout, "meta", requires_grad)


def make_input(shape, dtype, layout: str, device, requires_grad: bool = False) -> torch.Tensor:
    """A random input on ``device`` (uninitialised on the meta device) in ``layout``."""
    if torch.device(device).type == "meta":
        x = torch.empty(shape, device="meta", dtype=dtype)
    else:
        x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    if layout == "NHWC" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def workload(case: Case, device) -> Callable[[], object]:
    """A function that runs exactly the launches of ``case``'s plan row on ``device``: the op's
    forward (through its entry point in normkit.kernels.ops, with affine parameters and, for batch
    norm, running statistics: the layers' defaults), or its backward (the forward runs once here,
    and each call computes dL/dx, dL/dw, dL/db again from the kept graph)."""
    from normkit.kernels import ops

    training = case.op != "bn_eval"
    grad = case.op.endswith("_bwd")
    x = make_input(case.shape, case.dtype, case.layout, device, requires_grad=grad)
    c = case.shape[-1] if case.family == "ln" else case.shape[1]
    w = (torch.rand(c, device=device) + 0.5).requires_grad_(grad)
    b = torch.randn(c, device=device).requires_grad_(grad)
    if case.family == "bn":
        stats = torch.zeros(c, device=device), torch.ones(c, device=device)
        run = lambda: ops.batch_norm(x, *stats, w, b, training, 0.1, 1e-5)  # noqa: E731
    elif case.family == "gn":
        run = lambda: ops.group_norm(x, SD_UNET_GROUPS, w, b, 1e-5)  # noqa: E731
    else:
        run = lambda: ops.layer_norm(x, (c,), w, b, 1e-5)  # noqa: E731
    if not grad:
        return run
    y = run()
    dy = make_input(case.shape, case.dtype, case.layout, device)  # y's layout: x's
    return lambda: torch.autograd.grad(y, [x, w, b], dy, retain_graph=True)


def record_case(case: Case, multiprocessors: int) -> list[Launch]:
    """The launches of one plan row, recorded from :func:`workload` on the meta device."""
    from normkit.kernels._utils import launch_overrides, recording

    with launch_overrides(multiprocessors=multiprocessors):
        with recording():  # a backward row's forward, run once to build the graph: not its own
            run = workload(case, "meta")
        with recording() as launches:
            run()
    return launches


# --- bytes moved ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    read: int
    written: int

    @property
    def total(self) -> int:
        return self.read + self.written


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _affine(a: dict, k: dict) -> int:
    """Bytes of the per-channel weight and bias a kernel reads (when it has them)."""
    total = 0
    for flag, name in (("HAS_W", "weight_ptr"), ("HAS_B", "bias_ptr")):
        if k.get(flag):
            total += _bytes(a[name])
    return total


def traffic(launch: Launch) -> Traffic:
    """Bytes a launch moves between DRAM and the SMs: each sweep over a tensor counted once per
    sweep (the fused paths' second sweep too, although it often hits L2), per-channel vectors and
    partial buffers included, and the torch reduction that finishes layer norm's weight-gradient
    partials charged to the kernel that writes them."""
    a, k = launch.named_args(), launch.constexprs
    name = launch.name
    read = written = 0
    if name == "_moments_kernel":
        x = _bytes(a["x_ptr"])
        if k["FUSED"]:
            read += 2 * x + (_bytes(a["z_ptr"]) if k["HAS_Z"] else 0) + _affine(a, k)
            written += _bytes(a["y_ptr"]) + 2 * _bytes(a["stat_mean_ptr"])
            if k["HAS_RUNNING"]:
                running = _bytes(a["running_mean_ptr"]) + _bytes(a["running_var_ptr"])
                read, written = read + running, written + running
        else:
            read += x
            written += 3 * _bytes(a["count_ptr"])
    elif name == "_merge_moments_kernel":
        read += 3 * _bytes(a["count_ptr"])
        written += _bytes(a["stat_mean_ptr"]) + _bytes(a["stat_invstd_ptr"])
        if k["HAS_RUNNING"]:
            running = _bytes(a["running_mean_ptr"]) + _bytes(a["running_var_ptr"])
            read, written = read + running, written + running
    elif name == "_normalize_kernel":
        read += _bytes(a["x_ptr"]) + (_bytes(a["z_ptr"]) if k["HAS_Z"] else 0)
        read += _bytes(a["mean_ptr"]) + _bytes(a["stat_ptr"]) + _affine(a, k)
        written += _bytes(a["y_ptr"])
    elif name in ("_grad_sums_kernel", "_input_grad_kernel"):
        sweep = (
            _bytes(a["dy_ptr"]) + _bytes(a["src_ptr"]) + (_bytes(a["z_ptr"]) if k["HAS_Z"] else 0)
        )
        outputs = (_bytes(a["dx_ptr"]) if k["WRITE_DX"] else 0) + (
            _bytes(a["dz_ptr"]) if k["HAS_Z"] else 0
        )
        read += _bytes(a["mean_ptr"]) + _bytes(a["invstd_ptr"]) + _affine(a, k)
        if name == "_input_grad_kernel":
            read += sweep + (2 * _bytes(a["coef_a_ptr"]) if k["TRAINING"] else 0)
            written += outputs
        else:
            read += sweep
            written += 2 * _bytes(a["sum_g_ptr"])
            if k["FUSED"] and (k["WRITE_DX"] or k["HAS_Z"]):
                read += sweep
                written += outputs
    elif name == "_grad_coefficients_kernel":
        read += 2 * _bytes(a["sum_g_ptr"]) + (_bytes(a["weight_ptr"]) if k["HAS_W"] else 0)
        written += _bytes(a["coef_a_ptr"]) + _bytes(a["coef_b_ptr"])
    elif name == "_layer_norm_forward_kernel":
        x = _bytes(a["x_ptr"])
        read += (x if k["SINGLE"] else 2 * x) + _affine(a, k)
        written += _bytes(a["y_ptr"]) + _bytes(a["mean_ptr"]) + _bytes(a["invstd_ptr"])
    elif name == "_layer_norm_backward_kernel":
        partials = _bytes(a["dweight_ptr"]) + _bytes(a["dbias_ptr"])
        sweep = _bytes(a["x_ptr"]) + _bytes(a["dy_ptr"])
        read += (sweep if k["SINGLE"] else 2 * sweep) + _affine(a, k)
        read += _bytes(a["mean_ptr"]) + _bytes(a["invstd_ptr"])
        written += (_bytes(a["dx_ptr"]) if k["WRITE_DX"] else 0) + partials
        if not k["SINGLE"]:  # each row reads and writes its program's partial row
            rows = a["M"]
            width_bytes = 4 * a["W"]
            read += 2 * rows * width_bytes
            written += 2 * rows * width_bytes
        read += partials  # the torch.sum over programs that finishes dL/dw, dL/db
    else:
        raise KeyError(f"no traffic model for kernel {name}")
    return Traffic(read, written)


def minimum_bytes(case: Case) -> int:
    """The op's minimum traffic (docs/benchmarks.md, "Byte counts"): forward 2Ts (read x, write
    y), backward 3Ts (read x and dy, write dx)."""
    ts = math.prod(case.shape) * torch.empty((), dtype=case.dtype).element_size()
    return (3 if case.op.endswith("_bwd") else 2) * ts


# --- plan rows and the rules ---------------------------------------------------------------------


@dataclass
class LaunchRow:
    kernel: str
    grid: tuple[int, ...]
    programs: int
    programs_per_sm: float
    num_warps: int
    tile: str
    tiles_per_program: int
    read: int
    written: int
    ideal_us: float
    fills: bool
    why: str = ""

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass
class PlanRow:
    case: Case
    device: Device
    launches: list[LaunchRow]
    minimum: int
    problems: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.launches)

    @property
    def ideal_us(self) -> float:
        return self.bytes / H100_BANDWIDTH * 1e6

    def as_dict(self) -> dict:
        return {
            "op": self.case.op,
            "shape": list(self.case.shape),
            "layout": self.case.layout,
            "dtype": str(self.case.dtype).removeprefix("torch."),
            "device": self.device.name,
            "multiprocessors": self.device.multiprocessors,
            "bytes": self.bytes,
            "minimum_bytes": self.minimum,
            "ideal_us_at_3.35TBps": self.ideal_us,
            "launches": [r.__dict__ | {"grid": list(r.grid)} for r in self.launches],
            "problems": self.problems,
        }


def _tile(launch: Launch) -> tuple[str, int]:
    """A readable tile and the tiles one program sweeps."""
    k, a = launch.constexprs, launch.named_args()
    if "BLOCK_COLS" in k:
        items = a.get("items", 1)
        return f"{k['BLOCK_A']}x{k['BLOCK_COLS']}", int(items)
    if "BLOCK_W" in k:
        if launch.name == "_layer_norm_backward_kernel":
            per_row = 1 if k["SINGLE"] else math.ceil(a["W"] / k["BLOCK_W"])
            return f"{k['BLOCK_M']}x{k['BLOCK_W']}", a["rows_per_program"] // k["BLOCK_M"] * per_row
        per_row = 1 if k["SINGLE"] else 2 * math.ceil(a["W"] / k["BLOCK_W"])
        return f"{k['BLOCK_M']}x{k['BLOCK_W']}", per_row
    return f"{k['BLOCK_J']}x{k['BLOCK_K']}", math.ceil(a["chunks"] * a["D"] / k["BLOCK_J"])


def _launch_row(launch: Launch, device: Device) -> LaunchRow:
    t = traffic(launch)
    tile, tiles = _tile(launch)
    per_sm = launch.programs / device.multiprocessors
    fills = per_sm >= MIN_PROGRAMS_PER_SM
    why = ""
    if not fills and launch.name in SECOND_STAGES:
        why = f"second stage: {t.total / 1024:.0f} KiB of partials, {tiles} tile(s) per program"
    elif not fills:
        elements = max(v.numel() for v in launch.args if isinstance(v, torch.Tensor))
        if elements < MIN_PROGRAMS_PER_SM * device.multiprocessors * MIN_TILE:
            why = (
                f"tiny tensor: {elements} values = {math.ceil(elements / MIN_TILE)} tiles of "
                f"{MIN_TILE}, fewer than {MIN_PROGRAMS_PER_SM} per SM"
            )
    return LaunchRow(
        launch.name, launch.grid, launch.programs, per_sm, launch.num_warps, tile, tiles,
        t.read, t.written, t.total / H100_BANDWIDTH * 1e6, fills, why,
    )  # fmt: skip


def _serial_fallback(launch: Launch, device: Device) -> str:
    """A reduction kernel that leaves whole channels (one chunk) to too few programs while a
    channel has more than one tile, i.e. could have been split across programs."""
    reduction = launch.name in ("_moments_kernel", "_grad_sums_kernel")
    if not reduction or launch.grid[1] != 1:
        return ""
    items = launch.named_args()["items"]
    if launch.programs < PROGRAMS_PER_SM * device.multiprocessors and items > 1:
        return (
            f"{launch.name}: one program per channel block ({launch.programs} programs, "
            f"{items} tiles each in a serial loop) although the tiles could be split"
        )
    return ""


def plan_row(case: Case, device: Device) -> PlanRow:
    launches = record_case(case, device.multiprocessors)
    rows = [_launch_row(launch, device) for launch in launches]
    problems = []
    for launch, row in zip(launches, rows, strict=True):
        if not row.fills and not row.why:
            problems.append(
                f"{row.kernel}: {row.programs} programs = {row.programs_per_sm:.2f} per SM on "
                f"{device.name} (< {MIN_PROGRAMS_PER_SM}), {row.bytes / 2**20:.1f} MiB"
            )
        fallback = _serial_fallback(launch, device)
        if fallback:
            problems.append(fallback)
        if row.kernel in SECOND_STAGES and row.tiles_per_program > MAX_STAGE_TILES:
            problems.append(
                f"{row.kernel}: {row.tiles_per_program} tiles of partials in one program's loop"
                f" (> {MAX_STAGE_TILES})"
            )
    return PlanRow(case, device, rows, minimum_bytes(case), problems)


def plan_table(
    cases: Iterable[Case] | None = None, devices: Iterable[Device] = DEVICES
) -> list[PlanRow]:
    return [plan_row(case, device) for device in devices for case in (cases or doc_cases())]


def check(rows: Iterable[PlanRow]) -> list[str]:
    """Every problem of every row, each prefixed by its row; empty when the plans keep the rules."""
    return [f"{r.device.name} {r.case.label}: {p}" for r in rows for p in r.problems]


def format_plans(rows: list[PlanRow]) -> str:
    header = (
        f"{'device':9s} {'op':7s} {'shape':17s} {'layout':6s} {'kernel':27s} {'grid':>15s} "
        f"{'/SM':>6s} {'warps':>5s} {'tile':>9s} {'tiles/prog':>10s} {'MiB':>8s} {'ideal us':>9s}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r.case.shape))
        for i, launch in enumerate(r.launches):
            lead = (
                f"{r.device.name:9s} {r.case.op:7s} {shape:17s} {r.case.layout:6s}"
                if i == 0
                else " " * 42
            )
            grid = "x".join(map(str, launch.grid))
            note = f"  ({launch.why})" if launch.why else ""
            lines.append(
                f"{lead} {launch.kernel:27s} {grid:>15s} {launch.programs_per_sm:6.1f} "
                f"{launch.num_warps:5d} {launch.tile:>9s} {launch.tiles_per_program:10d} "
                f"{launch.bytes / 2**20:8.2f} {launch.ideal_us:9.1f}{note}"
            )
        lines.append(
            f"{'':42s} {'= op':27s} {'':15s} {'':6s} {'':5s} {'':9s} {'':10s} "
            f"{r.bytes / 2**20:8.2f} {r.ideal_us:9.1f}  ({r.bytes / r.minimum:.2f}x the minimum)"
        )
    return "\n".join(lines)


__all__ = [
    "A100",
    "DEFAULT_TILE",
    "DEVICES",
    "H100",
    "H100_BANDWIDTH",
    "Case",
    "PlanRow",
    "check",
    "doc_cases",
    "format_plans",
    "plan_row",
    "plan_table",
    "record_case",
    "traffic",
    "workload",
]

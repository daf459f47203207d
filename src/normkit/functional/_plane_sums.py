"""Per-plane sums of a channels_last float32 tensor in one pass over its rows, for the ``compiled``
engines of the per-plane family (:mod:`normkit.functional._instance_stats_compiled`) and of
BatchNorm (:mod:`normkit.functional._batch_norm_compiled`).

A channels_last (N, C, *) tensor is N blocks of S rows of C contiguous channels. Its per-plane
(n, c) reductions over the S positions are the family's whole cost beyond two copies, and
Inductor compiles them to a loop over 16 channels at a time that sweeps each plane's rows once per
16 channels, or by blocks of rows with an intermediate per block: 2-3× the time of one read
(docs/benchmarks.md, "The memory bound on the CPU"). ATen has no per-plane reduction for this
layout (``var_mean`` over the positions runs Welford, 20× slower). The loop here reads each
row once, in order, every channel of a row at once (the compiler vectorizes the inner loop over
channels), and accumulate in float32 over blocks of 64 rows, then in float64: per plane

- :func:`plane_moments`: ``sum(x - k)`` and ``sum((x - k)^2)`` for a shift ``k[n, c]`` (shifted
  sums, PERF.md §4: the variance loses only ``(mean - k)^2 / var`` to cancellation);
- :func:`plane_sums`: ``sum(dy)`` and ``sum(dy * x)``;
- :func:`channel_moments` and :func:`channel_sums`: the same added over the samples, for the
  compiled batch norm (:mod:`normkit.functional._batch_norm_compiled`): BatchNorm's per-channel
  moments and ``sum(dy)``, ``sum(dy * (x - mean))``.

The C source below is built once per CPU type with the system's C compiler (``cc -O3
-march=native -fopenmp``, under a second) into the user's cache directory (the file name hashes
the source, the flags and the CPU's feature flags), and called through
ctypes with torch's thread count; ctypes releases the GIL for the call. Where there is no compiler,
the build fails or the input is not float32 channels_last, :func:`available` says False and the
engine keeps Inductor's reductions, which give the same sums within float32 rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#define ROWS 64
/* out1[n,c] = sum_s (a[n,s,c] - ka[n,c])
   out2[n,c] = sum_s (a[n,s,c] - ka[n,c]) * (b[n,s,c] - kb[n,c])      (a NULL shift: 0)
   float32 over blocks of ROWS rows, float64 across blocks. */
void plane_sums(const float* a, const float* b, const float* ka, const float* kb, int64_t N,
                int64_t S, int64_t C, double* out1, double* out2, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; n++) {
    float acc1[C], acc2[C], sa[C], sb[C];
    double* o1 = out1 + n * C;
    double* o2 = out2 + n * C;
    for (int64_t c = 0; c < C; c++) {
      o1[c] = 0.0; o2[c] = 0.0;
      sa[c] = ka ? ka[n * C + c] : 0.0f;
      sb[c] = kb ? kb[n * C + c] : 0.0f;
    }
    for (int64_t s0 = 0; s0 < S; s0 += ROWS) {
      int64_t end = s0 + ROWS < S ? s0 + ROWS : S;
      for (int64_t c = 0; c < C; c++) { acc1[c] = 0.0f; acc2[c] = 0.0f; }
      for (int64_t s = s0; s < end; s++) {
        const float* ra = a + (n * S + s) * C;
        const float* rb = b + (n * S + s) * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
          float da = ra[c] - sa[c];
          acc1[c] += da;
          acc2[c] += da * (rb[c] - sb[c]);
        }
      }
      for (int64_t c = 0; c < C; c++) { o1[c] += acc1[c]; o2[c] += acc2[c]; }
    }
  }
}
"""
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cpu() -> str:
    """What the CPU can run (its flags), so that a library built with ``-march=native`` is never
    loaded on another CPU sharing the same cache directory (a cluster's home directory)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "normkit"


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built library, or None where it cannot be built or loaded (no compiler, no OpenMP)."""
    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None:
        return None
    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + compiler + _cpu()).encode()).hexdigest()[:16]
    try:
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    target = folder / f"plane_sums-{digest}.so"
    try:
        if not target.exists():
            with tempfile.TemporaryDirectory() as build:
                source, output = Path(build) / "plane_sums.c", Path(build) / "plane_sums.so"
                source.write_text(_SOURCE)
                subprocess.run([compiler, *_FLAGS, str(source), "-o", str(output)], check=True,
                               capture_output=True, timeout=120)  # fmt: skip
                os.replace(shutil.copy(output, folder / f".{target.name}.{os.getpid()}"), target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    library.plane_sums.restype = None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.plane_sums.argtypes = [pointer] * 4 + [size] * 3 + [pointer] * 2 + [ctypes.c_int]
    return library


def _rows(t: torch.Tensor) -> bool:
    """Whether ``t`` is a float32 CPU (N, C, *) tensor laid out as N × S rows of C channels."""
    return (
        t.dtype == torch.float32
        and t.device.type == "cpu"
        and t.dim() >= 3
        and not t.is_contiguous()
        and t.movedim(1, -1).is_contiguous()
    )


def available(*tensors: torch.Tensor) -> bool:
    """Whether this module's sums run for these inputs (same shape and strides, float32
    channels_last, not empty) on this machine."""
    first = tensors[0]
    same = all(t.shape == first.shape and t.stride() == first.stride() for t in tensors)
    return same and first.numel() > 0 and all(map(_rows, tensors)) and _library() is not None


def _call(a, b, ka=None, kb=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per plane, float64 (N, C): sum(a - ka) and sum((a - ka) * (b - kb)), shifts (N, C) or None."""
    n, c = a.shape[:2]
    positions = a.numel() // (n * c)
    out1 = torch.empty(n, c, dtype=torch.float64)
    out2 = torch.empty(n, c, dtype=torch.float64)
    shifts = [None if k is None else k.to(torch.float32).expand(n, c).contiguous() for k in (ka, kb)]
    _library().plane_sums(
        a.data_ptr(), b.data_ptr(), *(None if k is None else k.data_ptr() for k in shifts),
        n, positions, c, out1.data_ptr(), out2.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out1, out2


def _moments(s1: torch.Tensor, s2: torch.Tensor, shift: torch.Tensor, count: int):
    """Mean and biased variance, float32, from sums of d = x - shift and d² over ``count`` values:
    mean = shift + S1 / n, var = (S2 - S1² / n) / n (PERF.md §4)."""
    mean = shift.double() + s1 / count
    return mean.float(), ((s2 - s1 * s1 / count) / count).clamp_min(0.0).float()


def plane_moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of every (n, c) plane of ``x``, (N, C) float32, from sums shifted
    by ``shift`` (N, C), e.g. a sampled mean of each plane."""
    s1, s2 = _call(x, x, shift, shift)
    return _moments(s1, s2, shift, x.numel() // (x.shape[0] * x.shape[1]))


def plane_sums(dy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per plane ``sum(dy * x)`` and ``sum(dy)``, (N, C) float32 each."""
    sum_g, sum_gx = _call(dy, x)
    return sum_gx.float(), sum_g.float()


def channel_moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of every channel of ``x`` over all its other dims, (C,) float32:
    the planes' sums shifted by one ``shift`` (C,) per channel, added over the samples in float64."""
    s1, s2 = (s.sum(0) for s in _call(x, x, shift, shift))
    return _moments(s1, s2, shift, x.numel() // x.shape[1])


def channel_sums(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel ``sum(dy)`` and ``sum(dy * (x - mean))``, (C,) float32 each."""
    sum_g, sum_gx = (s.sum(0) for s in _call(dy, x, None, mean))
    return sum_g.float(), sum_gx.float()


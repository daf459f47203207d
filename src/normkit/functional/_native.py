"""C loops for the CPU engines, built once per CPU type and loaded through ctypes.

The ``compiled`` engines' float32 passes that Inductor compiles short of the memory bound (per-plane
reductions, :mod:`normkit.functional._plane_sums`; the per-channel elementwise pass,
:mod:`normkit.functional._channel_pass`) are a few lines of C each. :func:`library` builds such a
source with the system's C compiler (``cc -O3 -march=native -fopenmp``, under a second) into the
user's cache directory, under a file name that hashes the source, the flags, the compiler and the
CPU's feature flags, so that a library built for one CPU is never loaded on another sharing the
cache (a cluster's home directory). ctypes releases the GIL for each call. Where there is no
compiler, no OpenMP or no writable directory, :func:`library` returns None and the engines keep
Inductor's passes, which give the same results within float32 rounding.
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

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

# C for the loops written on the CPU's vectors: ``vec`` holds W floats (16 with AVX-512, 8 with
# AVX, else 1: plain C), LOAD/STORE any address, STREAM a non-temporal store to an address aligned
# to a vector (the output is not read again by the pass, so its cache lines are not fetched
# first), FMA a*b + c, HSUM the sum of the lanes, BLEND(first, u, v) u's first lanes then v's;
# a thread calls SFENCE() after its last STREAM.
VECTORS = r"""
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define W 16
typedef __m512 vec;
#define LOAD(p) _mm512_loadu_ps(p)
#define STORE(p, v) _mm512_storeu_ps(p, v)
#define STREAM(p, v) _mm512_stream_ps(p, v)
#define SET1(v) _mm512_set1_ps(v)
#define ZERO() _mm512_setzero_ps()
#define ADD(a, b) _mm512_add_ps(a, b)
#define SUB(a, b) _mm512_sub_ps(a, b)
#define MUL(a, b) _mm512_mul_ps(a, b)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define HSUM(v) _mm512_reduce_add_ps(v)
#define BLEND(first, u, v) _mm512_mask_blend_ps((__mmask16)((1u << (first)) - 1u), v, u)
#define SFENCE() _mm_sfence()
#elif defined(__AVX__)
#include <immintrin.h>
#define W 8
typedef __m256 vec;
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#define LOAD(p) _mm256_loadu_ps(p)
#define STORE(p, v) _mm256_storeu_ps(p, v)
#define STREAM(p, v) _mm256_stream_ps(p, v)
#define SET1(v) _mm256_set1_ps(v)
#define ZERO() _mm256_setzero_ps()
#define ADD(a, b) _mm256_add_ps(a, b)
#define SUB(a, b) _mm256_sub_ps(a, b)
#define MUL(a, b) _mm256_mul_ps(a, b)
#ifdef __FMA__
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define FMA(a, b, c) _mm256_add_ps(_mm256_mul_ps(a, b), c)
#endif
#define HSUM(v) hsum256(v)
#define BLEND(first, u, v) \
  _mm256_blendv_ps(v, u, _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), \
                                       _mm256_set1_ps((float)(first)), _CMP_LT_OQ))
#define SFENCE() _mm_sfence()
#else
#define W 1
typedef float vec;
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#define STREAM(p, v) (*(p) = (v))
#define SET1(v) (v)
#define ZERO() 0.0f
#define ADD(a, b) ((a) + (b))
#define SUB(a, b) ((a) - (b))
#define MUL(a, b) ((a) * (b))
#define FMA(a, b, c) ((a) * (b) + (c))
#define HSUM(v) (v)
#define BLEND(first, u, v) ((first) ? (u) : (v))
#define SFENCE()
#endif
"""

# C for the sources that write a large output row by row from a buffer in L1: VECTORS and
# stream_store(dst, src, n), which copies n floats to dst with STREAM where dst is aligned to a
# vector (the output's cache lines are not read first); a thread calls SFENCE() after its last
# streamed store.
STREAM_STORE = VECTORS + r"""
static void stream_store(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && ((uintptr_t)(dst + i) & (W * sizeof(float) - 1)); i++) dst[i] = src[i];
  for (; i + W <= n; i += W) STREAM(dst + i, LOAD(src + i));
  for (; i < n; i++) dst[i] = src[i];
}
"""


def _cpu() -> str:
    """What the CPU can run (its flags)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "normkit"


def compiler() -> str | None:
    """The system's C compiler, or None."""
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


@functools.cache
def library(name: str, source: str, flags: tuple[str, ...] = tuple(FLAGS)) -> ctypes.CDLL | None:
    """``source`` built with ``flags`` into ``<cache>/normkit/<name>-<hash>.so`` (once; an atomic
    rename, so that processes building at the same time never load half a file) and loaded, or None
    where it cannot be built or loaded. (The tests build the vector loops for other CPUs than this
    one by replacing ``-march=native`` in ``flags``.)"""
    cc = compiler()
    if cc is None:
        return None
    digest = hashlib.sha256((source + " ".join(flags) + cc + _cpu()).encode()).hexdigest()[:16]
    try:
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    target = folder / f"{name}-{digest}.so"
    try:
        if not target.exists():
            with tempfile.TemporaryDirectory() as build:
                c_file, output = Path(build) / f"{name}.c", Path(build) / f"{name}.so"
                c_file.write_text(source)
                subprocess.run([cc, *flags, str(c_file), "-o", str(output)], check=True,
                               capture_output=True, timeout=120)  # fmt: skip
                os.replace(shutil.copy(output, folder / f".{target.name}.{os.getpid()}"), target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None

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

# C for the sources that write a large output once: stream_store(dst, src, n) copies n floats from
# a buffer in L1 with non-temporal stores where the CPU has them (AVX, AVX-512), so the output's
# cache lines are not read first; a thread calls SFENCE() after its last streamed store.
STREAM_STORE = r"""
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* Copy n floats from src (in L1) to dst with non-temporal stores where the CPU has them: the
   output is not read again by this pass, so its cache lines are not fetched first. */
static void stream_store(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < n && ((uintptr_t)(dst + i) & 63); i++) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
  for (; i < n && ((uintptr_t)(dst + i) & 31); i++) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
  for (; i < n; i++) dst[i] = src[i];
}

#if defined(__AVX512F__) || defined(__AVX__)
#define SFENCE() _mm_sfence()
#else
#define SFENCE()
#endif
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
def library(name: str, source: str) -> ctypes.CDLL | None:
    """``source`` built into ``<cache>/normkit/<name>-<hash>.so`` (once; an atomic rename, so that
    processes building at the same time never load half a file) and loaded, or None where it cannot
    be built or loaded."""
    cc = compiler()
    if cc is None:
        return None
    digest = hashlib.sha256((source + " ".join(FLAGS) + cc + _cpu()).encode()).hexdigest()[:16]
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
                subprocess.run([cc, *FLAGS, str(c_file), "-o", str(output)], check=True,
                               capture_output=True, timeout=120)  # fmt: skip
                os.replace(shutil.copy(output, folder / f".{target.name}.{os.getpid()}"), target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None

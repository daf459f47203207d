"""The per-channel elementwise pass of BatchNorm's forward and backward, in C for float32 on the CPU
(:mod:`normkit.functional._native`), for the ``compiled`` batch norm
(:mod:`normkit.functional._batch_norm_compiled`):

    out = A[c] * a + B[c] * (b - k[c]) + D[c]

- the normalize pass (Ioffe & Szegedy 2015, Alg. 1): ``a`` absent, ``b = x``, ``k`` the mean,
  ``B = w / sqrt(var + eps)``, ``D`` the bias;
- the input gradient (§3): ``a = dy``, ``b = x``, ``k`` the mean, ``A = w invstd``,
  ``B = -w invstd² sum(dy x_hat) / n``, ``D = -w invstd sum(dy) / n``.

``x - mean`` is formed before scaling, as in the float64 reference, so inputs far from zero lose
no more than there. One loop per layout: the rows of C channels of a channels_last tensor (the
inner loop over channels vectorized), or the contiguous planes of an NCHW one (one channel's
coefficients per plane), by blocks of 2,048 outputs computed into a buffer and written with
non-temporal stores where the CPU has them (AVX/AVX-512: the output's cache lines are not read
first). It writes each output once at about the speed of a copy, where Inductor's pass with three
broadcast (C,) operands runs at 50-90% of it (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from normkit.functional import _native
from normkit.functional._plane_sums import layout, takes

_SOURCE = (
    r"""
#include <stdint.h>
"""
    + _native.STREAM_STORE
    + r"""
#define BLOCK 2048

/* out = A[c] * a + B[c] * (b - k[c]) + D[c]  (a NULL: no first term) for N x S rows of C channels
   (rows != 0) or N x C contiguous planes of S values, by blocks of BLOCK outputs: each block is
   computed into a buffer, then streamed out. */
void channel_pass(const float* a, const float* b, const float* k, const float* A, const float* B,
                  const float* D, float* out, int64_t N, int64_t C, int64_t S, int rows,
                  int threads) {
  const int64_t total = N * C * S;
  #pragma omp parallel num_threads(threads)
  {
    float buf[BLOCK];
    #pragma omp for schedule(static) nowait
    for (int64_t i0 = 0; i0 < total; i0 += BLOCK) {
      const int64_t i1 = i0 + BLOCK < total ? i0 + BLOCK : total;
      for (int64_t i = i0; i < i1;) {
        float* o = buf + (i - i0);
        const float* pb = b + i;
        const float* pa = a ? a + i : 0;
        int64_t len;
        if (rows) {  /* a run of channels c0 .. c0 + len of one row */
          const int64_t c0 = i % C;
          len = C - c0 < i1 - i ? C - c0 : i1 - i;
          const float *Ac = A + c0, *Bc = B + c0, *kc = k + c0, *Dc = D + c0;
          if (pa) {
            #pragma omp simd
            for (int64_t j = 0; j < len; j++) o[j] = Ac[j] * pa[j] + Bc[j] * (pb[j] - kc[j]) + Dc[j];
          } else {
            #pragma omp simd
            for (int64_t j = 0; j < len; j++) o[j] = Bc[j] * (pb[j] - kc[j]) + Dc[j];
          }
        } else {  /* a run of positions of one plane, channel c */
          const int64_t c = (i / S) % C, s0 = i % S;
          len = S - s0 < i1 - i ? S - s0 : i1 - i;
          const float kc = k[c], Bc = B[c], Dc = D[c];
          if (pa) {
            const float Ac = A[c];
            #pragma omp simd
            for (int64_t j = 0; j < len; j++) o[j] = Ac * pa[j] + Bc * (pb[j] - kc) + Dc;
          } else {
            #pragma omp simd
            for (int64_t j = 0; j < len; j++) o[j] = Bc * (pb[j] - kc) + Dc;
          }
        }
        i += len;
      }
      stream_store(out + i0, buf, i1 - i0);
    }
    SFENCE();  /* this thread's streamed stores, ordered before the region's barrier */
  }
}
"""
)


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = _native.library("channel_pass", _SOURCE)
    if library is not None:
        library.channel_pass.restype = None
        library.channel_pass.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    return library


def available(*tensors: torch.Tensor) -> bool:
    """Whether the pass runs for these (N, C, *) inputs here: the inputs of the plane sums in
    either layout (same shape and strides, float32, contiguous or channels_last, not empty), and
    the library built."""
    return takes(*tensors, contiguous=True) and _library() is not None


def _coefficient(t: torch.Tensor | None, channels: int) -> torch.Tensor:
    return torch.zeros(channels) if t is None else t.to(torch.float32).contiguous()


def channel_pass(a: torch.Tensor | None, b: torch.Tensor, k: torch.Tensor, A: torch.Tensor | None,
                 B: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """``A[c] * a + B[c] * (b - k[c]) + D[c]`` in ``b``'s layout (coefficients (C,); ``a``, ``A``
    or ``D`` None: that term is absent)."""
    n, c = b.shape[:2]
    out = torch.empty_like(b)
    k, B, D = (_coefficient(t, c) for t in (k, B, D))
    A = None if a is None else _coefficient(A, c)
    _library().channel_pass(
        None if a is None else a.data_ptr(), b.data_ptr(), k.data_ptr(),
        None if A is None else A.data_ptr(), B.data_ptr(), D.data_ptr(), out.data_ptr(),
        n, c, b.numel() // (n * c), int(layout(b) == "rows"), torch.get_num_threads(),
    )  # fmt: skip
    return out

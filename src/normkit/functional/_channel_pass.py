"""The per-channel elementwise pass of BatchNorm's forward and backward, in C for float32 on the CPU
(:mod:`normkit.functional._native`), for the ``compiled`` batch norm
(:mod:`normkit.functional._batch_norm_compiled`):

    out = A[c] * a + B[c] * (b - k[c]) + D[c]

- the normalize pass (Ioffe & Szegedy 2015, Alg. 1): ``a`` absent, ``b = x``, ``k`` the mean,
  ``B = w / sqrt(var + eps)``, ``D`` the bias;
- the input gradient (§3): ``a = dy``, ``b = x``, ``k`` the mean, ``A = w invstd``,
  ``B = -w invstd² sum(dy x_hat) / n``, ``D = -w invstd sum(dy) / n``.

``x - mean`` is formed before scaling, as in the float64 reference, so inputs far from zero lose
no more than there. One loop on the CPU's vectors (``_native.VECTORS``: 16 floats with AVX-512, 8
with AVX, else plain C), each thread over its own range of the output: the rows of C channels of a
channels_last tensor read a vector's coefficients from tables that wrap around the row (rows of
one to four whole vectors, 16-64 channels with AVX-512, keep them in registers, where the tables
cost four loads per vector); the planes of an NCHW one broadcast one channel's coefficients over
each vector of the plane. Every output vector is written with a non-temporal store as soon as it
is computed (the output's cache lines are not read first, and the stores overlap the loads). The
normalize pass runs at about the speed of a copy, where Inductor's pass with three broadcast (C,)
operands runs at 50-90% of it; computing blocks of outputs into a buffer first, then streaming
them out, was slower (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from normkit.functional import _native
from normkit.functional._plane_sums import layout, takes

_SOURCE = (
    r"""
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
"""
    + _native.VECTORS
    + r"""
/* One output: A*a[i] + B*(b[i] - k) + D (a NULL: no first term). */
static inline float one(const float* a, const float* b, int64_t i, float A, float B, float k, float D) {
  return (a ? A * a[i] : 0.0f) + B * (b[i] - k) + D;
}

/* One output of flat index i, its channel found from i. */
static inline float at(const float* a, const float* b, const float* k, const float* A, const float* B,
                       const float* D, int64_t i, int64_t C, int64_t S, int rows) {
  const int64_t c = rows ? i % C : (i / S) % C;
  return one(a, b, i, A ? A[c] : 0.0f, B[c], k[c], D[c]);
}

/* One vector of a row at flat index i, its channels c .. c + W, coefficients from the tables. */
static inline void table_vector(const float* a, const float* b, const float* tk, const float* tA,
                                const float* tB, const float* tD, float* out, int64_t i, int64_t c) {
  vec y = ADD(MUL(LOAD(tB + c), SUB(LOAD(b + i), LOAD(tk + c))), LOAD(tD + c));
  if (a) y = FMA(LOAD(tA + c), LOAD(a + i), y);
  STREAM(out + i, y);
}

/* Whole rows of NV * W channels (NV <= 4) from flat index i (a row's start) while they end by
   `end`: every channel's coefficients stay in registers (a constant NV unrolls the loop over j),
   where the tables cost four loads per vector. Returns the index after the last row. */
static inline __attribute__((always_inline)) int64_t narrow_rows(
    const float* a, const float* b, const float* tk, const float* tA, const float* tB,
    const float* tD, float* out, int64_t i, int64_t end, const int NV) {
  const int64_t C = NV * W;
  vec vk[4], vA[4], vB[4], vD[4];
  for (int j = 0; j < NV; j++) {
    vk[j] = LOAD(tk + j * W); vA[j] = LOAD(tA + j * W);
    vB[j] = LOAD(tB + j * W); vD[j] = LOAD(tD + j * W);
  }
  if (a) {
    for (; i + C <= end; i += C)
      for (int j = 0; j < NV; j++) {
        const int64_t at = i + j * W;
        STREAM(out + at, FMA(vA[j], LOAD(a + at), ADD(MUL(vB[j], SUB(LOAD(b + at), vk[j])), vD[j])));
      }
  } else {
    for (; i + C <= end; i += C)
      for (int j = 0; j < NV; j++) {
        const int64_t at = i + j * W;
        STREAM(out + at, ADD(MUL(vB[j], SUB(LOAD(b + at), vk[j])), vD[j]));
      }
  }
  return i;
}

/* out = A[c] * a + B[c] * (b - k[c]) + D[c] over N x S rows of C channels (rows != 0: channel
   c = i % C) or N x C contiguous planes of S values (c = (i / S) % C). Each thread takes a range of
   vectors of the output, aligned to the vector so that it streams every store. Rows read the
   coefficients of a vector's channels c .. c + W from tables T[t] = coef[t % C], t < C + W, which
   wrap around the row; planes broadcast one channel's coefficients over each whole vector of the
   plane, and blend two channels' results in a vector that straddles two planes (each lane's
   coefficients where planes are shorter than a vector).
   Returns 0, or -1 where the tables could not be allocated. */
int channel_pass(const float* a, const float* b, const float* k, const float* A, const float* B,
                 const float* D, float* out, int64_t N, int64_t C, int64_t S, int rows,
                 int threads) {
  const int64_t total = N * C * S, span = (C + 2 * W - 1) / W * W;  /* >= C + W, whole vectors */
  float* table = 0;
  if (rows) {
    void* memory = 0;
    if (posix_memalign(&memory, 64, 4 * span * sizeof(float))) return -1;
    table = (float*)memory;
    for (int64_t t = 0; t < span; t++) {
      const int64_t c = t % C;
      table[t] = k[c];
      table[span + t] = A ? A[c] : 0.0f;
      table[2 * span + t] = B[c];
      table[3 * span + t] = D[c];
    }
  }
  int64_t head = (int64_t)((-(uintptr_t)out / sizeof(float)) & (W - 1));
  if (head > total) head = total;
  const int64_t vectors = (total - head) / W;
  const int narrow = rows && W > 1 && C % W == 0 && C / W <= 4 && head == 0 ? (int)(C / W) : 0;
  for (int64_t i = 0; i < head; i++) out[i] = at(a, b, k, A, B, D, i, C, S, rows);
  for (int64_t i = head + vectors * W; i < total; i++) out[i] = at(a, b, k, A, B, D, i, C, S, rows);
  #pragma omp parallel num_threads(threads)
  {
    int64_t team = 1, id = 0;
#ifdef _OPENMP
    team = omp_get_num_threads();
    id = omp_get_thread_num();
#endif
    int64_t i = head + vectors * id / team * W;
    const int64_t end = head + vectors * (id + 1) / team * W;
    if (rows) {
      const float *tk = table, *tA = table + span, *tB = table + 2 * span, *tD = table + 3 * span;
      int64_t c = i % C;
      if (narrow) {  /* to the next row's start, whole rows, then the rest as below */
        for (; c && i < end; i += W, c = c + W == C ? 0 : c + W)
          table_vector(a, b, tk, tA, tB, tD, out, i, c);
        switch (narrow) {
          case 1: i = narrow_rows(a, b, tk, tA, tB, tD, out, i, end, 1); break;
          case 2: i = narrow_rows(a, b, tk, tA, tB, tD, out, i, end, 2); break;
          case 3: i = narrow_rows(a, b, tk, tA, tB, tD, out, i, end, 3); break;
          default: i = narrow_rows(a, b, tk, tA, tB, tD, out, i, end, 4); break;
        }
        c = i % C;
      }
      for (; i < end; i += W) {
        table_vector(a, b, tk, tA, tB, tD, out, i, c);
        for (c += W; c >= C;) c -= C;
      }
    } else {
      while (i < end) {
        const int64_t c = (i / S) % C;
        int64_t run = (S - i % S) / W;  /* whole vectors left in this plane */
        if (run > (end - i) / W) run = (end - i) / W;
        const vec vk = SET1(k[c]), vB = SET1(B[c]), vD = SET1(D[c]);
        if (a) {
          const vec vA = SET1(A[c]);
          for (int64_t r = 0; r < run; r++, i += W)
            STREAM(out + i, FMA(vA, LOAD(a + i), ADD(MUL(vB, SUB(LOAD(b + i), vk)), vD)));
        } else {
          for (int64_t r = 0; r < run; r++, i += W)
            STREAM(out + i, ADD(MUL(vB, SUB(LOAD(b + i), vk)), vD));
        }
        if (i < end && (run == 0 || i % S)) {  /* a vector across planes */
          const int64_t first = S - i % S, next = c + 1 == C ? 0 : c + 1;
          vec y;
          if (W - first <= S) {  /* two planes: c's first lanes, then the next channel's */
            y = BLEND(first, ADD(MUL(vB, SUB(LOAD(b + i), vk)), vD),
                      ADD(MUL(SET1(B[next]), SUB(LOAD(b + i), SET1(k[next]))), SET1(D[next])));
            if (a) y = FMA(BLEND(first, SET1(A[c]), SET1(A[next])), LOAD(a + i), y);
          } else {  /* planes shorter than a vector: each lane's coefficients */
            float lk[W], lA[W], lB[W], lD[W];
            for (int64_t j = 0, cj = c, s = i % S; j < W; j++) {
              lk[j] = k[cj]; lA[j] = A ? A[cj] : 0.0f; lB[j] = B[cj]; lD[j] = D[cj];
              if (++s == S) { s = 0; if (++cj == C) cj = 0; }
            }
            y = ADD(MUL(LOAD(lB), SUB(LOAD(b + i), LOAD(lk))), LOAD(lD));
            if (a) y = FMA(LOAD(lA), LOAD(a + i), y);
          }
          STREAM(out + i, y);
          i += W;
        }
      }
    }
    SFENCE();  /* this thread's streamed stores, ordered before the region's barrier */
  }
  free(table);
  return 0;
}
"""
)


def build(flags: tuple[str, ...] = tuple(_native.FLAGS)) -> ctypes.CDLL | None:
    """The pass built with ``flags`` (:func:`normkit.functional._native.library`) with its
    signature, or None."""
    library = _native.library("channel_pass", _SOURCE, flags)
    if library is not None:
        library.channel_pass.restype = ctypes.c_int
        library.channel_pass.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    return build()


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
    status = _library().channel_pass(
        None if a is None else a.data_ptr(), b.data_ptr(), k.data_ptr(),
        None if A is None else A.data_ptr(), B.data_ptr(), D.data_ptr(), out.data_ptr(),
        n, c, b.numel() // (n * c), int(layout(b) == "rows"), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError(f"channel_pass: no memory for the coefficient tables of {c} channels")
    return out

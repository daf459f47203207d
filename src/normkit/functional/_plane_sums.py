"""Per-plane sums of a float32 tensor in one pass, for the ``compiled`` engines of the per-plane
family (:mod:`normkit.functional._instance_stats_compiled`) and of BatchNorm
(:mod:`normkit.functional._batch_norm_compiled`).

A channels_last (N, C, *) tensor is N blocks of S rows of C contiguous channels. Its per-plane
(n, c) reductions over the S positions are the family's whole cost beyond two copies, and
Inductor compiles them to a loop over 16 channels at a time that sweeps each plane's rows once per
16 channels, or by blocks of rows with an intermediate per block: 2-3× the time of one read
(docs/benchmarks.md, "The memory bound on the CPU"). ATen has no per-plane reduction for this
layout (``var_mean`` over the positions runs Welford, 20× slower). The loop here reads each
row once, in order, every channel of a row at once (the compiler vectorizes the inner loop over
channels; rows of one to four vectors of channels, 16-64 with AVX-512, keep the accumulators in
registers, ``_native.VECTORS``; wider rows update arrays of accumulators, rows of 512 channels
or more once per four rows), and accumulate in float32 over blocks of 64 rows, then in
float64. A contiguous (NCHW) tensor is N × C planes of S contiguous values, each summed by a
vectorized loop over blocks of 1,024 values (float32 within a block, float64 across blocks):
BatchNorm's two backward sums over (N, H, W), which Inductor runs at half a read's speed. Per
plane:

- :func:`plane_moments`: ``sum(x - k)`` and ``sum((x - k)^2)`` for a shift ``k[n, c]`` (shifted
  sums, PERF.md §4: the variance loses only ``(mean - k)^2 / var`` to cancellation);
- :func:`plane_sums`: ``sum(dy)`` and ``sum(dy * x)``;
- :func:`shifted_sums`: the float64 (N, C) sums of ``a - ka`` and ``(a - ka) * (b - kb)`` behind
  both, which the compiled batch norm adds over the samples per channel
  (:mod:`normkit.functional._channel_epilogue`): its moments, ``sum(dy)`` and
  ``sum(dy * (x - mean))``.

The C source is built by :func:`normkit.functional._native.library` and called with torch's thread
count. Where it cannot be built or the input is not float32 in one of the two layouts,
:func:`available` says False and the engines keep Inductor's reductions, which give the same sums
within float32 rounding.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from normkit.functional import _native

_SOURCE = (
    _native.VECTORS
    + r"""
#define ROWS 64

/* plane_sums for one sample of rows of NV * W channels (NV <= 4): a block's accumulators and the
   shifts stay in registers (a constant NV unrolls the loops over j). */
static inline __attribute__((always_inline)) void narrow_rows(
    const float* a, const float* b, const float* ka, const float* kb, int64_t n, int64_t S,
    const int NV, double* o1, double* o2) {
  const int64_t C = NV * W;
  vec sa[4], sb[4];
  for (int j = 0; j < NV; j++) {
    sa[j] = ka ? LOAD(ka + n * C + j * W) : ZERO();
    sb[j] = kb ? LOAD(kb + n * C + j * W) : ZERO();
  }
  for (int64_t c = 0; c < C; c++) { o1[c] = 0.0; o2[c] = 0.0; }
  for (int64_t s0 = 0; s0 < S; s0 += ROWS) {
    const int64_t end = s0 + ROWS < S ? s0 + ROWS : S;
    vec x1[4], x2[4];
    for (int j = 0; j < NV; j++) { x1[j] = ZERO(); x2[j] = ZERO(); }
    for (int64_t s = s0; s < end; s++) {
      const float* ra = a + (n * S + s) * C;
      const float* rb = b + (n * S + s) * C;
      for (int j = 0; j < NV; j++) {
        const vec d = SUB(LOAD(ra + j * W), sa[j]);
        x1[j] = ADD(x1[j], d);
        x2[j] = FMA(d, SUB(LOAD(rb + j * W), sb[j]), x2[j]);
      }
    }
    float t1[4 * W], t2[4 * W];
    for (int j = 0; j < NV; j++) { STORE(t1 + j * W, x1[j]); STORE(t2 + j * W, x2[j]); }
    for (int64_t c = 0; c < C; c++) { o1[c] += t1[c]; o2[c] += t2[c]; }
  }
}

/* out1[n,c] = sum_s (a[n,s,c] - ka[n,c])
   out2[n,c] = sum_s (a[n,s,c] - ka[n,c]) * (b[n,s,c] - kb[n,c])      (a NULL shift: 0)
   float32 over blocks of ROWS rows, float64 across blocks; rows of up to 4 vectors of channels
   keep the accumulators in registers (narrow_rows), wider ones in arrays on the stack, which
   rows of 512 channels or more update once per four rows. */
void plane_sums(const float* a, const float* b, const float* ka, const float* kb, int64_t N,
                int64_t S, int64_t C, double* out1, double* out2, int threads) {
  const int narrow = W > 1 && C % W == 0 && C / W <= 4 ? (int)(C / W) : 0;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; n++) {
    if (narrow) {
      double* o1 = out1 + n * C;
      double* o2 = out2 + n * C;
      switch (narrow) {
        case 1: narrow_rows(a, b, ka, kb, n, S, 1, o1, o2); break;
        case 2: narrow_rows(a, b, ka, kb, n, S, 2, o1, o2); break;
        case 3: narrow_rows(a, b, ka, kb, n, S, 3, o1, o2); break;
        default: narrow_rows(a, b, ka, kb, n, S, 4, o1, o2); break;
      }
      continue;
    }
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
      int64_t s = s0;
      if (C >= 512)  /* four rows per load and store of the accumulators (docs/benchmarks.md) */
        for (; s + 4 <= end; s += 4) {
          const float* ra = a + (n * S + s) * C;
          const float* rb = b + (n * S + s) * C;
          #pragma omp simd
          for (int64_t c = 0; c < C; c++) {
            const float k = sa[c], l = sb[c];
            const float d0 = ra[c] - k, d1 = ra[C + c] - k;
            const float d2 = ra[2 * C + c] - k, d3 = ra[3 * C + c] - k;
            acc1[c] += (d0 + d1) + (d2 + d3);
            acc2[c] += (d0 * (rb[c] - l) + d1 * (rb[C + c] - l))
                       + (d2 * (rb[2 * C + c] - l) + d3 * (rb[3 * C + c] - l));
          }
        }
      for (; s < end; s++) {
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

#define BLOCK 1024
/* The same sums for P contiguous planes of S values, shifts ka[p] and kb[p]. */
void plane_sums_contiguous(const float* a, const float* b, const float* ka, const float* kb,
                           int64_t P, int64_t S, double* out1, double* out2, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t p = 0; p < P; p++) {
    const float* pa = a + p * S;
    const float* pb = b + p * S;
    float sa = ka ? ka[p] : 0.0f, sb = kb ? kb[p] : 0.0f;
    double o1 = 0.0, o2 = 0.0;
    for (int64_t s0 = 0; s0 < S; s0 += BLOCK) {
      int64_t end = s0 + BLOCK < S ? s0 + BLOCK : S;
      float acc1 = 0.0f, acc2 = 0.0f;
      #pragma omp simd reduction(+:acc1, acc2)
      for (int64_t s = s0; s < end; s++) {
        float da = pa[s] - sa;
        acc1 += da;
        acc2 += da * (pb[s] - sb);
      }
      o1 += acc1;
      o2 += acc2;
    }
    out1[p] = o1;
    out2[p] = o2;
  }
}
"""
)


def build(flags: tuple[str, ...] = tuple(_native.FLAGS)) -> ctypes.CDLL | None:
    """The sums built with ``flags`` (:func:`normkit.functional._native.library`) with their
    signatures, or None."""
    library = _native.library("plane_sums", _SOURCE, flags)
    if library is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.plane_sums.restype = library.plane_sums_contiguous.restype = None
    library.plane_sums.argtypes = [pointer] * 4 + [size] * 3 + [pointer] * 2 + [ctypes.c_int]
    library.plane_sums_contiguous.argtypes = [pointer] * 4 + [size] * 2 + [pointer] * 2 + [ctypes.c_int]
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The library built for this machine, or None."""
    return build()


# The loops over rows keep a few float32 accumulators per channel on a thread's stack.
MAX_ROW_CHANNELS = 65_536


def layout(t: torch.Tensor) -> str | None:
    """``"rows"`` for a float32 CPU (N, C, *) tensor laid out as N × S rows of C channels
    (channels_last, C up to MAX_ROW_CHANNELS), ``"planes"`` for one laid out as N × C planes of S
    values (contiguous), else None."""
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() < 3:
        return None
    if t.is_contiguous():
        return "planes"
    rows = t.shape[1] <= MAX_ROW_CHANNELS and t.movedim(1, -1).is_contiguous()
    return "rows" if rows else None


def takes(*tensors: torch.Tensor, contiguous: bool = False) -> bool:
    """Whether the C loops take these inputs: same shape and strides, not empty, float32
    channels_last, or also contiguous where ``contiguous``."""
    first = tensors[0]
    same = all(t.shape == first.shape and t.stride() == first.stride() for t in tensors)
    layouts = ("rows", "planes") if contiguous else ("rows",)
    return same and first.numel() > 0 and all(layout(t) in layouts for t in tensors)


def built() -> bool:
    """Whether the library is built (and loaded) on this machine."""
    return _library() is not None


def available(*tensors: torch.Tensor, contiguous: bool = False) -> bool:
    """Whether this module's sums run for these inputs on this machine (:func:`takes`, and the
    library built)."""
    return takes(*tensors, contiguous=contiguous) and built()


def shifted_sums(a, b, ka=None, kb=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per plane, float64 (N, C): sum(a - ka) and sum((a - ka) * (b - kb)), shifts (N, C) or None."""
    n, c = a.shape[:2]
    positions = a.numel() // (n * c)
    out1 = torch.empty(n, c, dtype=torch.float64)
    out2 = torch.empty(n, c, dtype=torch.float64)
    sa = None if ka is None else ka.to(torch.float32).expand(n, c).contiguous()
    sb = sa if kb is ka else None if kb is None else kb.to(torch.float32).expand(n, c).contiguous()
    pointers = (a.data_ptr(), b.data_ptr(), *(None if k is None else k.data_ptr() for k in (sa, sb)))
    outputs, threads = (out1.data_ptr(), out2.data_ptr()), torch.get_num_threads()
    if layout(a) == "planes":
        _library().plane_sums_contiguous(*pointers, n * c, positions, *outputs, threads)
    else:
        _library().plane_sums(*pointers, n, positions, c, *outputs, threads)
    return out1, out2


def moments_from_sums(s1: torch.Tensor, s2: torch.Tensor, shift: torch.Tensor, count: int):
    """Mean and biased variance, float32, from sums of d = x - shift and d² over ``count`` values:
    mean = shift + S1 / n, var = (S2 - S1² / n) / n (PERF.md §4)."""
    mean = shift.double() + s1 / count
    return mean.float(), ((s2 - s1 * s1 / count) / count).clamp_min(0.0).float()


def plane_moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of every (n, c) plane of ``x``, (N, C) float32, from sums shifted
    by ``shift`` (N, C), e.g. a sampled mean of each plane."""
    s1, s2 = shifted_sums(x, x, shift, shift)
    return moments_from_sums(s1, s2, shift, x.numel() // (x.shape[0] * x.shape[1]))


def plane_sums(dy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per plane ``sum(dy * x)`` and ``sum(dy)``, (N, C) float32 each."""
    sum_g, sum_gx = shifted_sums(dy, x)
    return sum_gx.float(), sum_g.float()

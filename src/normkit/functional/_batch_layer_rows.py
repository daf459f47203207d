"""Batch-Layer normalization's passes over the rows of a channels_last float32 tensor, in C
(:mod:`normkit.functional._native`), for the ``compiled`` engine
(:mod:`normkit.functional._batch_layer_norm`).

A channels_last (N, C, *) tensor is N × S rows of C contiguous channels. Batch-Layer
(Ziaee & Çano 2022) adds BN's normalization over the batch (per channel, down the rows) to LN's
over the channels (per position, along a row), y = w_b x̂_B + w_f x̂_F + b, and in this layout both
statistics come from one read of each row: LN's row moments (two passes over a row of C values, in
L1) and BN's per-channel shifted sums (accumulated like :mod:`._plane_sums`: float32 over blocks of
64 rows, then float64). The backward reads dy and x once for its sums (per channel Σ dy,
Σ dy (x - μ_B), Σ dy x̂_F; per row the means of g_F = w_f dy and g_F x̂_F) and once more for dx
(Ioffe & Szegedy §3 for each part, the LN part over the row):

    dx = w_b σ_B⁻¹ (dy - Σ dy / n - x̂_B Σ dy x̂_B / n) + σ_F⁻¹ (g_F - mean(g_F) - x̂_F mean(g_F x̂_F))

So forward + backward move the same 8 passes as BatchNorm's, where Inductor's fused maths sweeps
the rows per 16 channels for the per-channel sums and recomputes the row means in the dx pass. The
y and dx rows are written with non-temporal stores (``_native.STREAM_STORE``).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from normkit.functional import _native, _plane_sums
from normkit.functional._batch_norm import batch_dims
from normkit.functional._batch_norm_compiled import sample_mean

_SOURCE = (
    r"""
#include <math.h>
"""
    + _native.STREAM_STORE
    + r"""
#define ROWS 64

/* Per row r over its C channels: mean_f[r], the mean less the row's first value x0 (so that
   x - mean = (x - x0) - mean_f loses nothing to the rounding of a mean far from zero), and
   invstd_f[r] = 1 / sqrt(var_f + eps). Where s1 is not NULL, per sample n and channel c:
   s1 = sum (x - k[c]), s2 = sum (x - k[c])^2. */
void bln_stats(const float* x, const float* k, int64_t N, int64_t S, int64_t C, float eps,
               float* mean_f, float* invstd_f, double* s1, double* s2, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; n++) {
    float a1[C], a2[C];
    if (s1) for (int64_t c = 0; c < C; c++) { s1[n * C + c] = 0.0; s2[n * C + c] = 0.0; }
    for (int64_t s0 = 0; s0 < S; s0 += ROWS) {
      int64_t end = s0 + ROWS < S ? s0 + ROWS : S;
      for (int64_t c = 0; c < C; c++) { a1[c] = 0.0f; a2[c] = 0.0f; }
      for (int64_t s = s0; s < end; s++) {
        const float* row = x + (n * S + s) * C;
        const float x0 = row[0];
        float m = 0.0f, v = 0.0f;
        #pragma omp simd reduction(+:m)
        for (int64_t c = 0; c < C; c++) m += row[c] - x0;
        m /= (float)C;
        #pragma omp simd reduction(+:v)
        for (int64_t c = 0; c < C; c++) { float d = (row[c] - x0) - m; v += d * d; }
        mean_f[n * S + s] = m;
        invstd_f[n * S + s] = 1.0f / sqrtf(v / (float)C + eps);
        if (s1) {
          #pragma omp simd
          for (int64_t c = 0; c < C; c++) { float d = row[c] - k[c]; a1[c] += d; a2[c] += d * d; }
        }
      }
      if (s1) for (int64_t c = 0; c < C; c++) { s1[n * C + c] += a1[c]; s2[n * C + c] += a2[c]; }
    }
  }
}

/* y = (x - mean[c]) sb[c] + x_f wf[c] + b[c] for R rows of C channels,
   x_f = ((x - x0) - mean_f[r]) invstd_f[r]. */
void bln_output(const float* x, const float* mean, const float* sb, const float* wf,
                const float* b, const float* mean_f, const float* invstd_f, float* y, int64_t R,
                int64_t C, int threads) {
  #pragma omp parallel num_threads(threads)
  {
    float out[C];
    #pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < R; r++) {
      const float* row = x + r * C;
      const float x0 = row[0], mf = mean_f[r], sf = invstd_f[r];
      #pragma omp simd
      for (int64_t c = 0; c < C; c++)
        out[c] = (row[c] - mean[c]) * sb[c] + ((row[c] - x0) - mf) * sf * wf[c] + b[c];
      stream_store(y + r * C, out, C);
    }
    SFENCE();
  }
}

/* Per row: gm[r] = mean_c(wf dy), gxm[r] = mean_c(wf dy x_f), x_f as in bln_output. Per
   sample n and channel c: t1 = sum dy, t2 = sum dy (x - mean[c]), t3 = sum dy x_f. */
void bln_backward_sums(const float* dy, const float* x, const float* mean, const float* wf,
                       const float* mean_f, const float* invstd_f, int64_t N, int64_t S,
                       int64_t C, float* gm, float* gxm, double* t1, double* t2, double* t3,
                       int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; n++) {
    float a1[C], a2[C], a3[C];
    for (int64_t c = 0; c < C; c++) { t1[n * C + c] = 0.0; t2[n * C + c] = 0.0; t3[n * C + c] = 0.0; }
    for (int64_t s0 = 0; s0 < S; s0 += ROWS) {
      int64_t end = s0 + ROWS < S ? s0 + ROWS : S;
      for (int64_t c = 0; c < C; c++) { a1[c] = 0.0f; a2[c] = 0.0f; a3[c] = 0.0f; }
      for (int64_t s = s0; s < end; s++) {
        const int64_t r = n * S + s;
        const float* g = dy + r * C;
        const float* row = x + r * C;
        const float x0 = row[0], mf = mean_f[r], sf = invstd_f[r];
        float m = 0.0f, mx = 0.0f;
        #pragma omp simd reduction(+:m, mx)
        for (int64_t c = 0; c < C; c++) {
          float xf = ((row[c] - x0) - mf) * sf;
          float gf = g[c] * wf[c];
          m += gf;
          mx += gf * xf;
          a1[c] += g[c];
          a2[c] += g[c] * (row[c] - mean[c]);
          a3[c] += g[c] * xf;
        }
        gm[r] = m / (float)C;
        gxm[r] = mx / (float)C;
      }
      for (int64_t c = 0; c < C; c++) {
        t1[n * C + c] += a1[c]; t2[n * C + c] += a2[c]; t3[n * C + c] += a3[c];
      }
    }
  }
}

/* dx = A[c] dy + B[c] (x - mean[c]) + D[c] + invstd_f[r] (wf[c] dy - gm[r] - x_f gxm[r]). */
void bln_input_grad(const float* dy, const float* x, const float* mean, const float* A,
                    const float* B, const float* D, const float* wf, const float* mean_f,
                    const float* invstd_f, const float* gm, const float* gxm, float* dx,
                    int64_t R, int64_t C, int threads) {
  #pragma omp parallel num_threads(threads)
  {
    float out[C];
    #pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < R; r++) {
      const float* g = dy + r * C;
      const float* row = x + r * C;
      const float x0 = row[0], mf = mean_f[r], sf = invstd_f[r], m = gm[r], mx = gxm[r];
      #pragma omp simd
      for (int64_t c = 0; c < C; c++) {
        float xf = ((row[c] - x0) - mf) * sf;
        out[c] = A[c] * g[c] + B[c] * (row[c] - mean[c]) + D[c] + sf * (wf[c] * g[c] - m - xf * mx);
      }
      stream_store(dx + r * C, out, C);
    }
    SFENCE();
  }
}
"""
)


def build(flags: tuple[str, ...] = tuple(_native.FLAGS)) -> ctypes.CDLL | None:
    """The passes built with ``flags`` (:func:`normkit.functional._native.library`) with their
    signatures, or None."""
    library = _native.library("batch_layer_rows", _SOURCE, flags)
    if library is None:
        return None
    p, i, t = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "bln_stats": [p, p, i, i, i, ctypes.c_float, p, p, p, p, t],
        "bln_output": [p] * 8 + [i, i, t],
        "bln_backward_sums": [p] * 6 + [i, i, i] + [p] * 5 + [t],
        "bln_input_grad": [p] * 12 + [i, i, t],
    }
    for name, argtypes in signatures.items():
        getattr(library, name).argtypes = argtypes
        getattr(library, name).restype = None
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The library built for this machine, or None."""
    return build()


def available(*tensors: torch.Tensor) -> bool:
    """Whether these inputs (x, and dy in the backward) take the C passes: float32 channels_last
    (rows of channels), same shape and strides, not empty, the library built."""
    return _plane_sums.takes(*tensors) and _library() is not None


def _f32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(torch.float32).contiguous() for t in tensors]


def _shape(x: torch.Tensor) -> tuple[int, int, int]:
    n, c = x.shape[:2]
    return n, x.numel() // (n * c), c


def forward(x, w_b, b, w_f, eps: float, running_mean=None, running_var=None):
    """y, the batch (or given running) mean and biased variance (C,), LN's mean less each
    position's first channel and its 1/σ per position ((N, 1, *) float32; only :func:`backward`
    reads them)."""
    n, s, c = _shape(x)
    row_stats = torch.empty(2, n, 1, *x.shape[2:])
    mean_f, invstd_f = row_stats[0], row_stats[1]
    library, threads = _library(), torch.get_num_threads()
    if running_mean is None:
        shift = sample_mean(x, batch_dims(x.dim())).reshape(-1)
        s1, s2 = torch.empty(2, n, c, dtype=torch.float64)
        library.bln_stats(x.data_ptr(), shift.data_ptr(), n, s, c, eps, mean_f.data_ptr(),
                          invstd_f.data_ptr(), s1.data_ptr(), s2.data_ptr(), threads)  # fmt: skip
        mean, var = _plane_sums.moments_from_sums(s1.sum(0), s2.sum(0), shift, n * s)
    else:
        library.bln_stats(x.data_ptr(), None, n, s, c, eps, mean_f.data_ptr(), invstd_f.data_ptr(),
                          None, None, threads)  # fmt: skip
        mean, var = _f32(running_mean, running_var)
    w_b, b, w_f = _f32(w_b, b, w_f)
    scale_b = torch.rsqrt(var + eps) * w_b
    y = torch.empty_like(x)
    library.bln_output(x.data_ptr(), mean.data_ptr(), scale_b.data_ptr(), w_f.data_ptr(), b.data_ptr(),
                       mean_f.data_ptr(), invstd_f.data_ptr(), y.data_ptr(), n * s, c, threads)  # fmt: skip
    return y, mean, var, mean_f, invstd_f


def backward(dy, x, w_b, w_f, mean, var, mean_f, invstd_f, eps: float, training: bool):
    """dx and the sums Σ dy x̂_B, Σ dy, Σ dy x̂_F (C,) that are the gradients of w_b, b and w_f."""
    n, s, c = _shape(x)
    library, threads = _library(), torch.get_num_threads()
    mean, var, w_b, w_f = _f32(mean, var, w_b, w_f)
    row_sums = torch.empty(2, n * s)
    sums = torch.empty(3, n, c, dtype=torch.float64)
    library.bln_backward_sums(
        dy.data_ptr(), x.data_ptr(), mean.data_ptr(), w_f.data_ptr(), mean_f.data_ptr(),
        invstd_f.data_ptr(), n, s, c, row_sums[0].data_ptr(), row_sums[1].data_ptr(),
        *(t.data_ptr() for t in sums), threads,
    )  # fmt: skip
    sum_g, sum_gx_b, sum_gx_f = sums.sum(1).float()
    invstd = torch.rsqrt(var + eps)
    sum_gx_b = sum_gx_b * invstd
    scale = invstd * w_b
    if training:  # the batch statistics depend on x
        count = n * s
        centred, constant = -scale * invstd * sum_gx_b / count, -scale * sum_g / count
    else:  # the running statistics are constants
        centred = constant = torch.zeros(c)
    dx = torch.empty_like(x)
    library.bln_input_grad(
        dy.data_ptr(), x.data_ptr(), mean.data_ptr(), scale.data_ptr(), centred.data_ptr(),
        constant.data_ptr(), w_f.data_ptr(), mean_f.data_ptr(), invstd_f.data_ptr(),
        row_sums[0].data_ptr(), row_sums[1].data_ptr(), dx.data_ptr(), n * s, c, threads,
    )  # fmt: skip
    return dx, sum_gx_b, sum_g, sum_gx_f


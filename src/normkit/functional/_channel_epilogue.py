"""The per-channel steps between the C passes of the compiled batch norm
(:mod:`normkit.functional._batch_norm_compiled`), in C: from the float64 per-plane sums of
:mod:`normkit.functional._plane_sums` to the statistics and the coefficients of the next pass.

- :func:`statistics`: the batch's mean and biased variance from shifted sums (PERF.md §4:
  mean = k + S1 / n, var = (S2 - S1² / n) / n), 1 / sqrt(var + eps) and the normalize pass's scale
  w / sqrt(var + eps) (Ioffe & Szegedy 2015, Alg. 1), and the running statistics' update with
  momentum and Bessel's correction n / (n - 1) where the buffers are float32;
- :func:`input_grad_coefficients`: ``sum(dy)``, ``sum(dy * x_hat)`` and the coefficients of the
  input gradient's pass (§3): dx = A dy + B (x - mean) + D with A = w invstd,
  B = -w invstd² sum(dy x_hat) / n, D = -w invstd sum(dy) / n.

Each replaces some ten ATen ops on (C,) and (N, C) tensors. Alone each op takes a few
microseconds, but 10-20 µs right after a pass has streamed 25 MB through the caches: inside the
training step at (32, 64, 56, 56) float32, these steps took about 0.5 ms of a 7 ms step
(docs/benchmarks.md). The values are the same as those ops' within float32 rounding (the sums
over the samples are added in float64 in another order).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from normkit.functional import _native

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* t1[c] = sum_n s1[n, c], t2[c] = sum_n s2[n, c], float64 (C,) from (N, C): row by row, in the
   order of memory. Returns t1 (t2 = t1 + C), to be freed, or NULL where there is no memory. */
static double* column_sums(const double* s1, const double* s2, int64_t N, int64_t C) {
  double* t1 = (double*)calloc(2 * C, sizeof(double));
  if (!t1) return 0;
  double* t2 = t1 + C;
  for (int64_t n = 0; n < N; n++)
    for (int64_t c = 0; c < C; c++) {
      t1[c] += s1[n * C + c];
      t2[c] += s2[n * C + c];
    }
  return t1;
}

/* Per channel c of (N, C) float64 shifted sums s1 = sum(x - k), s2 = sum((x - k)^2) over `count`
   values: mean, biased var, invstd = 1 / sqrt(var + eps), scale = w invstd (w NULL: 1); and,
   where running_mean is not NULL, running = (1 - momentum) running + momentum * statistic, with
   the variance's Bessel correction count / (count - 1). Returns 0, or -1 where there is no
   memory for the sums over the samples. */
int statistics(const double* s1, const double* s2, const float* shift, const float* weight,
                int64_t N, int64_t C, int64_t count, double eps, double momentum,
                float* running_mean, float* running_var, float* mean, float* var, float* invstd,
                float* scale) {
  const float keep = (float)(1.0 - momentum), take = (float)momentum;
  const float bessel = count > 1 ? (float)((double)count / (double)(count - 1)) : NAN;
  double* sums = column_sums(s1, s2, N, C);
  if (!sums) return -1;
  for (int64_t c = 0; c < C; c++) {
    const double t1 = sums[c], t2 = sums[C + c];
    const double v = (t2 - t1 * t1 / count) / count;
    mean[c] = (float)((double)shift[c] + t1 / count);
    var[c] = (float)(v < 0.0 ? 0.0 : v);  /* a NaN stays NaN, for the running statistics' guard */
    invstd[c] = 1.0f / sqrtf(var[c] + (float)eps);
    scale[c] = weight ? weight[c] * invstd[c] : invstd[c];
    if (running_mean) {
      running_mean[c] = running_mean[c] * keep + take * mean[c];
      running_var[c] = running_var[c] * keep + take * (var[c] * bessel);
    }
  }
  free(sums);
  return 0;
}

/* Per channel c of (N, C) float64 sums sg = sum(dy), sgx = sum(dy * (x - mean)) over `count`
   values: sum_g, sum_gx_hat = sum(dy * x_hat) and the input gradient's coefficients A, B, D.
   Returns 0, or -1 where there is no memory for the sums over the samples. */
int input_grad_coefficients(const double* sg, const double* sgx, const float* weight,
                             const float* invstd, int64_t N, int64_t C, int64_t count,
                             float* sum_g, float* sum_gx_hat, float* A, float* B, float* D) {
  double* sums = column_sums(sg, sgx, N, C);
  if (!sums) return -1;
  for (int64_t c = 0; c < C; c++) {
    sum_g[c] = (float)sums[c];
    sum_gx_hat[c] = (float)sums[C + c] * invstd[c];
    const float scale = weight ? weight[c] * invstd[c] : invstd[c];
    A[c] = scale;
    B[c] = -scale * invstd[c] * sum_gx_hat[c] / (float)count;
    D[c] = -scale * sum_g[c] / (float)count;
  }
  free(sums);
  return 0;
}
"""

_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64


def build(flags: tuple[str, ...] = tuple(_native.FLAGS)) -> ctypes.CDLL | None:
    """The two functions built with ``flags`` (:func:`normkit.functional._native.library`) with
    their signatures, or None."""
    library = _native.library("channel_epilogue", _SOURCE, flags)
    if library is not None:
        library.statistics.restype = ctypes.c_int
        library.statistics.argtypes = (
            [_POINTER] * 4 + [_SIZE] * 3 + [ctypes.c_double] * 2 + [_POINTER] * 6
        )
        library.input_grad_coefficients.restype = ctypes.c_int
        library.input_grad_coefficients.argtypes = [_POINTER] * 4 + [_SIZE] * 3 + [_POINTER] * 5
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    return build()


def available() -> bool:
    """Whether the library is built (and loaded) on this machine."""
    return _library() is not None


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _updates_in_place(running_mean, running_var, momentum) -> bool:
    """Whether the C loop can blend into the buffers themselves: float32, contiguous, on the CPU,
    and a number momentum (a tensor momentum, the cumulative average's, is blended by ATen ops)."""
    return (
        running_mean is not None
        and running_var is not None
        and not isinstance(momentum, torch.Tensor)
        and all(
            t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
            for t in (running_mean, running_var)
        )
    )


def statistics(s1, s2, shift, weight, eps: float, count: int, running_mean=None, running_var=None,
               momentum: float | torch.Tensor = 0.0):  # fmt: skip
    """(mean, var, invstd, scale), each (C,) float32, from the (N, C) float64 sums of ``x - shift``
    and its square over ``count`` values per channel; returns True as a fifth value where it also
    blended the batch's statistics into ``running_mean`` and ``running_var`` (float32 buffers and
    a number momentum), False where the caller must (:func:`_updates_in_place`)."""
    channels = s1.shape[-1]
    mean, var, invstd, scale = (torch.empty(channels) for _ in range(4))
    in_place = _updates_in_place(running_mean, running_var, momentum)
    shift, weight = _float32(shift), _float32(weight)
    status = _library().statistics(
        s1.data_ptr(), s2.data_ptr(), shift.data_ptr(), _pointer(weight),
        s1.numel() // channels, channels, count, eps, float(momentum) if in_place else 0.0,
        _pointer(running_mean) if in_place else None, _pointer(running_var) if in_place else None,
        mean.data_ptr(), var.data_ptr(), invstd.data_ptr(), scale.data_ptr(),
    )  # fmt: skip
    if status:
        raise MemoryError(f"statistics: no memory to add the sums of {channels} channels")
    return mean, var, invstd, scale, in_place


def input_grad_coefficients(sg, sgx, weight, invstd, count: int):
    """(sum_g, sum_gx_hat, A, B, D), each (C,) float32, from the (N, C) float64 sums of ``dy`` and
    ``dy * (x - mean)`` over ``count`` values per channel (see the module docstring)."""
    channels = sg.shape[-1]
    outputs = [torch.empty(channels) for _ in range(5)]
    weight, invstd = _float32(weight), _float32(invstd)
    status = _library().input_grad_coefficients(
        sg.data_ptr(), sgx.data_ptr(), _pointer(weight), invstd.data_ptr(),
        sg.numel() // channels, channels, count, *(t.data_ptr() for t in outputs),
    )  # fmt: skip
    if status:
        raise MemoryError(f"input_grad_coefficients: no memory to add the sums of {channels} channels")
    return tuple(outputs)

"""Float64 NumPy forms of the normalizers, written like the papers' algorithms: the tests' oracle.

Nothing here is fast or clever. Each function follows its paper's equations step by step, in float64,
so that the PyTorch implementations (every backend, every dtype) can be checked against it. Arrays are
(N, C, *spatial) unless said otherwise; γ (``gamma``) and β (``beta``) are per channel except for
LayerNorm, where they have the normalized shape.

- Batch normalization, Ioffe & Szegedy 2015 (https://arxiv.org/abs/1502.03167):
  :func:`batch_norm_train` (Algorithm 1), :func:`batch_norm_backward` (the chain rule of §3),
  :func:`batch_norm_inference` and :func:`population_statistics` (Algorithm 2),
  :func:`running_average` (the exponential average used in practice).
- Layer normalization, Ba et al. 2016, eq. 4: :func:`layer_norm`.
- Instance normalization, Ulyanov et al. 2016, eq. 2: :func:`instance_norm`.
- Group normalization, Wu & He 2018, eqs. 1-3: :func:`group_norm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Cache:
    """What Algorithm 1 computed, kept for the backward pass of §3."""

    x: np.ndarray
    axes: tuple[int, ...]
    mu: np.ndarray  # mu_B, keeps the reduced axes as size 1
    var: np.ndarray  # sigma2_B, biased
    x_hat: np.ndarray
    gamma: np.ndarray  # broadcastable to x
    eps: float


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _channel(v, ndim: int) -> np.ndarray:
    """A per-channel vector shaped (1, C, 1, ...) to broadcast over (N, C, *)."""
    return _f64(v).reshape((1, -1) + (1,) * (ndim - 2))


def _batch_axes(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim))


def normalize_over(x, axes, gamma, beta, eps: float) -> tuple[np.ndarray, Cache]:
    """Algorithm 1 of Ioffe & Szegedy over any set of axes that share statistics.

        mu_B     = 1/m sum_i x_i
        sigma2_B = 1/m sum_i (x_i - mu_B)^2
        x_hat_i  = (x_i - mu_B) / sqrt(sigma2_B + eps)
        y_i      = gamma * x_hat_i + beta

    ``gamma`` and ``beta`` must broadcast against ``x``.
    """
    x = _f64(x)
    m = int(np.prod([x.shape[a] for a in axes]))
    mu = x.sum(axis=axes, keepdims=True) / m
    var = ((x - mu) ** 2).sum(axis=axes, keepdims=True) / m
    x_hat = (x - mu) / np.sqrt(var + eps)
    gamma, beta = _f64(gamma), _f64(beta)
    y = gamma * x_hat + beta
    return y, Cache(x, tuple(axes), mu, var, x_hat, gamma, eps)


def normalize_backward(dy, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The backward pass of Ioffe & Szegedy §3, equation by equation.

        dl/dx_hat   = dl/dy * gamma
        dl/dsigma2  = sum_i dl/dx_hat_i (x_i - mu_B) * -1/2 (sigma2_B + eps)^(-3/2)
        dl/dmu      = sum_i dl/dx_hat_i * -1/sqrt(sigma2_B + eps) + dl/dsigma2 * sum_i -2(x_i - mu_B)/m
        dl/dx_i     = dl/dx_hat_i / sqrt(sigma2_B + eps) + dl/dsigma2 * 2(x_i - mu_B)/m + dl/dmu / m
        dl/dgamma   = sum_i dl/dy_i x_hat_i,    dl/dbeta = sum_i dl/dy_i

    Returns ``(dx, dgamma, dbeta)``, with dgamma and dbeta in the broadcast shape of gamma (sum
    over every axis along which gamma was broadcast).
    """
    dy = _f64(dy)
    x, axes, mu, var, eps = cache.x, cache.axes, cache.mu, cache.var, cache.eps
    m = int(np.prod([x.shape[a] for a in axes]))
    dx_hat = dy * cache.gamma
    dvar = (dx_hat * (x - mu) * -0.5 * (var + eps) ** -1.5).sum(axis=axes, keepdims=True)
    dmu = (dx_hat * -1.0 / np.sqrt(var + eps)).sum(axis=axes, keepdims=True) + dvar * (
        -2.0 * (x - mu)
    ).sum(axis=axes, keepdims=True) / m
    dx = dx_hat / np.sqrt(var + eps) + dvar * 2.0 * (x - mu) / m + dmu / m
    dgamma = _sum_to(dy * cache.x_hat, np.shape(cache.gamma))
    dbeta = _sum_to(dy, np.shape(cache.gamma))
    return dx, dgamma, dbeta


def _sum_to(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``a`` over the axes along which an array of ``shape`` was broadcast to ``a.shape``."""
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a


# --- Batch normalization (Ioffe & Szegedy 2015) ---------------------------------------------------


def batch_norm_train(x, gamma, beta, eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Algorithm 1: normalize each channel over the mini-batch (and, for convolutions, over space:
    "the effective mini-batch size m' = |B| = m * p * q", §3.2)."""
    x = _f64(x)
    return normalize_over(
        x, _batch_axes(x.ndim), _channel(gamma, x.ndim), _channel(beta, x.ndim), eps
    )


def batch_norm_backward(dy, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§3's gradients for Algorithm 1; ``dgamma`` and ``dbeta`` returned per channel (C,)."""
    dx, dgamma, dbeta = normalize_backward(dy, cache)
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)


def batch_norm_inference(x, mean, var, gamma, beta, eps: float = 1e-5) -> np.ndarray:
    """Algorithm 2, step 11: the fixed affine map with population statistics.

    y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma * E[x] / sqrt(Var[x] + eps))
    """
    x = _f64(x)
    mean, var = _channel(mean, x.ndim), _channel(var, x.ndim)
    gamma, beta = _channel(gamma, x.ndim), _channel(beta, x.ndim)
    scale = gamma / np.sqrt(var + eps)
    return scale * x + (beta - scale * mean)


def batch_statistics(x) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel (mu_B, sigma2_B biased, m) of one mini-batch."""
    x = _f64(x)
    axes = _batch_axes(x.ndim)
    m = int(np.prod([x.shape[a] for a in axes]))
    mu = x.mean(axis=axes)
    return mu, ((x - _channel(mu, x.ndim)) ** 2).mean(axis=axes), m


def population_statistics(batches) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2, steps 9-10: E[x] = E_B[mu_B] and Var[x] = m/(m-1) E_B[sigma2_B].

    Every batch must have the same m, as in the paper.
    """
    stats = [batch_statistics(b) for b in batches]
    m = stats[0][2]
    mean = np.mean([s[0] for s in stats], axis=0)
    var = m / (m - 1) * np.mean([s[1] for s in stats], axis=0)
    return mean, var


def running_average(running_mean, running_var, x, momentum) -> tuple[np.ndarray, np.ndarray]:
    """One step of the exponential average that stands in for Algorithm 2's expectations.

    running <- (1 - momentum) * running + momentum * statistic,  variance unbiased by m/(m-1)
    """
    mu, var, m = batch_statistics(x)
    new_mean = (1 - momentum) * _f64(running_mean) + momentum * mu
    new_var = (1 - momentum) * _f64(running_var) + momentum * var * m / (m - 1)
    return new_mean, new_var


# --- Layer, instance and group normalization -------------------------------------------------------


def layer_norm(x, normalized_ndim: int, gamma=1.0, beta=0.0, eps: float = 1e-5):
    """Ba et al. 2016, eq. 4: mu and sigma over the H hidden units of one sample (here: the last
    ``normalized_ndim`` axes); gain and bias have the normalized shape. Returns ``(y, cache)``."""
    x = _f64(x)
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    return normalize_over(x, axes, gamma, beta, eps)


def channel_layer_norm(x, gamma=1.0, beta=0.0, eps: float = 1e-5):
    """Layer normalization over the channel axis of (N, C, *) at each position (ConvNeXt)."""
    x = _f64(x)
    gamma = _channel(gamma, x.ndim) if np.ndim(gamma) else gamma
    beta = _channel(beta, x.ndim) if np.ndim(beta) else beta
    return normalize_over(x, (1,), gamma, beta, eps)


def instance_norm(x, gamma=1.0, beta=0.0, eps: float = 1e-5):
    """Ulyanov et al. 2016, eq. 2: mu_ti and sigma_ti over the spatial axes of sample t, channel i."""
    x = _f64(x)
    gamma = _channel(gamma, x.ndim) if np.ndim(gamma) else gamma
    beta = _channel(beta, x.ndim) if np.ndim(beta) else beta
    return normalize_over(x, tuple(range(2, x.ndim)), gamma, beta, eps)


def group_norm(x, num_groups: int, gamma=1.0, beta=0.0, eps: float = 1e-5):
    """Wu & He 2018, eqs. 1-3: S_i = {k | k_N = i_N, floor(k_C / (C/G)) = floor(i_C / (C/G))}.

    Returns ``(y, cache)``; the cache is over the grouped view (N, G, C/G, *).
    """
    x = _f64(x)
    n, c = x.shape[:2]
    grouped = x.reshape(n, num_groups, c // num_groups, *x.shape[2:])
    per_group = (1, num_groups, c // num_groups) + (1,) * (x.ndim - 2)
    gamma = _f64(gamma).reshape(per_group) if np.ndim(gamma) else gamma
    beta = _f64(beta).reshape(per_group) if np.ndim(beta) else beta
    y, cache = normalize_over(grouped, tuple(range(2, grouped.ndim)), gamma, beta, eps)
    return y.reshape(x.shape), cache

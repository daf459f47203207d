"""Float64 NumPy forms of the normalizers, written like the papers' algorithms: the tests' oracle.

Nothing here is fast or clever. Each function follows its paper's equations step by step, in float64,
so that the PyTorch implementations (every backend, every dtype) can be checked against it. Arrays are
(N, C, *spatial) unless said otherwise; γ (``gamma``) and β (``beta``) are per channel except for
LayerNorm, where they have the normalized shape.

- Batch normalization, Ioffe & Szegedy 2015 (https://arxiv.org/abs/1502.03167):
  :func:`batch_norm_train` (Algorithm 1), :func:`batch_norm_backward` (the chain rule of §3),
  :func:`batch_norm_inference` and :func:`population_statistics` (Algorithm 2),
  :func:`running_average` (the exponential average used in practice).
- Chan, Golub & LeVeque 1979, eq. 2.1: :func:`chan_merge` (per-device statistics merged, SyncBN).
- Model tools: :func:`fold_batch_norm` (Algorithm 2, step 11, folded into the layer before),
  :func:`precise_statistics` (PreciseBN, Wu & Johnson 2021), :func:`domain_statistics` (AdaBN, Li
  et al. 2016, Algorithm 1).
- Layer normalization, Ba et al. 2016, eq. 4: :func:`layer_norm`.
- Instance normalization, Ulyanov et al. 2016, eq. 2: :func:`instance_norm`.
- Group normalization, Wu & He 2018, eqs. 1-3: :func:`group_norm`.
- Fused activations: :func:`batch_norm_act_train` and :func:`batch_norm_act_backward` (Algorithm 1,
  a residual, an activation); In-Place ABN, Rota Bulò et al. 2018, §3.2: :func:`inplace_abn_backward`
  (the gradients recovered from the output alone).
- Beyond BatchNorm: :func:`batch_renorm_train` and :func:`batch_renorm_backward` (Ioffe 2017,
  Algorithm 1),
  :func:`ghost_batch_norm_train` and :func:`ghost_running_average` (Hoffer et al. 2017, §4),
  :func:`batch_instance_norm` (Nam & Kim 2018, eqs. 6-7), :func:`batch_layer_norm` (Ziaee & Çano
  2022, the official code), :func:`switchable_norm` (Luo et al. 2018, eqs. 3-4), and the masked
  statistics :func:`masked_batch_norm` and :func:`masked_layer_norm`.
- ℓp normalization, Santurkar et al. 2018, §3.3: :func:`lp_batch_norm` (the lab's ℓ1/ℓ2/ℓ∞ layers).
- Small batches: :func:`rms_norm` and :func:`channel_rms_norm` (Zhang & Sennrich 2019, eqs. 3-4),
  :func:`filter_response_norm` (Singh & Krishnan 2020, eqs. 1-3), :func:`evo_norm_b0` and
  :func:`evo_norm_s0` (Liu et al. 2020), :func:`standardized_weight` (Qiao et al. 2019, eqs. 5-6;
  Brock et al. 2021) and :func:`centered_weight`, :func:`mabn_train` and :func:`mabn_backward` (Yan
  et al. 2020, MABN), :func:`cross_iteration_statistics` (Yao et al. 2021, CBN), and
  :func:`accumulated_running_average` (what ``nk.accumulate`` must record).
"""

from __future__ import annotations

import math
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


def chan_merge(parts) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan, Golub & LeVeque (1979), eq. 2.1: the pairwise update of a sum T and a centred sum of
    squares S, used to combine per-device statistics into those of the whole batch (SyncBN).

        T_{1,m+n} = T_{1,m} + T_{m+1,m+n}
        S_{1,m+n} = S_{1,m} + S_{m+1,m+n} + m / (n (m + n)) * (n/m T_{1,m} - T_{m+1,m+n})^2

    ``parts`` is a sequence of ``(count, mean, M2)``, one per part (M2 = S of that part), folded in
    left to right; empty parts (count 0) are skipped. Returns ``(count, mean, M2)`` of the union.
    """
    m, t, s = 0, 0.0, 0.0
    for n, mean, m2 in parts:
        if n == 0:
            continue
        t2, s2 = n * _f64(mean), _f64(m2)
        if m == 0:
            m, t, s = n, t2, s2
            continue
        s = s + s2 + m / (n * (m + n)) * (n / m * t - t2) ** 2
        t, m = t + t2, m + n
    return m, t / m, s


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


# --- Model tools: folding, PreciseBN, AdaBN ---------------------------------------------------------


def fold_batch_norm(weight, bias, mean, var, gamma, beta, eps: float = 1e-5):
    """Algorithm 2, step 11 applied to the layer before: BN(W x + b) = W' x + b' with
    W'_o = gamma_o / sqrt(var_o + eps) * W_o (output channel o = axis 0 of ``weight``) and
    b'_o = gamma_o / sqrt(var_o + eps) * (b_o - mean_o) + beta_o. Returns ``(W', b')``."""
    weight = _f64(weight)
    scale = _f64(gamma) / np.sqrt(_f64(var) + eps)
    bias = np.zeros_like(scale) if bias is None else _f64(bias)
    folded = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return folded, scale * (bias - _f64(mean)) + _f64(beta)


def precise_statistics(batches) -> tuple[np.ndarray, np.ndarray]:
    """PreciseBN (Wu & Johnson 2021, §3): the plain average, one weight per batch, of each batch's
    mean and unbiased variance, mu = (1/N) sum_j mu_Bj and var = (1/N) sum_j m_j/(m_j - 1)
    sigma2_Bj. Equals :func:`population_statistics` when every batch has the same m."""
    stats = [batch_statistics(b) for b in batches]
    mean = np.mean([mu for mu, _, _ in stats], axis=0)
    var = np.mean([s2 * m / (m - 1) for _, s2, m in stats], axis=0)
    return mean, var


def domain_statistics(batches) -> tuple[np.ndarray, np.ndarray]:
    """AdaBN (Li et al. 2016, Algorithm 1): the mean and (unbiased) variance of each channel's
    responses over all the target domain's samples and positions, the batches concatenated."""
    x = np.concatenate([_f64(b) for b in batches], axis=0)
    axes = _batch_axes(x.ndim)
    return x.mean(axis=axes), x.var(axis=axes, ddof=1)


# --- Beyond BatchNorm: small-batch and adaptive normalizers ---------------------------------------


def ghost_batch_sizes(n: int, virtual_batch_size: int) -> list[int]:
    """normkit's split of N samples into ghost batches: G = max(1, N // v), sizes as equal as
    possible, the larger ones first."""
    g = max(1, n // virtual_batch_size)
    return [n // g + (1 if k < n % g else 0) for k in range(g)]


def batch_renorm_train(x, gamma, beta, mu, sigma, r_max, d_max, alpha, eps: float = 1e-5):
    """Batch Renormalization, Ioffe 2017, Algorithm 1 (training), per channel:

        mu_B    = 1/m sum_i x_i
        sigma_B = sqrt(eps + 1/m sum_i (x_i - mu_B)^2)
        r       = stop_gradient(clip_[1/r_max, r_max](sigma_B / sigma))
        d       = stop_gradient(clip_[-d_max, d_max]((mu_B - mu) / sigma))
        x_hat_i = (x_i - mu_B) / sigma_B * r + d
        y_i     = gamma * x_hat_i + beta
        mu     := mu + alpha (mu_B - mu),   sigma := sigma + alpha (sigma_B - sigma)

    ``mu`` and ``sigma`` are the moving mean and moving standard deviation. Returns
    ``(y, mu_new, sigma_new, r, d)``.
    """
    x = _f64(x)
    axes = _batch_axes(x.ndim)
    m = int(np.prod([x.shape[a] for a in axes]))
    mu, sigma = _f64(mu), _f64(sigma)
    mu_b = x.sum(axis=axes) / m
    sigma_b = np.sqrt(eps + ((x - _channel(mu_b, x.ndim)) ** 2).sum(axis=axes) / m)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
    x_hat = (x - _channel(mu_b, x.ndim)) / _channel(sigma_b, x.ndim) * _channel(r, x.ndim)
    x_hat = x_hat + _channel(d, x.ndim)
    y = _channel(gamma, x.ndim) * x_hat + _channel(beta, x.ndim)
    return y, mu + alpha * (mu_b - mu), sigma + alpha * (sigma_b - sigma), r, d


def ghost_batch_norm_train(x, gamma, beta, virtual_batch_size: int, eps: float = 1e-5):
    """Ghost Batch Normalization, Hoffer et al. 2017, §4: Algorithm 1 on each ghost batch of
    :func:`ghost_batch_sizes` samples, in order. Returns ``(y, stats)`` with ``stats`` the list of
    each ghost batch's (mu_B, sigma2_B biased, m)."""
    x = _f64(x)
    outputs, stats, start = [], [], 0
    for size in ghost_batch_sizes(x.shape[0], virtual_batch_size):
        ghost = x[start : start + size]
        outputs.append(batch_norm_train(ghost, gamma, beta, eps)[0])
        stats.append(batch_statistics(ghost))
        start += size
    return np.concatenate(outputs), stats


def ghost_running_average(running_mean, running_var, x, virtual_batch_size: int, momentum):
    """The running statistics after one batch of Ghost BN: :func:`running_average` applied once per
    ghost batch, in order, as the paper's code does (it runs the ghost batches one after another)."""
    x = _f64(x)
    mean, var, start = _f64(running_mean), _f64(running_var), 0
    for size in ghost_batch_sizes(x.shape[0], virtual_batch_size):
        mean, var = running_average(mean, var, x[start : start + size], momentum)
        start += size
    return mean, var


def _normalized_by_channel(x, mean, var, eps):
    """(x - mean) / sqrt(var + eps) with per-channel statistics."""
    return (x - _channel(mean, x.ndim)) / np.sqrt(_channel(var, x.ndim) + eps)


def batch_instance_norm(x, rho, gamma, beta, eps: float = 1e-5, mean=None, var=None):
    """Batch-Instance Normalization, Nam & Kim 2018, eqs. 6-7:

        y = (rho * x_hat_B + (1 - rho) * x_hat_I) * gamma + beta,   rho clipped to [0, 1]

    x_hat_B with the batch's statistics, or the population ``mean``/``var`` when given (inference);
    x_hat_I with each (sample, channel)'s statistics over space.
    """
    x = _f64(x)
    if mean is None:
        mean, var, _ = batch_statistics(x)
    x_hat_b = _normalized_by_channel(x, mean, var, eps)
    x_hat_i = instance_norm(x, eps=eps)[0]
    rho = _channel(np.clip(_f64(rho), 0.0, 1.0), x.ndim)
    y = rho * x_hat_b + (1.0 - rho) * x_hat_i
    return y * _channel(gamma, x.ndim) + _channel(beta, x.ndim)


def batch_layer_norm(
    x, gamma, beta, eps=1e-3, batch_size=None, divide_by_sqrt_features=True, mean=None, var=None
):
    """Batch Layer Normalization, Ziaee & Çano 2022, as in the official code (``bln_layer.py``):

        x_b = (x - mu_B) / sqrt(sigma2_B + eps)     (per channel; population statistics if given)
        x_f = (x - mu_F) / sqrt(sigma2_F + eps)     (over the channels, per sample and position)
        y   = gamma * [(1/m - 1e-4) x_f + (1 - (1/m + 1e-4)) x_b] / sqrt(d_k) + beta

    with m = ``batch_size`` (default: N) and d_k = C.
    """
    x = _f64(x)
    m = batch_size or x.shape[0]
    if mean is None:
        mean, var, _ = batch_statistics(x)
    x_b = _normalized_by_channel(x, mean, var, eps)
    x_f = channel_layer_norm(x, eps=eps)[0]
    numerator = x_f * (1.0 / m - 1e-4) + x_b * (1.0 - (1.0 / m + 1e-4))
    x_beta = numerator / np.sqrt(x.shape[1]) if divide_by_sqrt_features else numerator
    return _channel(gamma, x.ndim) * x_beta + _channel(beta, x.ndim)


def switchable_norm(
    x, mean_weight, var_weight, gamma, beta, eps: float = 1e-5, mean=None, var=None
):
    """Switchable Normalization, Luo et al. 2018, eqs. 3-4, k in (IN, LN, BN):

        y = gamma * (x - sum_k w_k mu_k) / sqrt(sum_k w'_k sigma2_k + eps) + beta
        w_k = exp(lambda_k) / sum_z exp(lambda_z),  w'_k likewise from lambda'

    mu_k and sigma2_k (biased) over: space per (n, c) (IN); channels and space per n (LN); batch and
    space per c (BN, or the population ``mean``/``var`` when given).
    """
    x = _f64(x)
    spatial = tuple(range(2, x.ndim))
    w = np.exp(_f64(mean_weight)) / np.exp(_f64(mean_weight)).sum()
    v = np.exp(_f64(var_weight)) / np.exp(_f64(var_weight)).sum()
    mu_in, var_in = x.mean(axis=spatial, keepdims=True), x.var(axis=spatial, keepdims=True)
    per_sample = tuple(range(1, x.ndim))
    mu_ln, var_ln = x.mean(axis=per_sample, keepdims=True), x.var(axis=per_sample, keepdims=True)
    if mean is None:
        mean, var, _ = batch_statistics(x)
    mu_bn, var_bn = _channel(mean, x.ndim), _channel(var, x.ndim)
    mu = w[0] * mu_in + w[1] * mu_ln + w[2] * mu_bn
    sigma2 = v[0] * var_in + v[1] * var_ln + v[2] * var_bn
    return _channel(gamma, x.ndim) * (x - mu) / np.sqrt(sigma2 + eps) + _channel(beta, x.ndim)


def masked_batch_norm(x, mask, gamma, beta, eps: float = 1e-5):
    """Algorithm 1 of Ioffe & Szegedy on the real elements only: for each channel c, mu_B and
    sigma2_B over {x[n, c, *s] : mask[n, *s]}; padded positions of the output are 0. ``mask`` has
    the shape of ``x`` without dim 1. Returns ``(y, mu_B, sigma2_B, m)``."""
    x, mask = _f64(x), np.asarray(mask, dtype=bool)
    y = np.zeros_like(x)
    channels = x.shape[1]
    mu, sigma2 = np.zeros(channels), np.zeros(channels)
    for c in range(channels):
        real = x[:, c][mask]  # the channel's real elements, (m,)
        mu[c] = real.sum() / real.size
        sigma2[c] = ((real - mu[c]) ** 2).sum() / real.size
        x_hat = (x[:, c] - mu[c]) / np.sqrt(sigma2[c] + eps)
        y[:, c] = np.where(mask, _f64(gamma)[c] * x_hat + _f64(beta)[c], 0.0)
    return y, mu, sigma2, int(mask.sum())


def masked_layer_norm(x, mask, normalized_ndim: int, gamma=1.0, beta=0.0, eps: float = 1e-5):
    """Ba et al. 2016, eq. 4, on the real elements of each group: mu and sigma over the last
    ``normalized_ndim`` axes of one sample, counting only positions where ``mask`` (the shape of
    ``x`` without its last axis) is True; padded positions of the output are 0."""
    x, mask = _f64(x), np.asarray(mask, dtype=bool)
    y = np.zeros_like(x)
    lead = x.shape[: x.ndim - normalized_ndim]
    for index in np.ndindex(*lead):
        group, real_positions = x[index], mask[index]
        real = group[real_positions]  # (positions, features)
        if real.size == 0:
            continue
        mu = real.sum() / real.size
        sigma2 = ((real - mu) ** 2).sum() / real.size
        normalized = _f64(gamma) * (group - mu) / np.sqrt(sigma2 + eps) + _f64(beta)
        y[index] = np.where(real_positions[..., None], normalized, 0.0)
    return y


def batch_renorm_backward(dy, x, gamma, r, d, eps: float = 1e-5):
    """The backward pass of Ioffe 2017, Algorithm 1, with r and d held constant (the paper's
    stop_gradient): y = gamma * r * x_hat + gamma * d + beta is BatchNorm's Algorithm 1 with scale
    gamma * r, whose backward is that of §3 of Ioffe & Szegedy (:func:`normalize_backward`), and
    dl/dgamma = sum_i dl/dy_i (x_hat_i r + d). Returns ``(dx, dgamma, dbeta)`` per channel."""
    x, dy = _f64(x), _f64(dy)
    scale = _f64(gamma) * _f64(r)
    _, cache = batch_norm_train(x, scale, np.zeros_like(scale), eps)
    dx, _, dbeta = normalize_backward(dy, cache)
    axes = _batch_axes(x.ndim)
    x_hat = cache.x_hat * _channel(r, x.ndim) + _channel(d, x.ndim)
    return dx, (dy * x_hat).sum(axis=axes), dbeta.reshape(-1)


# --- Fused activations and In-Place ABN (Rota Bulò, Porzi & Kontschieder 2018) ------------------------


def _erf(a: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(a)


def activation(a, name: str, param: float = 0.01) -> np.ndarray:
    """relu, leaky_relu (slope ``param``), silu, gelu (erf form), elu (alpha ``param``), identity."""
    a = _f64(a)
    if name == "relu":
        return np.maximum(a, 0.0)
    if name == "leaky_relu":
        return np.where(a > 0, a, param * a)
    if name == "silu":
        return a / (1.0 + np.exp(-a))
    if name == "gelu":
        return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))
    if name == "elu":
        return np.where(a > 0, a, param * np.expm1(np.minimum(a, 0.0)))
    return a


def activation_derivative(a, name: str, param: float = 0.01) -> np.ndarray:
    """d activation / da, with torch's values at the kinks (relu'(0) = 0, leaky_relu'(0) = slope)."""
    a = _f64(a)
    if name == "relu":
        return (a > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(a > 0, 1.0, param)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-a))
        return s * (1.0 + a * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + _erf(a / math.sqrt(2.0))) + a * np.exp(-0.5 * a * a) / math.sqrt(
            2.0 * math.pi
        )
    if name == "elu":
        return np.where(a > 0, 1.0, param * np.exp(np.minimum(a, 0.0)))
    return np.ones_like(a)


def batch_norm_act_train(x, gamma, beta, name: str, param: float = 0.01, shortcut=None, eps=1e-5):
    """y = act(BN(x) + shortcut): Algorithm 1, the residual added, then the activation.

    Returns ``(y, cache, pre)`` with ``pre`` the pre-activation BN(x) + shortcut.
    """
    bn, cache = batch_norm_train(x, gamma, beta, eps)
    pre = bn if shortcut is None else bn + _f64(shortcut)
    return activation(pre, name, param), cache, pre


def batch_norm_act_backward(dy, cache: Cache, pre, name: str, param: float = 0.01):
    """dl/dpre = dl/dy * act'(pre), which is also dl/dshortcut; then §3 of Ioffe & Szegedy.

    Returns ``(dx, dshortcut, dgamma, dbeta)``, dgamma and dbeta per channel.
    """
    dpre = _f64(dy) * activation_derivative(pre, name, param)
    dx, dgamma, dbeta = batch_norm_backward(dpre, cache)
    return dx, dpre, dgamma, dbeta


def inplace_abn_backward(dz, z, gamma, beta, var, name: str, param: float = 0.01, eps=1e-5):
    """The backward of In-Place ABN from its output alone (Rota Bulò et al. 2018, §3.2).

    With x -> BN -> y = gamma * x_hat + beta -> z = act(y), and only z kept:

        y           = act^-1(z)
        x_hat       = (y - beta) / gamma
        dl/dy       = dl/dz * act'(y)
        dl/dgamma   = sum_i dl/dy_i x_hat_i,    dl/dbeta = sum_i dl/dy_i
        dl/dx       = gamma / sqrt(sigma2_B + eps) * (dl/dy - dl/dbeta / m - x_hat * dl/dgamma / m)

    ``var`` is the batch's biased variance per channel. Returns ``(dx, dgamma, dbeta)``.
    """
    z, dz = _f64(z), _f64(dz)
    ndim = z.ndim
    axes = _batch_axes(ndim)
    m = int(np.prod([z.shape[a] for a in axes]))
    if name == "leaky_relu":
        y = np.where(z > 0, z, z / param)
    elif name == "elu":
        y = np.where(z > 0, z, np.log1p(z / param))
    else:
        y = z
    gamma, beta = _channel(gamma, ndim), _channel(beta, ndim)
    x_hat = (y - beta) / gamma
    dy = dz * activation_derivative(y, name, param)
    dgamma = (dy * x_hat).sum(axis=axes, keepdims=True)
    dbeta = dy.sum(axis=axes, keepdims=True)
    dx = gamma / np.sqrt(_channel(var, ndim) + eps) * (dy - dbeta / m - x_hat * dgamma / m)
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)


def lp_batch_norm(x, p: float, gamma=1.0, beta=0.0, eps: float = 1e-5):
    """Santurkar et al. 2018, §3.3: BN with the standard deviation replaced by an ℓp average of the
    activations, per channel over the batch and space, taken before the mean is subtracted:

        S_1 = mean |x|,   S_2 = sqrt(mean x^2),   S_inf = max |x|
        y   = gamma * (x - mean x) / (S_p + eps) + beta

    Returns ``(y, mean, S_p)`` with the statistics per channel (C,).
    """
    x = _f64(x)
    axes = _batch_axes(x.ndim)
    mu = x.mean(axis=axes, keepdims=True)
    if p == 1:
        scale = np.abs(x).mean(axis=axes, keepdims=True)
    elif p == 2:
        scale = np.sqrt((x**2).mean(axis=axes, keepdims=True))
    elif p == math.inf:
        scale = np.abs(x).max(axis=axes, keepdims=True)
    else:
        raise ValueError(f"p={p} must be 1, 2 or inf")
    y = _channel(gamma, x.ndim) * (x - mu) / (scale + eps) + _channel(beta, x.ndim)
    return y, mu.reshape(-1), scale.reshape(-1)


# --- Small batches: batch-independent normalizers, weight standardization, MABN, CBN ----------------


def rms_norm(x, normalized_ndim: int, gain=1.0, eps: float = 1e-6):
    """Zhang & Sennrich 2019, eqs. 3-4, over the last ``normalized_ndim`` axes (eps inside the
    root, as torch.nn.RMSNorm):

        RMS(a) = sqrt(1/n sum_i a_i^2 + eps)
        y_i    = a_i / RMS(a) * g_i
    """
    x = _f64(x)
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    rms = np.sqrt((x**2).mean(axis=axes, keepdims=True) + eps)  # eq. 4
    return x / rms * _f64(gain)  # eq. 3


def channel_rms_norm(x, gain=1.0, eps: float = 1e-6):
    """:func:`rms_norm` over the channel axis of (N, C, *) at each position."""
    x = _f64(x)
    rms = np.sqrt((x**2).mean(axis=1, keepdims=True) + eps)
    gain = _channel(gain, x.ndim) if np.ndim(gain) else gain
    return x / rms * gain


def filter_response_norm(x, gamma, beta, tau=None, eps: float = 1e-6):
    """Singh & Krishnan 2020, eqs. 1-3, per sample and channel over the spatial axes:

    nu2   = 1/N sum_i x_i^2             (eq. 1)
    y     = gamma * x / sqrt(nu2 + eps) + beta   (eq. 2)
    z     = max(y, tau)                 (eq. 3, the TLU; none when ``tau`` is None)
    """
    x = _f64(x)
    spatial = tuple(range(2, x.ndim))
    nu2 = (x**2).mean(axis=spatial, keepdims=True)  # eq. 1
    y = _channel(gamma, x.ndim) * x / np.sqrt(nu2 + eps) + _channel(beta, x.ndim)  # eq. 2
    return y if tau is None else np.maximum(y, _channel(tau, x.ndim))  # eq. 3


def evo_norm_b0(x, v, gamma, beta, eps: float = 1e-5, running_var=None):
    """EvoNorm-B0, Liu et al. 2020 (Figure 1 / Table 1), per channel:

        y = x / max(sqrt(s2_{b,w,h}(x) + eps), v x + sqrt(s2_{w,h}(x) + eps)) * gamma + beta

    with s2 the biased variance: over the batch and space (``running_var`` instead when given,
    inference), and over space per sample. Returns ``(y, s2_{b,w,h})``.
    """
    x = _f64(x)
    spatial, batch = tuple(range(2, x.ndim)), _batch_axes(x.ndim)
    var_b = x.var(axis=batch) if running_var is None else _f64(running_var)
    left = np.sqrt(_channel(var_b, x.ndim) + eps)
    right = _channel(v, x.ndim) * x + np.sqrt(x.var(axis=spatial, keepdims=True) + eps)
    y = x / np.maximum(left, right)
    return y * _channel(gamma, x.ndim) + _channel(beta, x.ndim), var_b


def evo_norm_s0(x, v, gamma, beta, groups: int, eps: float = 1e-5):
    """EvoNorm-S0, Liu et al. 2020 (Figure 1 / Table 1):

        y = x * sigmoid(v x) / sqrt(s2_{w,h,c/g}(x) + eps) * gamma + beta

    s2 the biased variance of each sample's group of C/G channels over space (GroupNorm's);
    ``v=None`` drops the gate.
    """
    x = _f64(x)
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, c // groups, *x.shape[2:])
    axes = tuple(range(2, grouped.ndim))
    std = np.sqrt(grouped.var(axis=axes, keepdims=True) + eps)
    std = np.broadcast_to(std, grouped.shape).reshape(x.shape)
    gate = 1.0 if v is None else 1.0 / (1.0 + np.exp(-_channel(v, x.ndim) * x))
    return x * gate / std * _channel(gamma, x.ndim) + _channel(beta, x.ndim)


def standardized_weight(w, eps: float = 1e-6, gain=None, scale: float = 1.0):
    """Weight Standardization, Qiao et al. 2019, eqs. 5-6, per output filter i (axis 0):

    mu_i    = 1/I sum_j W_ij                                   (eq. 5)
    sigma_i = sqrt(1/I sum_j (W_ij - mu_i)^2 + eps)             (eq. 6)
    W_hat   = (W - mu_i) / sigma_i  [* gain_i * scale: Scaled WS, Brock et al. 2021, eq. 2]
    """
    w = _f64(w)
    flat = w.reshape(w.shape[0], -1)
    mu = flat.mean(axis=1, keepdims=True)  # eq. 5
    sigma = np.sqrt(((flat - mu) ** 2).mean(axis=1, keepdims=True) + eps)  # eq. 6
    w_hat = (flat - mu) / sigma
    if gain is not None:
        w_hat = w_hat * _f64(gain).reshape(-1, 1)
    return (w_hat * scale).reshape(w.shape)


def centered_weight(w):
    """Weight centralization, Yan et al. 2020, §4.2: W_hat_i = W_i - mean_j W_ij."""
    w = _f64(w)
    flat = w.reshape(w.shape[0], -1)
    return (flat - flat.mean(axis=1, keepdims=True)).reshape(w.shape)


@dataclass
class MABNState:
    """What MABN (Yan et al. 2020) carries between iterations: the windows of the last m values of
    chi_B and Psi_B (one row per ring slot), the EMA chi_hat, and the step count t."""

    second_moments: np.ndarray  # (m, C)
    gradient_moments: np.ndarray  # (m, C)
    running_var: np.ndarray  # chi_hat, (C,)
    step: int = 0


def mabn_train(x, gamma, beta, state: MABNState, eps=1e-5, momentum=0.02, warmup_iters=100,
               renorm_iters=1000, r_max=5.0):  # fmt: skip
    """One training forward of MABN, Yan et al. 2020, §4 (Algorithm 1), as the authors' code
    schedules it; updates ``state`` in place. Per channel, t the 1-based step and m the window:

        chi_B   = 1/|B| sum x^2                           (§4.2: the second moment, no mean)
        chi_bar = 1/m sum_{s=0}^{m-1} chi_B(t - s)         (§4.1: SMA; chi_B alone while
                                                           t <= m or t < warmup_iters)
        r       = clip(sqrt(chi_bar + eps) / sqrt(chi_hat + eps), 1/r_max, r_max)
                                                          (§4.3: renormalization; 1 while
                                                           t <= max(renorm_iters, warmup_iters))
        z       = x / sqrt(chi_bar + eps),   y = gamma * r * z + beta
        chi_hat = (1 - momentum) * chi_hat + momentum * chi_bar      (EMA; for inference)

    Returns ``(y, cache)`` for :func:`mabn_backward`.
    """
    x = _f64(x)
    state.step += 1
    t, m = state.step, state.second_moments.shape[0]
    chi_b = (x**2).mean(axis=_batch_axes(x.ndim))
    state.second_moments[t % m] = chi_b
    batch_only = t <= m or t < warmup_iters
    chi_bar = chi_b if batch_only else state.second_moments.mean(axis=0)
    s = np.sqrt(chi_bar + eps)
    if t > max(renorm_iters, warmup_iters):
        r = np.clip(s / np.sqrt(state.running_var + eps), 1.0 / r_max, r_max)
    else:
        r = np.ones_like(s)
    state.running_var = (1 - momentum) * state.running_var + momentum * chi_bar
    z = x / _channel(s, x.ndim)
    y = _channel(_f64(gamma) * r, x.ndim) * z + _channel(beta, x.ndim)
    return y, {"z": z, "s": s, "r": r, "gamma": _f64(gamma), "batch_only": batch_only, "t": t}


def mabn_backward(dy, cache, state: MABNState):
    """MABN's backward (Yan et al. 2020, §4.1-4.2), updating Psi's window in ``state``:

        g       = dL/dy * gamma * r                     (dL/dz)
        Psi_B   = 1/|B| sum g * z,    Psi_bar = SMA of Psi_B (Psi_B alone while warming up)
        dL/dx   = (g - z * Psi_bar) / sqrt(chi_bar + eps)
        dL/dgamma = sum dL/dy * r * z,    dL/dbeta = sum dL/dy

    Returns ``(dx, dgamma, dbeta)``.
    """
    dy = _f64(dy)
    z, s, r, gamma = cache["z"], cache["s"], cache["r"], cache["gamma"]
    axes, ndim = _batch_axes(dy.ndim), dy.ndim
    g = dy * _channel(gamma * r, ndim)
    psi_b = (g * z).mean(axis=axes)
    m = state.gradient_moments.shape[0]
    state.gradient_moments[cache["t"] % m] = psi_b
    psi_bar = psi_b if cache["batch_only"] else state.gradient_moments.mean(axis=0)
    dx = (g - z * _channel(psi_bar, ndim)) / _channel(s, ndim)
    return dx, (dy * z).sum(axis=axes) * r, dy.sum(axis=axes)


def cross_iteration_statistics(means, nus, mean_grads, nu_grads, weights, weight_now):
    """Cross-Iteration BN, Yao et al. 2021, §3.2-3.3: k iterations' statistics, index 0 the
    current one, compensated to the current weights and pooled, per channel c:

        mu_{t-tau}(theta_t) = mu_{t-tau} + sum_j dmu_c/dtheta_cj (theta_t - theta_{t-tau})_cj   (§3.2)
        nu_{t-tau}(theta_t) = nu_{t-tau} + sum_j dnu_c/dtheta_cj (theta_t - theta_{t-tau})_cj
        mu_bar  = 1/k sum_tau mu_{t-tau}(theta_t)                                            (§3.3)
        nu_bar  = 1/k sum_tau max(nu_{t-tau}(theta_t), mu_{t-tau}(theta_t)^2)
        sigma2  = nu_bar - mu_bar^2

    ``means``, ``nus`` (k, C); ``mean_grads``, ``nu_grads``, ``weights`` (k, C, ...) (entry 0's
    are unused: no compensation for the current iteration); ``weight_now`` (C, ...). Returns
    ``(mu_bar, sigma2)``.
    """
    means, nus = _f64(means).copy(), _f64(nus).copy()
    change = _f64(weight_now)[None] - _f64(weights)
    for tau in range(1, means.shape[0]):
        means[tau] += (_f64(mean_grads[tau]) * change[tau]).reshape(means.shape[1], -1).sum(1)
        nus[tau] += (_f64(nu_grads[tau]) * change[tau]).reshape(nus.shape[1], -1).sum(1)
    mu_bar = means.mean(axis=0)
    nu_bar = np.maximum(nus, means**2).mean(axis=0)
    return mu_bar, nu_bar - mu_bar**2


def accumulated_running_average(running_mean, running_var, micro_batches, momentum):
    """What one training pass over the concatenated batch records (Ioffe & Szegedy 2015,
    Algorithm 2's exponential average in practice): :func:`running_average` of the micro-batches
    joined along N, one update, the variance of the whole batch unbiased by m/(m-1). The reference
    for ``nk.accumulate``. ``momentum=None`` is not handled here (the caller passes 1/(k+1))."""
    x = np.concatenate([_f64(b) for b in micro_batches], axis=0)
    return running_average(running_mean, running_var, x, momentum)

"""Small statistics for comparing runs over seeds: means with confidence intervals, t-tests.

Student's t intervals assume roughly normal per-seed results, which final accuracies over seeds
usually are; with few seeds the interval is wide, and the report says how many seeds it rests on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation and a two-sided Student-t confidence interval."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "low": math.nan, "high": math.nan}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def paired_difference(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> dict:
    """Paired t-test of mean(a - b) = 0 (pairs share a seed), with the difference's interval.

    Returns the mean difference, its confidence interval, the two-sided p-value and whether the
    difference is significant at ``alpha``. Also reports Welch's unpaired test for comparison.
    """
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(
            f"paired_difference needs two equal-length samples of >= 2, got {len(a)}, {len(b)}"
        )
    differences = [x - y for x, y in zip(a, b, strict=True)]
    interval = mean_ci(differences, 1 - alpha)
    if interval["std"] == 0:
        p_paired = 1.0 if interval["mean"] == 0 else 0.0
    else:
        p_paired = float(stats.ttest_rel(a, b).pvalue)
    p_welch = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    if math.isnan(p_welch):
        p_welch = 1.0
    return {
        "mean_difference": interval["mean"],
        "low": interval["low"],
        "high": interval["high"],
        "p_paired": p_paired,
        "p_welch": p_welch,
        "alpha": alpha,
        "significant": p_paired < alpha,
        "n": len(a),
    }


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """mean(a) − mean(b) with a Welch–Satterthwaite Student-t interval (unpaired samples)."""
    from scipy import stats

    n_a, n_b = len(a), len(b)
    mean_a, mean_b = sum(a) / n_a, sum(b) / n_b
    difference = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return {"n": min(n_a, n_b), "mean": difference, "low": math.nan, "high": math.nan}
    var_a = sum((v - mean_a) ** 2 for v in a) / (n_a - 1) / n_a
    var_b = sum((v - mean_b) ** 2 for v in b) / (n_b - 1) / n_b
    se = math.sqrt(var_a + var_b)
    if se == 0:
        return {"n": min(n_a, n_b), "mean": difference, "low": difference, "high": difference}
    df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    return {"n": min(n_a, n_b), "mean": difference, "low": difference - half, "high": difference + half}

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

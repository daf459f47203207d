"""Claims: the one verdict function, intervals over seeds (paired and not), the roll-up, and a
claim's summary entry, report row and check agreeing because they are one object."""

import math
from pathlib import Path

import pytest
from scipy import stats

from normkit.lab.claims import (
    INCONCLUSIVE,
    MIN_SEEDS,
    NOT_REPRODUCED,
    PARTLY,
    REPRODUCED,
    Claim,
    Published,
    above,
    arm_gap,
    below,
    card_row,
    check,
    difference,
    estimate,
    final,
    judge,
    per_seed,
    ratio,
    roll_up,
)
from normkit.lab.records import RunRecord
from normkit.lab.render import markdown_table
from normkit.lab.report import claims_card
from normkit.lab.results import Results
from normkit.lab.settings import Settings


def results(values: dict[str, list[float | None]], preset="full", diverged=()) -> Results:
    """A run whose arm ``a``'s seed ``k`` ended with ``score = values[a][k]``."""
    rows = []
    for arm, scores in values.items():
        for k, score in enumerate(scores):
            rows.append({"kind": "final", "trial": f"{arm}/seed={k}", "arm": arm, "phase": "main",
                         "replicate": k, "step": 10, "steps": 10, "train_loss": 0.1,
                         "diverged": (arm, k) in diverged, "score": score})  # fmt: skip
    record = RunRecord(Path("/nonexistent"), {"preset": preset, "settings": {}}, rows)
    return Results(record, Settings())


def t_interval(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


POSITIVE = above(0.0)


def claim(ours, criterion=POSITIVE, **kwargs) -> Claim:
    published = Published("b beats a", "Fig. 1")
    return Claim("c", "the score, b − a", published, ours, criterion, **kwargs)


DIFF = difference(final("score", arm="b"), final("score", arm="a"))


def test_a_paired_difference_is_judged_on_its_95_percent_interval():
    a, b = [0.50, 0.52, 0.49, 0.51], [0.60, 0.61, 0.60, 0.63]
    judged = claim(DIFF).judge(results({"a": a, "b": b}))
    mean, low, high = t_interval([y - x for x, y in zip(a, b, strict=True)])
    found = judged.estimate
    assert (found.mean, found.low, found.high, found.n) == pytest.approx((mean, low, high, 4))
    assert "paired" in found.method and low > 0
    assert judged.verdict == REPRODUCED and judged.reason == ""
    assert claim(DIFF, below(0.0)).judge(results({"a": a, "b": b})).verdict == NOT_REPRODUCED


def test_the_verdict_flips_to_inconclusive_when_the_interval_straddles_the_criterion():
    a = [0.50, 0.52, 0.49, 0.51]
    clear = results({"a": a, "b": [0.60, 0.61, 0.60, 0.63]})
    noisy = results({"a": a, "b": [0.60, 0.45, 0.58, 0.52]})  # same sign on average, wide interval
    assert claim(DIFF).judge(clear).verdict == REPRODUCED
    judged = claim(DIFF).judge(noisy)
    assert judged.estimate.mean > 0 and judged.estimate.low < 0 < judged.estimate.high
    assert judged.verdict == INCONCLUSIVE and judged.reason.startswith("interval straddles")


def test_too_few_seeds_is_inconclusive_however_clear_the_difference():
    few = results({"a": [0.1, 0.1], "b": [0.9, 0.9]})
    judged = claim(DIFF).judge(few)
    assert MIN_SEEDS == 3 and judged.verdict == INCONCLUSIVE
    assert judged.reason == "too few seeds (2 of the 3 needed)"
    # a seed whose trial diverged gives no value and does not count
    diverged = results({"a": [0.1, 0.1, 0.1], "b": [0.9, 0.9, 0.9]}, diverged={("b", 2)})
    judged = claim(DIFF).judge(diverged)
    assert judged.estimate.n == 2 and judged.estimate.missing == 1
    assert judged.reason == "too few seeds (2 of the 3 needed; 1 gave no value)"


def test_a_claim_that_needs_gpu_scale_says_so_off_the_gpu_preset():
    clear = {"a": [0.1, 0.1, 0.12], "b": [0.9, 0.91, 0.9]}
    gpu_claim = claim(DIFF, needs_gpu="ResNet-50 at 2 images per GPU; our CNN saturates")
    judged = gpu_claim.judge(results(clear, preset="quick"))
    assert judged.verdict == INCONCLUSIVE
    assert judged.reason.startswith("needs GPU scale: --preset gpu (ResNet-50")
    assert gpu_claim.judge(results(clear, preset="gpu")).verdict == REPRODUCED


def test_unpaired_comparisons_use_welch():
    a, b = [1.0, 1.2, 0.9, 1.1], [2.0, 2.5, 1.8]
    found = estimate(difference(final("score", arm="b"), final("score", arm="a"), paired=False),
                     results({"a": a, "b": b}))  # fmt: skip
    welch = stats.ttest_ind(b, a, equal_var=False)
    low, high = welch.confidence_interval(0.95)
    assert (found.mean, found.low, found.high) == pytest.approx((2.1 - 1.05, low, high))
    assert "Welch" in found.method and found.n == 3


def test_ratios_paired_per_seed():
    a, b = [2.0, 4.0, 5.0], [1.0, 1.0, 2.0]
    found = estimate(ratio(final("score", arm="b"), final("score", arm="a")), results({"a": a, "b": b}))
    assert found.values == {0: 0.5, 1: 0.25, 2: 0.4}
    # a ratio is judged on the log scale: the geometric mean and the exponentiated log interval
    mean, low, high = (math.exp(v) for v in t_interval([math.log(v) for v in (0.5, 0.25, 0.4)]))
    assert (found.mean, found.low, found.high) == pytest.approx((mean, low, high))
    assert "logs" in found.method


def test_a_skewed_ratio_has_a_positive_interval_and_a_verdict():
    # per seed BN / Standard of 1.6, 1.8, 6.8, 0.9, 21.5: the arithmetic t interval reaches below
    # zero (6.5 [−4.3, 17.3]); on the log scale it is 3.3 [0.66, 16.2]
    values = [1.6, 1.8, 6.8, 0.9, 21.5]

    def skewed(trials, _results):
        return trials[0].final["score"]

    arithmetic = per_seed(skewed, "a ratio read as a plain number", arm="a")
    logged = per_seed(skewed, "BN / Standard", ratio=True, arm="a")
    run = results({"a": values})
    assert estimate(arithmetic, run).low < 0
    found = estimate(logged, run)
    assert found.mean == pytest.approx(math.exp(sum(map(math.log, values)) / 5))
    assert 0.5 < found.low < found.mean < found.high
    assert Claim("r", "q", Published("t", "s"), logged, above(0.5)).judge(run).verdict == REPRODUCED
    assert Claim("r", "q", Published("t", "s"), arithmetic, above(0.5)).judge(run).verdict == INCONCLUSIVE
    # a ratio that is not positive in every seed stays arithmetic, and says so
    run = results({"a": [1.0, 2.0, -0.5]})
    assert "arithmetic" in estimate(logged, run).method


def test_per_seed_quantities_see_the_trials_of_one_seed():
    def spread(trials, _results):
        scores = [t.final["score"] for t in trials]
        return max(scores) - min(scores)

    quantity = per_seed(spread, "spread of the score over arms")
    found = estimate(quantity, results({"a": [1.0, 2.0, 3.0], "b": [1.5, 2.0, 5.0]}))
    assert found.values == {0: 0.5, 1: 0.0, 2: 2.0}


def test_summary_entry_report_row_and_check_are_one_object():
    judged = claim(DIFF, fmt=".3f").judge(results({"a": [0.5, 0.52, 0.49], "b": [0.6, 0.61, 0.6]}))
    entry = judged.entry()
    # the summary entry carries the declaration and ours
    assert entry["published"] == {"text": "b beats a", "source": "Fig. 1", "value": None,
                                  "unverified": False}  # fmt: skip
    assert entry["ours"]["mean"] == judged.estimate.mean and entry["verdict"] == judged.verdict
    # the report's row is read from that entry: same numbers, same verdict
    row = card_row(entry)
    mean, low, high = (format(v, ".3f") for v in (judged.estimate.mean, judged.estimate.low,
                                                  judged.estimate.high))  # fmt: skip
    assert row[2] == f"{mean} [{low}, {high}], 3 seeds"
    assert row[1] == "b beats a (Fig. 1)" and row[3].startswith(f"**{judged.verdict}**")
    assert "| " + " | ".join(row) + " |" in markdown_table(claims_card([entry]))
    # and so is its check
    assert check(entry).passed is True and check(entry).detail.startswith(row[2])
    # change the outcome: all three change with it
    failed = claim(DIFF, below(0.0), fmt=".3f").judge(
        results({"a": [0.5, 0.52, 0.49], "b": [0.6, 0.61, 0.6]})).entry()  # fmt: skip
    assert check(failed).passed is False and "**not reproduced**" in card_row(failed)[3]


def test_unverified_published_values_say_so():
    judged = Claim("c", "q", Published("≈0.98", "Fig. 1(a)", 0.98, unverified=True), DIFF,
                   above(0)).judge(results({"a": [1, 1, 1], "b": [2, 2, 2]}))  # fmt: skip
    entry = judged.entry()
    assert entry["published"]["unverified"] and card_row(entry)[1].endswith("— unverified")


def test_the_roll_up_says_partly_only_when_claims_differ():
    assert roll_up([REPRODUCED, REPRODUCED, None]) == REPRODUCED
    assert roll_up([INCONCLUSIVE, INCONCLUSIVE]) == INCONCLUSIVE
    assert roll_up([REPRODUCED, INCONCLUSIVE]) == PARTLY
    assert roll_up([REPRODUCED, NOT_REPRODUCED]) == PARTLY
    assert roll_up([None]) is None


def test_measured_quantities_have_no_verdict_and_claim_names_are_unique():
    judged = claim(final("score", arm="a"), None).judge(results({"a": [1.0, 2.0, 3.0]}))
    assert judged.verdict is None and card_row(judged.entry())[3] == "– (measured)"
    assert check(judged.entry()).passed is None
    with pytest.raises(ValueError, match="unique"):
        judge([claim(DIFF), claim(DIFF)], results({"a": [1.0], "b": [2.0]}))


def test_a_miss_on_a_reduced_preset_is_inconclusive_at_that_scale():
    """quick/tiny run fewer steps than the protocol: a miss there cannot refute the claim, a hit
    still counts, and the full and GPU presets judge a miss as before."""
    a, b = [0.50, 0.52, 0.49, 0.51], [0.60, 0.61, 0.60, 0.63]
    missed = claim(DIFF, below(0.0))
    for preset in ("quick", "tiny"):
        judged = missed.judge(results({"a": a, "b": b}, preset=preset))
        assert judged.verdict == INCONCLUSIVE
        assert judged.reason.startswith(f"at {preset} scale, where a miss does not refute the claim")
        assert claim(DIFF).judge(results({"a": a, "b": b}, preset=preset)).verdict == REPRODUCED
    for preset in ("full", "gpu"):
        assert missed.judge(results({"a": a, "b": b}, preset=preset)).verdict == NOT_REPRODUCED
    entry = missed.judge(results({"a": a, "b": b}, preset="quick")).entry()
    assert card_row(entry)[3].startswith("**inconclusive** at quick scale, where a miss")
    assert check(entry).passed is None


def test_a_verdict_without_a_criterion_quotes_none():
    # the guideline's rows are decided by the claims of other runs, not by a criterion of their own
    entry = {"quantity": "q", "published": {"text": "t", "source": "s"}, "criterion": None,
             "verdict": REPRODUCED, "reason": "", "ours": {"text": "3 of 3 tests reproduced"}}
    assert card_row(entry)[3] == f"**{REPRODUCED}**"


def test_arm_gap_is_the_paired_difference_of_two_arms_final_metric():
    values = results({"a": [0.50, 0.52, 0.49, 0.51], "b": [0.60, 0.61, 0.60, 0.63]})
    published = Published("b beats a", "Fig. 1")
    gap = arm_gap("c", "the score, b − a", published, "score", "b", "a", POSITIVE, ".3f")
    assert gap.judge(values).entry() == claim(DIFF, fmt=".3f").judge(values).entry()
    assert arm_gap("c", "q", Published("", ""), "score", "b", "a", None).fmt == "+.2f"


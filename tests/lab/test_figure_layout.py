"""The shared figures' step axes: tick labels that never touch (issue 22, item 13: Fig. 1(b, c))."""

from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from normkit.lab.figures import Curves, PercentileBands
from normkit.lab.records import RunRecord
from normkit.lab.results import Results
from normkit.lab.settings import Settings


def fig1_results(steps: int, every: int) -> Results:
    """A run shaped like ioffe2015-mnist's: two arms evaluated every ``every`` steps to ``steps``."""
    rows = []
    for arm in ("plain", "bn"):
        base = {"trial": f"{arm}/seed=0", "arm": arm, "phase": "main", "replicate": 0}
        rows += [{"kind": "eval", **base, "step": step, "p15": -1.0, "p50": 0.0, "p85": 1.0,
                  "test_accuracy": 0.5} for step in range(0, steps + 1, every)]  # fmt: skip
        rows.append({"kind": "final", **base, "step": steps, "steps": steps, "diverged": False,
                     "train_loss": 0.1})  # fmt: skip
    record = RunRecord(Path("/nonexistent"), {"preset": "full", "settings": {}}, rows)
    return Results(record, Settings(), {"plain": "baseline (no BN)", "bn": "with BN"})


def smallest_gap_in_em(figure) -> float:
    """The narrowest horizontal gap between neighbouring x tick labels, in units of their font size."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    gaps = []
    for axes in figure.axes:
        low, high = axes.get_xlim()
        labels = [t for t in axes.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high]
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda box: box.x0)
        em = labels[0].get_fontsize() * figure.dpi / 72
        gaps += [(right.x0 - left.x1) / em for left, right in zip(boxes, boxes[1:], strict=False)]
    return min(gaps)


# 20,000 steps is ioffe2015-mnist's quick preset, where Fig. 1(b, c)'s labels ran into each other
# (0.2 em apart); 50,000 its full protocol; 2M a GPU-scale run.
@pytest.mark.parametrize("steps, every", [(60, 20), (3_000, 100), (17_500, 250), (20_000, 250),
                                          (50_000, 250), (2_000_000, 10_000)])  # fmt: skip
def test_step_tick_labels_stay_an_em_apart(steps, every):
    results = fig1_results(steps, every)
    bands = PercentileBands("percentiles", "p15", "p50", "p85", "sigmoid input", "Fig. 1(b, c).",
                            titles={"plain": "(b) without BN", "bn": "(c) with BN"})  # fmt: skip
    curves = Curves("accuracy", "test_accuracy", "test accuracy", "Fig. 1(a).")
    for figure in (bands.draw(results), curves.draw(results)):
        assert smallest_gap_in_em(figure) >= 1.0
        labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
        assert all(len(label) <= 5 for label in labels), labels  # "20k", not "20000"

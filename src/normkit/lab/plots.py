"""LEGACY (delete with normkit.lab.legacy): metric curves over training steps for legacy experiments;
ported experiments use normkit.lab.figures.Curves."""

from __future__ import annotations

from normkit.lab.records import RunRecord
from normkit.lab.render import new_figure


def curves(
    record: RunRecord,
    series: list[tuple[str, str]],
    metric: str,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
    logy: bool = False,
):
    """One line per ``(trial key, legend label)`` of ``metric`` against the training step."""
    figure = new_figure()
    axes = figure.add_subplot()
    for key, label in series:
        rows = [r for r in record.curve(key) if r.get(metric) is not None]
        axes.plot([r["step"] for r in rows], [r[metric] for r in rows], label=label)
        if rows and any(
            r["trial"] == key and r["kind"] == "final" and r["diverged"] for r in record.rows
        ):
            axes.plot([rows[-1]["step"]], [rows[-1][metric]], "kx")
    axes.set_xlabel("training step (mini-batches)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if ylim is not None:
        axes.set_ylim(*ylim)
    if logy:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure

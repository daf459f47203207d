"""The lab's shared figure types, drawn from a run's :class:`~normkit.lab.results.Results`.

Every figure aggregates over seeds the same way: a line is the mean over seeds; a band around a
curve spans the seeds (min to max); an error bar on a final value is the 95% Student-t interval,
as in the claims card. Arms keep one colour across a report (their order in the plan), axes carry
labels with units, and the caption says what the band and bars are.

- :class:`Curves`: a metric against the training step, one line per arm (or per metric of an arm);
- :class:`VersusSetting`: a final metric against a grid setting, with the published points;
- :class:`Bars`: a final metric per arm (or per value of a parameter), or per layer, with every
  seed's value as a dot;
- :class:`PercentileBands`: percentiles of a quantity over training, one panel per arm;
- :class:`Heatmap`: a final metric over two parameters (e.g. normalizer × batch size);
- :class:`MeanTable`: the same as a table (mean [95% CI]).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from normkit.lab.render import Figure, Table, fmt, new_figure
from normkit.lab.results import Results, TrialResult
from normkit.lab.stats import mean_ci

STEP_LABEL = "training step (mini-batches)"
MARKERS = "os^vDP*Xh<>p"


def _steps(value: float, _position=None) -> str:
    """A step count for a tick label: 20000 → "20k", 2500000 → "2.5M"."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _step_axis(axes) -> None:
    """Label the x axis as training steps, with at most 6 short tick labels that never touch."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True, min_n_ticks=3))
    axes.xaxis.set_major_formatter(FuncFormatter(_steps))
    axes.set_xlabel(STEP_LABEL)


def _colour(results: Results, arm: str) -> str:
    names = list(results.labels) or results.values("arm")
    index = names.index(arm) if arm in names else len(names)
    return f"C{index % 10}"


def _arms(results: Results, arms: Sequence[str] | None, where: dict) -> list[str]:
    present = results.values("arm", **where)
    return [a for a in (arms or list(results.labels) or present) if a in present]


def _metrics(metric: str | dict[str, str]) -> dict[str, str]:
    return {metric: metric} if isinstance(metric, str) else dict(metric)


def _finals(trials: list[TrialResult], metric: str) -> list[float]:
    return [t.final[metric] for t in trials if t.final.get(metric) is not None and not t.final["diverged"]]


def _aligned(trials: list[TrialResult], metric: str, from_step: int = 0) -> tuple[list, list]:
    """The steps every trial evaluated ``metric`` at (from ``from_step``), and per step the seeds'
    values."""
    series = [dict(zip(*t.series(metric), strict=True)) for t in trials]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    steps = [step for step in steps if step >= from_step]
    return steps, [[seed[step] for seed in series] for step in steps]


def _interval(values: list[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    stat = mean_ci(values)
    if stat["n"] < 2:
        return stat["mean"], stat["mean"], stat["mean"]
    return stat["mean"], stat["low"], stat["high"]


class FigureSpec:
    """A figure (or table) of a report: ``name`` is the PNG's file stem, ``caption`` its caption."""

    name: str
    caption: str

    def block(self, results: Results) -> Figure | Table:
        return Figure(self.name, self.draw(results), self.caption + self.note(results))

    def draw(self, results: Results):
        raise NotImplementedError

    def note(self, results: Results) -> str:
        return ""


def _seed_note(results: Results, what: str) -> str:
    seeds = len({t.replicate for t in results.trials()})
    if seeds < 2:
        return " One seed."
    return f" Mean over {seeds} seeds; {what}."


@dataclass(frozen=True)
class Curves(FigureSpec):
    """``metric`` against the step: a line per arm, or with ``metric={label: name}`` a line per
    metric of each arm; the band spans the seeds. A diverged trial ends in a black cross."""

    name: str
    metric: str | dict[str, str]
    ylabel: str
    caption: str
    arms: Sequence[str] | None = None
    where: dict = field(default_factory=dict)
    title: str = ""
    logy: bool = False
    ylim: tuple[float, float] | None = None
    from_step: int = 0
    logx: bool = False  # e.g. a random walk's log(updates) growth as a straight line

    def draw(self, results):
        figure = new_figure()
        axes = figure.add_subplot()
        metrics = _metrics(self.metric)
        for arm in _arms(results, self.arms, self.where):
            trials = results.trials(arm=arm, **self.where)
            for index, (label, metric) in enumerate(metrics.items()):
                steps, columns = _aligned(trials, metric, self.from_step)
                if not steps:
                    continue
                name = results.label(arm) if len(metrics) == 1 else f"{label} ({results.label(arm)})"
                colour = _colour(results, arm) if len(metrics) == 1 else f"C{index % 10}"
                axes.plot(steps, [statistics.fmean(c) for c in columns], color=colour, label=name)
                if len(trials) > 1:
                    axes.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns],
                                      color=colour, alpha=0.2, linewidth=0)  # fmt: skip
                for trial in trials:
                    if trial.final["diverged"] and trial.series(metric)[0]:
                        axes.plot(*(v[-1:] for v in trial.series(metric)), "kx")
        if self.logx:
            axes.set_xscale("log")
            axes.set_xlabel(STEP_LABEL + " (log scale)")
        else:
            _step_axis(axes)
        axes.set_ylabel(self.ylabel)
        if self.title:
            axes.set_title(self.title, fontsize="medium")
        if self.ylim is not None:
            axes.set_ylim(*self.ylim)
        if self.logy:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        return figure

    def note(self, results):
        return _seed_note(results, "the band spans the seeds (min to max)")


@dataclass(frozen=True)
class VersusSetting(FigureSpec):
    """A final ``metric`` against the grid setting ``setting``, a line per arm (or per metric of
    each arm), error bars the 95% interval; ``published`` ({label: [(x, y), ...]}) is drawn in a
    second panel with the same axes' style."""

    name: str
    metric: str | dict[str, str]
    setting: str
    xlabel: str
    ylabel: str
    caption: str
    published: dict[str, list[tuple[float, float]]] | None = None
    published_title: str = ""
    title: str = "ours"
    arms: Sequence[str] | None = None
    where: dict = field(default_factory=dict)
    log_x: bool = True
    dashed: Sequence[str] = ()

    def draw(self, results):
        panels = 2 if self.published else 1
        figure = new_figure(5.2 * panels + 0.6, 4.0)
        axes = figure.add_subplot(1, panels, 1)
        metrics = _metrics(self.metric)
        ticks: set = set()
        for arm in _arms(results, self.arms, self.where):
            for index, (label, metric) in enumerate(metrics.items()):
                points = []
                for x in results.values(self.setting, arm=arm, **self.where):
                    trials = results.trials(arm=arm, **{self.setting: x}, **self.where)
                    found = _interval(_finals(trials, metric))
                    if found is not None:
                        points.append((x, *found))
                if not points:
                    continue
                points.sort()
                xs = [p[0] for p in points]
                ticks |= set(xs)
                name = results.label(arm) if len(metrics) == 1 else f"{label} ({results.label(arm)})"
                colour = _colour(results, arm) if len(metrics) == 1 else f"C{index % 10}"
                axes.errorbar(
                    xs,
                    [p[1] for p in points],
                    yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]],
                    marker=MARKERS[index % len(MARKERS)] if len(metrics) > 1 else "o",
                    color=colour,
                    linestyle="--" if arm in self.dashed else "-",
                    capsize=3,
                    label=name,
                )
        self._style(axes, ticks, self.title)
        if self.published:
            other = figure.add_subplot(1, panels, 2)
            ticks = set()
            for index, (label, points) in enumerate(self.published.items()):
                points = sorted(points)
                ticks |= {x for x, _ in points}
                arm = next((a for a in results.labels if results.label(a) == label), None)
                colour = _colour(results, arm) if arm else f"C{(len(results.labels) + index) % 10}"
                other.plot([x for x, _ in points], [y for _, y in points], marker="s",
                           color=colour, label=label)  # fmt: skip
            self._style(other, ticks, self.published_title)
        return figure

    def _style(self, axes, ticks, title):
        if self.log_x:
            axes.set_xscale("log", base=2)
        if ticks:
            axes.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
            axes.minorticks_off()
        axes.set_xlabel(self.xlabel + (" (log scale)" if self.log_x else ""))
        axes.set_ylabel(self.ylabel)
        axes.set_title(title, fontsize="medium")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")

    def note(self, results):
        return _seed_note(results, "error bars are 95% intervals")


@dataclass(frozen=True)
class Bars(FigureSpec):
    """A final ``metric`` per group (mean, 95% interval, each seed a dot); groups are the values of
    the parameter ``by`` (the arms by default). With ``per_layer`` the metric is a ``{layer: value}``
    dict and the bars stand per layer, one colour per group."""

    name: str
    metric: str
    ylabel: str
    caption: str
    by: str = "arm"
    where: dict = field(default_factory=dict)
    per_layer: bool = False

    def _groups(self, results):
        if self.by == "arm":
            return [(a, results.label(a), _colour(results, a)) for a in _arms(results, None, self.where)]
        values = sorted(results.values(self.by, **self.where))
        return [(v, f"{self.by} = {v}", f"C{i % 10}") for i, v in enumerate(values)]

    def draw(self, results):
        groups = self._groups(results)
        figure = new_figure(max(4.0, 1.2 * len(groups) + 2.5), 3.8)
        axes = figure.add_subplot()
        if not self.per_layer:
            for x, (value, _, colour) in enumerate(groups):
                self._bar(axes, x, 0.6, _finals(results.trials(**{self.by: value}, **self.where),
                                                self.metric), colour)  # fmt: skip
            axes.set_xticks(range(len(groups)), [label for _, label, _ in groups])
        else:
            layers: list[str] = []
            for trial in results.trials(**self.where):
                layers += [k for k in trial.final.get(self.metric) or {} if k not in layers]
            width = 0.8 / max(1, len(groups))
            for i, (value, label, colour) in enumerate(groups):
                trials = results.trials(**{self.by: value}, **self.where)
                for x, layer in enumerate(layers):
                    found = [t.final[self.metric][layer] for t in trials
                             if (t.final.get(self.metric) or {}).get(layer) is not None]  # fmt: skip
                    self._bar(axes, x + (i - (len(groups) - 1) / 2) * width, width, found, colour,
                              label if x == 0 else None)  # fmt: skip
            axes.set_xticks(range(len(layers)), layers)
            axes.set_xlabel("layer")
            if layers:  # no trial recorded the metric: an empty panel, no legend to draw
                axes.legend(fontsize="small")
        axes.set_ylabel(self.ylabel)
        axes.grid(axis="y", alpha=0.3)
        return figure

    @staticmethod
    def _bar(axes, x, width, values, colour, label=None):
        found = _interval(values)
        if found is None:
            return
        mean, low, high = found
        axes.bar([x], [mean], width, color=colour, alpha=0.45, label=label)
        axes.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], color="black", capsize=4)
        axes.plot([x] * len(values), values, "o", color=colour, markersize=4)

    def note(self, results):
        return _seed_note(results, "bars are means, error bars 95% intervals, dots single seeds")


@dataclass(frozen=True)
class PercentileBands(FigureSpec):
    """Percentiles (``low``, ``mid``, ``high`` metrics) of a quantity over training, a panel per
    arm, each the mean over seeds; the band runs from ``low`` to ``high``."""

    name: str
    low: str
    mid: str
    high: str
    ylabel: str
    caption: str
    arms: Sequence[str] | None = None
    where: dict = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)

    def draw(self, results):
        arms = _arms(results, self.arms, self.where)
        figure = new_figure(4.5 * len(arms) + 0.5, 3.6)
        panels = figure.subplots(1, len(arms), sharey=True, squeeze=False)[0]
        for axes, arm in zip(panels, arms, strict=True):
            trials = results.trials(arm=arm, **self.where)
            curves = {}
            for metric in (self.low, self.mid, self.high):
                steps, columns = _aligned(trials, metric)
                curves[metric] = (steps, [statistics.fmean(c) for c in columns])
            colour = _colour(results, arm)
            steps, low = curves[self.low]
            axes.fill_between(steps, low, curves[self.high][1], color=colour, alpha=0.25,
                              label=f"{self.low} to {self.high}")  # fmt: skip
            axes.plot(*curves[self.mid], color=colour, label=self.mid)
            axes.set_title(self.titles.get(arm, results.label(arm)), fontsize="medium")
            _step_axis(axes)
            axes.grid(alpha=0.3)
        panels[0].set_ylabel(self.ylabel)
        panels[0].legend(fontsize="small")
        return figure

    def note(self, results):
        return _seed_note(results, "each percentile is averaged over the seeds")


@dataclass(frozen=True)
class Heatmap(FigureSpec):
    """The mean final ``metric`` over the parameters ``x`` and ``y`` (``y="arm"``: one row per
    arm), each cell annotated."""

    name: str
    metric: str
    x: str
    xlabel: str
    label: str
    caption: str
    y: str = "arm"
    where: dict = field(default_factory=dict)

    def draw(self, results):
        rows = results.values(self.y, **self.where)
        if self.y == "arm":
            rows = _arms(results, None, self.where)
        columns = sorted(results.values(self.x, **self.where))
        grid = [[_interval(_finals(results.trials(**{self.y: r, self.x: c}, **self.where), self.metric))
                 for c in columns] for r in rows]  # fmt: skip
        values = [[cell[0] if cell else float("nan") for cell in row] for row in grid]
        figure = new_figure(1.1 * len(columns) + 3.0, 0.5 * len(rows) + 1.8)
        axes = figure.add_subplot()
        image = axes.imshow(values, aspect="auto", cmap="viridis")
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if value == value:
                    axes.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize="small",
                              color="white")  # fmt: skip
        axes.set_xticks(range(len(columns)), [f"{c:g}" if isinstance(c, (int, float)) else str(c)
                                              for c in columns])  # fmt: skip
        labels = [results.label(r) if self.y == "arm" else str(r) for r in rows]
        axes.set_yticks(range(len(rows)), labels)
        axes.set_xlabel(self.xlabel)
        figure.colorbar(image, ax=axes, label=self.label)
        return figure

    def note(self, results):
        return _seed_note(results, "each cell is the mean")


@dataclass(frozen=True)
class MeanTable(FigureSpec):
    """A final ``metric`` as a table: a row per arm, a column per value of ``x``; mean [95% CI]."""

    name: str
    metric: str
    x: str
    caption: str
    spec: str = ".2f"
    where: dict = field(default_factory=dict)

    def block(self, results):
        columns = sorted(results.values(self.x, **self.where))
        rows = []
        for arm in _arms(results, None, self.where):
            cells = []
            for column in columns:
                trials = results.trials(arm=arm, **{self.x: column}, **self.where)
                found = _interval(_finals(trials, self.metric))
                diverged = sum(t.final["diverged"] for t in trials)
                text = "–" if found is None else fmt(found[0], self.spec)
                if found is not None and found[1] != found[2]:
                    text += f" [{fmt(found[1], self.spec)}, {fmt(found[2], self.spec)}]"
                cells.append(text + (f" ({diverged} diverged)" if diverged else ""))
            rows.append([results.label(arm), *cells])
        return Table(["", *[f"{self.x} = {c}" for c in columns]], rows, self.caption)

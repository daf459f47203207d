"""One progress display for a run, whatever runs its trials: the steps done over all trials, a line
per trial in flight, and an ETA.

On a terminal it is a rich display; elsewhere (a CI log, ``nohup``, a pipe) it prints one plain
line when a trial finishes and at most every 30 s otherwise. Updated when a segment returns, so it
adds nothing to a training step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

PLAIN_EVERY_S = 30.0


class TrainingProgress:
    """Context manager; ``mode`` is ``"rich"``, ``"plain"`` or ``"off"``."""

    def __init__(self, mode: str, title: str, echo: Callable[[str], None] | None = None):
        self.mode, self.title = mode, title
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self._progress = None
        self._total_task = None
        self._tasks: dict[str, object] = {}
        self.total = self.done = 0
        self.trials_total = self.trials_done = 0
        self._started = time.monotonic()
        self._done_at_start: int | None = None
        self._last_line = 0.0

    def __enter__(self) -> TrainingProgress:
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._progress.start()
            self._total_task = self._progress.add_task(f"[bold]{self.title}[/]", total=None)
        return self

    def plan(self, total: int, done: int, trials: int, trials_done: int) -> None:
        """The run's steps and trials as now planned (a sweep adds the main trials), and done."""
        self.total, self.done = total, done
        self.trials_total, self.trials_done = trials, trials_done
        if self._done_at_start is None:
            self._done_at_start = done
        if self._progress is not None:
            description = f"[bold]{self.title}[/] {trials_done}/{trials} trials"
            self._progress.update(self._total_task, total=total, completed=done, description=description)

    def trial(self, key: str, step: int, steps: int, finished: bool) -> None:
        """A trial reached ``step`` of ``steps`` (``finished``: it is done)."""
        if self._progress is not None:
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task(f"  {key}", total=steps)
            self._progress.update(self._tasks[key], completed=step)
            if finished:
                self._progress.remove_task(self._tasks.pop(key))
        elif self.mode == "plain":
            now = time.monotonic()
            if finished or now - self._last_line >= PLAIN_EVERY_S:
                self._last_line = now
                what = f"finished {key}" if finished else f"{key} at step {step}/{steps}"
                self.echo(f"[{self.title}] {what}; {self.trials_done}/{self.trials_total} trials, "
                          f"{self.done}/{self.total} steps{self._eta()}")  # fmt: skip

    def _eta(self) -> str:
        done = self.done - (self._done_at_start or 0)
        if done <= 0 or self.total <= self.done:
            return ""
        seconds = (time.monotonic() - self._started) / done * (self.total - self.done)
        return f", ETA {int(seconds // 60)}:{int(seconds % 60):02d}"

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

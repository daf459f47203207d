"""A progress bar for lab runs: training steps done over all trials, the trial running, and an ETA.

Updated at evaluation steps only, so it adds nothing to the training step itself.
"""

from __future__ import annotations


class TrainingProgress:
    """Context manager around a rich progress bar; does nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, title: str):
        self.enabled, self.title = enabled, title
        self._progress = None
        self._task = None

    def __enter__(self) -> TrainingProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.fields[title]}[/] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=None, title=self.title)
        return self

    def plan(self, total: int, done: int) -> None:
        """The number of steps in the run as now planned, and how many are done."""
        if self._progress is not None:
            self._progress.update(self._task, total=total, completed=done)

    def advance(self, steps: int, trial: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, description=trial)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

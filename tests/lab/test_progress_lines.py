"""Progress when the output is not a terminal (CI logs, nohup, pipes): one plain line per finished
trial, and otherwise at most one line per 30 s, each with the steps done and an ETA."""

from normkit.lab import progress
from normkit.lab.progress import PLAIN_EVERY_S, TrainingProgress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_plain_lines_per_finished_trial_and_per_30_seconds(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    lines: list[str] = []
    with TrainingProgress("plain", "exp", echo=lines.append) as display:
        display.plan(total=400, done=0, trials=2, trials_done=0)
        for step in range(10, 201, 10):  # trial a: 200 steps, 2 s per 10 steps
            clock.now += 2.0
            display.plan(400, step, 2, 0)
            display.trial("a", step, 200, finished=step == 200)
    assert PLAIN_EVERY_S == 30.0
    # the first update prints (nothing printed yet), then one at 30 s, then the finished trial
    assert lines == [
        "[exp] a at step 10/200; 0/2 trials, 10/400 steps, ETA 1:18",
        "[exp] a at step 160/200; 0/2 trials, 160/400 steps, ETA 0:48",
        "[exp] finished a; 0/2 trials, 200/400 steps, ETA 0:40",
    ]


def test_off_prints_nothing(monkeypatch):
    lines: list[str] = []
    with TrainingProgress("off", "exp", echo=lines.append) as display:
        display.plan(10, 10, 1, 1)
        display.trial("a", 10, 10, finished=True)
    assert lines == []

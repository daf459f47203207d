"""Faults docs/reliability.md promises to survive that no other test covers: a checkpoint deleted
between a kill and the resume, and a folder that turns read-only mid-run."""


import pytest
from test_runner import rows_and_results

from normkit.lab import run_experiment
from normkit.lab.records import CHECKPOINTS

TINY = {"dataset": "digits"}


def interrupted_run(tmp_path, monkeypatch, out):
    """placement's tiny run stopped in its second trial, after a checkpoint of it was written."""
    from normkit.lab.experiments.placement import Placement

    original, calls = Placement.measure, {"n": 0}

    def failing_measure(self, *args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Placement, "measure", failing_measure)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("placement", "tiny", TINY, out=out, checkpoint_every_s=0, write_report=False)
    monkeypatch.setattr(Placement, "measure", original)


def test_a_deleted_checkpoint_restarts_its_trial_and_keeps_the_finished_ones(tmp_path, monkeypatch):
    whole = run_experiment("placement", "tiny", TINY, out=tmp_path / "whole", write_report=False)
    cut = tmp_path / "cut"
    interrupted_run(tmp_path, monkeypatch, cut)
    (checkpoint,) = (cut / CHECKPOINTS).glob("*.pt")
    checkpoint.unlink()
    run_experiment("placement", out=cut, resume=True, write_report=False)
    assert rows_and_results(cut) == rows_and_results(whole.directory)


class RunsCode:
    """What a hostile checkpoint holds: unpickling it would open (create) ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_that_would_run_code_is_never_unpickled(tmp_path, monkeypatch):
    import torch

    whole = run_experiment("placement", "tiny", TINY, out=tmp_path / "whole", write_report=False)
    cut = tmp_path / "cut"
    interrupted_run(tmp_path, monkeypatch, cut)
    (checkpoint,) = (cut / CHECKPOINTS).glob("*.pt")
    marker = tmp_path / "code-ran"
    torch.save({"trial": checkpoint.stem, "state": RunsCode(marker)}, checkpoint)
    notes = []
    run_experiment("placement", out=cut, resume=True, write_report=False, echo=notes.append)
    assert not marker.exists()
    assert any(str(checkpoint) in n and "restarts from the beginning" in n for n in notes)
    assert rows_and_results(cut) == rows_and_results(whole.directory)

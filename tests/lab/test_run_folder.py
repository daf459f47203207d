"""The run folder is the user's data: one writer under a lock, --overwrite deletes only a normkit
run's own files, and damaged or foreign files give one line naming the file and the fix."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
from test_runner import rows_and_results

from normkit.lab import RunRecord, run_experiment
from normkit.lab.records import CHECKPOINTS, LOCK, METRICS, RunFolderError, find_run
from normkit.lab.runfolder import RunFolder

TINY = {"dataset": "digits"}


def hold_lock(folder):
    """A process that takes the folder's lock and sleeps (a run in progress)."""
    code = (
        "import time; from pathlib import Path; from normkit.lab.runfolder import RunFolder; "
        f"RunFolder(Path({str(folder)!r})).lock(); print('locked', flush=True); time.sleep(120)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"locked"
    return process


def test_one_writer_per_folder_and_a_killed_writers_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    run_experiment("placement", "tiny", TINY, out=out, write_report=False)
    holder = hold_lock(out)
    try:
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}") as caught:
            run_experiment("placement", out=out, resume=True)
        assert "\n" not in str(caught.value)
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
            run_experiment("placement", "tiny", TINY, out=out, overwrite=True)
        assert RunRecord.load(out).complete  # the refused overwrite deleted nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / LOCK).exists()  # the dead holder's lock file stays; its lock died with it
    assert run_experiment("placement", out=out, resume=True).complete


def test_a_second_run_in_the_same_process_is_refused_too(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.lock()
    try:
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
            run_experiment("placement", "tiny", TINY, out=tmp_path / "run")
    finally:
        folder.unlock()


def test_overwrite_refuses_a_folder_that_is_not_a_normkit_run(tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "src").mkdir(parents=True)
    (thesis / "config.json").write_text('{"title": "my thesis", "settings": {}}')
    (thesis / "thesis.tex").write_text("\\documentclass{book}")
    (thesis / "src" / "main.py").write_text("print(1)")
    before = sorted(p.relative_to(thesis) for p in thesis.rglob("*"))
    for kwargs in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(RunFolderError, match="not written by normkit's lab") as caught:
            run_experiment("placement", "tiny" if "overwrite" in kwargs else None,
                           TINY if "overwrite" in kwargs else None, out=thesis, **kwargs)  # fmt: skip
        assert "nothing was changed" in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.relative_to(thesis) for p in thesis.rglob("*")) == before


def test_overwrite_deletes_only_the_runs_own_files_and_follows_no_link(tmp_path):
    out = tmp_path / "run"
    run_experiment("placement", "tiny", TINY, out=out)
    (out / "notes.txt").write_text("the user's")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"png")
    (elsewhere / "summary.json").write_text("{}")
    for png in (out / "figures").glob("*.png"):
        png.unlink()
    (out / "figures").rmdir()
    (out / "figures").symlink_to(elsewhere)  # a link out of the folder
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(elsewhere / "summary.json")
    run_experiment("placement", "tiny", {**TINY, "steps": "6"}, out=out, overwrite=True)
    assert (out / "notes.txt").read_text() == "the user's"
    assert (elsewhere / "keep.png").read_bytes() == b"png"
    assert (elsewhere / "summary.json").read_text() == "{}"
    assert RunRecord.load(out).settings["steps"] == 6


def test_an_unreadable_checkpoint_restarts_its_trial(tmp_path, monkeypatch):
    whole = run_experiment("placement", "tiny", TINY, out=tmp_path / "whole", write_report=False)
    from normkit.lab.experiments.placement import Placement

    original, calls = Placement.measure, {"n": 0}

    def failing_measure(self, *args):
        calls["n"] += 1
        if calls["n"] == 6:  # the second trial at step 12, after its segment to step 6
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Placement, "measure", failing_measure)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_experiment("placement", "tiny", TINY, out=cut, checkpoint_every_s=0, write_report=False)
    monkeypatch.setattr(Placement, "measure", original)
    (checkpoint,) = (cut / CHECKPOINTS).glob("*.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated
    notes = []
    run_experiment("placement", out=cut, resume=True, write_report=False, echo=notes.append)
    assert any(str(checkpoint) in n and "restarts from the beginning" in n for n in notes)
    assert rows_and_results(cut) == rows_and_results(whole.directory)


def test_damaged_config_and_summary_name_the_file_and_the_fix(tmp_path):
    out = tmp_path / "run"
    run_experiment("placement", "tiny", TINY, out=out, write_report=False)
    summary = out / "summary.json"
    summary.write_text('{"complete": tr')
    with pytest.raises(RunFolderError, match="summary.json is damaged") as caught:
        RunRecord.load(out)
    assert "--resume" in str(caught.value) and "\n" not in str(caught.value)
    summary.unlink()
    assert run_experiment("placement", out=out, resume=True, write_report=False).complete
    (out / "config.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="config.json is damaged"):
        run_experiment("placement", out=out, resume=True)
    with pytest.raises(RunFolderError, match="config.json is damaged"):
        RunRecord.load(out)


@pytest.mark.parametrize(
    "error, message",
    [
        (errno.ENOSPC, "no space left on the device while writing"),
        # a file system remounted read-only; simulated because the tests may run as root, whom
        # chmod does not stop
        (errno.EROFS, "cannot write .*make the folder writable"),
    ],
    ids=["full_disk", "read_only"],
)
def test_a_failing_write_gives_one_line_and_resume_finishes_the_run(tmp_path, monkeypatch, error,
                                                                    message):  # fmt: skip
    out = tmp_path / "run"
    real_fsync, calls = os.fsync, {"n": 0}

    def failing(fd):  # the 4th fsync fails, mid-run
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(error, os.strerror(error))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(RunFolderError, match=message) as caught:
        run_experiment("placement", "tiny", TINY, out=out, checkpoint_every_s=0, write_report=False)
    assert "--resume" in str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setattr(os, "fsync", real_fsync)
    whole = run_experiment("placement", "tiny", TINY, out=tmp_path / "whole", write_report=False)
    run_experiment("placement", out=out, resume=True, write_report=False)
    assert rows_and_results(out) == rows_and_results(whole.directory)


def test_the_cli_says_one_line_for_an_unknown_experiment():
    result = subprocess.run([sys.executable, "-m", "normkit.cli.main", "lab", "run", "None"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    first, *rest = result.stderr.strip().splitlines()
    assert first.startswith("error: no experiment named 'None'") and "normkit lab list" in first
    assert "Traceback" not in result.stderr and len(rest) <= 1  # the NORMKIT_DEBUG hint


def test_metrics_rows_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    """Rows a killed parent appended without their checkpoint (or torn) are not kept."""
    out = tmp_path / "run"
    whole = run_experiment("placement", "tiny", TINY, out=tmp_path / "whole", write_report=False)
    run_experiment("placement", "tiny", TINY, out=out, write_report=False)
    rows = RunRecord.load(out).rows
    first_final = next(i for i, r in enumerate(rows) if r["kind"] == "final")
    kept = rows[: first_final + 1]
    extra = [dict(rows[first_final + 1], step=999)]  # a row of the next trial, never committed
    text = "".join(json.dumps(r) + "\n" for r in kept + extra) + '{"kind": "ev'
    (out / METRICS).write_text(text)
    (out / "summary.json").unlink()
    run_experiment("placement", out=out, resume=True, write_report=False)
    assert rows_and_results(out) == rows_and_results(whole.directory)


def test_find_run_takes_the_named_folder_or_the_first_finished_run_of_the_experiment(tmp_path):
    def run(name, experiment, complete=True):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"experiment": experiment}))
        (tmp_path / name / "summary.json").write_text(json.dumps({"complete": complete}))

    run("b-unfinished", "renorm", complete=False)
    run("c", "renorm")
    run("d", "renorm")
    (tmp_path / "a-damaged").mkdir()
    (tmp_path / "a-damaged" / "config.json").write_text("{")
    assert find_run(tmp_path, "renorm").directory == tmp_path / "c"
    assert find_run(tmp_path, "ghost-bn") is None
    run("ghost-bn", "ghost-bn")
    assert find_run(tmp_path, "ghost-bn").directory == tmp_path / "ghost-bn"
    assert find_run(tmp_path / "missing", "renorm") is None

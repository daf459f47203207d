"""Trials in parallel: --workers N and a Dask cluster give the same bytes as --workers 1, resume
stays exact after a SIGKILL of the parent or of a worker, and the threads and device are recorded."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from test_runner import KILLABLE, lines, rows_and_results, start_run

from normkit.errors import ConfigError
from normkit.lab import run_experiment
from normkit.lab.records import METRICS

TINY = {"dataset": "digits"}


def same_run(a: Path, b: Path) -> None:
    """Byte-identical rows (plan order) and the same summary, timing aside."""
    assert (a / METRICS).read_bytes() == (b / METRICS).read_bytes()
    assert rows_and_results(a)[1] == rows_and_results(b)[1]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The reference runs, one worker in this process, one torch thread."""
    root = tmp_path_factory.mktemp("serial")
    os.environ["NORMKIT_THREADS"] = "1"
    try:
        for name in ("placement", "batch-size"):
            run_experiment(name, "tiny", TINY, out=root / name, write_report=False)
    finally:
        del os.environ["NORMKIT_THREADS"]
    return root


@pytest.mark.parametrize("name", ["placement", "batch-size"])
def test_workers_give_the_same_bytes_as_one_worker(serial, tmp_path, name):
    """batch-size includes a SyncBN trial whose worker process starts its own gloo ranks."""
    out = tmp_path / name
    record = run_experiment(name, "tiny", TINY, out=out, workers=2, checkpoint_every_s=0,
                            write_report=False)  # fmt: skip
    same_run(out, serial / name)
    execution = record.config["execution"]
    assert execution["workers"] == 2 and execution["executor"] == "processes"
    assert execution["threads"] == 1 and execution["threads_rule"] == "NORMKIT_THREADS=1"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_resume_with_workers_after_sigkill_of_the_parent(tmp_path):
    """Kill the parent (its workers then end by themselves), resume, twice; same bytes."""
    shorter = {**KILLABLE, "steps": "200"}
    whole = run_experiment("ioffe2015-mnist", "tiny", shorter, out=tmp_path / "whole",
                           write_report=False)  # fmt: skip
    out, kills, resume, orphans = tmp_path / "killed", 0, False, []
    for fraction in (0.15, 0.6):
        process = start_run(out, resume, workers=2, overrides=shorter)
        while lines(out / METRICS) < fraction * len(whole.rows) and process.poll() is None:
            time.sleep(0.005)
        if process.poll() is None:
            orphans += _workers_of(process.pid)
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait(timeout=240)
        resume = True
    assert kills == 2 and orphans, "the run finished before it could be killed"
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in orphans if _alive(pid)], "workers outlived the parent"
    final = start_run(out, resume=True, workers=2)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()
    same_run(out, tmp_path / "whole")


def _children(pid: int) -> list[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return [int(c) for task in tasks for c in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []


def _workers_of(pid: int) -> list[int]:
    """The run's worker processes: the children of its forkserver (or, with spawn, its children
    started by spawn_main), not multiprocessing's resource tracker."""
    found = []
    for child in _children(pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"forkserver" in cmdline:
            found += _children(child)
        elif b"spawn_main" in cmdline:
            found.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_a_killed_worker_is_replaced_and_nothing_is_lost_or_duplicated(tmp_path):
    whole = run_experiment("ioffe2015-mnist", "tiny", KILLABLE, out=tmp_path / "whole",
                           write_report=False)  # fmt: skip
    out = tmp_path / "killed"
    process = start_run(out, workers=2)
    killed = 0
    for fraction in (0.2, 0.6):
        while lines(out / METRICS) < fraction * len(whole.rows) and process.poll() is None:
            time.sleep(0.005)
        workers = _workers_of(process.pid) if process.poll() is None else []
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            killed += 1
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()
    assert killed >= 1, "the run finished before a worker could be killed"
    same_run(out, tmp_path / "whole")


def test_a_dask_cluster_gives_the_same_bytes(serial, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:  # fmt: skip
        record = run_experiment("placement", "tiny", TINY, out=tmp_path / "dask",
                                scheduler=cluster.scheduler_address, checkpoint_every_s=0,
                                write_report=False)  # fmt: skip
    same_run(tmp_path / "dask", serial / "placement")
    execution = record.config["execution"]
    assert execution["executor"] == "dask" and execution["scheduler"].startswith("tcp://")


def test_executor_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="drop --workers"):
        run_experiment("placement", "tiny", TINY, out=tmp_path / "a", workers=2,
                       scheduler="tcp://127.0.0.1:1")  # fmt: skip
    with pytest.raises(ConfigError, match="no Dask scheduler answered"):
        run_experiment("placement", "tiny", TINY, out=tmp_path / "b", scheduler="tcp://127.0.0.1:9")
    with pytest.raises(ConfigError, match="--device"):
        run_experiment("placement", "tiny", TINY, out=tmp_path / "c", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            run_experiment("placement", "tiny", TINY, out=tmp_path / "d", device="cuda")
        with pytest.raises(ConfigError, match="--amp"):
            run_experiment("placement", "tiny", TINY, out=tmp_path / "e", amp=True)


def test_default_threads_are_free_cores_over_workers(tmp_path, monkeypatch):
    from normkit.lab import executors

    monkeypatch.delenv("NORMKIT_THREADS")
    monkeypatch.setattr(executors, "free_cores", lambda: (5, 2.7))
    assert executors.default_threads(2) == (2, "free cores 5 (load 2.7) ÷ 2 worker(s), at least 1")
    assert executors.default_threads(8)[0] == 1
    record = run_experiment("placement", "tiny", {**TINY, "steps": "2"}, out=tmp_path / "r",
                            write_report=False)  # fmt: skip
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["execution"]["threads"] == 5 == config["torch_threads"]
    assert "free cores 5" in record.config["execution"]["threads_rule"]
    assert run_experiment("placement", "tiny", {**TINY, "steps": "2"}, out=tmp_path / "t",
                          threads=3, write_report=False).config["execution"]["threads"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_record_the_device_and_match_across_workers(tmp_path):
    one = run_experiment("placement", "tiny", TINY, out=tmp_path / "one", device="cuda",
                         write_report=False)  # fmt: skip
    assert one.config["execution"]["device"] == "cuda"
    assert all(0.0 <= f["test_accuracy"] <= 1.0 for f in one.finals().values())
    run_experiment("placement", "tiny", TINY, out=tmp_path / "two", device="cuda", workers=2,
                   write_report=False)  # fmt: skip
    same_run(tmp_path / "two", tmp_path / "one")
    auto = run_experiment("ioffe2015-mnist", "tiny", TINY, out=tmp_path / "auto", device="auto",
                          amp=True, write_report=False)  # fmt: skip
    assert auto.config["execution"]["device"] == "cuda" and auto.config["execution"]["amp"]

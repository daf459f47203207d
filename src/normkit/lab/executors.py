"""Where trial segments run: in this process, in worker processes, or on a Dask cluster.

All three take the same :class:`~normkit.lab.trial.Task` and return the same
:class:`~normkit.lab.trial.SegmentResult`; none touches the run folder (the parent writes it).

- :class:`InProcess`: ``--workers 1``, one segment at a time, here.
- :class:`Processes`: ``--workers N``: N worker processes (forked by a forkserver, so none
  inherits the run folder's lock), each holding one trial at a time and its next segments, so a live trial is
  rarely rebuilt. A worker that dies (killed, out of memory) is replaced and its segment sent again
  from the last state the parent holds: no row is lost or duplicated.
- :class:`Dask`: ``--scheduler ADDRESS``: the same tasks on a ``dask.distributed`` cluster (its
  workers need normkit and the data at the same path; start them with one thread each).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import tempfile
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from normkit.errors import ConfigError
from normkit.lab.trial import Task, preload, run_segment


class WorkerLost(Exception):
    """The process running a segment died before returning it; the segment is sent again."""


class InProcess:
    """Segments run here, one at a time (``data`` is the parent's copy of the run's data)."""

    kind = "in-process"

    def __init__(self, data):
        self.data, self.capacity = data, 1

    def submit(self, task: Task) -> Future:
        future: Future = Future()
        future.set_result(run_segment(task, self.data))  # exceptions propagate from here
        return future

    def wait_any(self, handles: list) -> list[tuple[object, object]]:
        return [(h, h.result()) for h in handles]

    def close(self) -> None:
        from normkit.lab.trial import forget_live_trials

        forget_live_trials()


def _start_worker(threads: int, run: int) -> None:
    """A worker's start: its torch threads, and a watch that ends it when the run's process
    ``run`` is gone (its queue would otherwise keep it waiting forever after a SIGKILL of the run,
    and a forkserver's worker keeps the forkserver alive in turn)."""
    import threading
    import time

    import torch

    torch.set_num_threads(threads)
    forked = os.getppid() != run  # a forkserver's child: ask the OS about the run itself

    def gone() -> bool:
        if not forked:
            return os.getppid() != run
        try:
            os.kill(run, 0)  # signal 0: only asks whether the process exists (POSIX)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def watch():
        while not gone():
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="normkit-parent-watch").start()


def _spooled(task: Task, spool: str) -> str:
    """Run a segment and leave its result in a file of ``spool``; only the file's name goes back
    through the pool's pipe. A worker killed half-way through sending a large result would
    otherwise leave the parent waiting forever for the rest of the message."""
    result = run_segment(task)
    path = os.path.join(spool, uuid.uuid4().hex)
    with open(path + ".tmp", "wb") as handle:
        pickle.dump(result, handle, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(path + ".tmp", path)
    return path


class Processes:
    """``workers`` worker processes, one trial each at a time (see the module docstring)."""

    kind = "processes"

    def __init__(self, workers: int, threads: int, preload_args: tuple | None = None):
        """``preload_args``: :func:`~normkit.lab.trial.preload`'s arguments, so that each worker
        starts and loads the data at once, while the parent loads its own."""
        self.capacity, self.threads = workers, threads
        # forkserver: a clean process that imports torch once and forks the workers (no inherited
        # descriptors, so no worker holds the run folder's lock); spawn where it does not exist
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self._context = multiprocessing.get_context(method)
        if method == "forkserver":
            self._context.set_forkserver_preload(["normkit.lab.trial"])
        self._pools = [self._pool() for _ in range(workers)]
        self._owner: dict[str, int] = {}  # trial key -> worker index
        self._futures: dict[Future, tuple[int, str]] = {}
        self._spool = tempfile.mkdtemp(prefix="normkit-lab-")  # results on their way back
        if preload_args is not None:
            for pool in self._pools:
                pool.submit(preload, *preload_args).add_done_callback(lambda f: f.exception())

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=self._context, initializer=_start_worker,
                                   initargs=(self.threads, os.getpid()))  # fmt: skip

    def submit(self, task: Task) -> Future:
        key = task.trial.key
        busy = {index for index, _ in self._futures.values()}
        index = self._owner.get(key)
        if index is None or index in busy:
            free = [i for i in range(self.capacity) if i not in busy and i not in self._owner.values()]
            free = free or [i for i in range(self.capacity) if i not in busy]
            index = free[0]
        for other in [k for k, i in self._owner.items() if i == index and k != key]:
            del self._owner[other]
        self._owner[key] = index
        future = self._pools[index].submit(_spooled, task, self._spool)
        self._futures[future] = (index, key)
        return future

    def wait_any(self, handles: list) -> list[tuple[object, object]]:
        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        outcomes = []
        for future in done:
            index, key = self._futures.pop(future)
            error = future.exception()
            if isinstance(error, BrokenProcessPool):
                self._pools[index].shutdown(wait=False, cancel_futures=True)
                self._pools[index] = self._pool()
                self._owner.pop(key, None)
                outcomes.append((future, WorkerLost(f"worker process {index} died: {error}")))
            elif error is not None:
                outcomes.append((future, error))
            else:
                with open(future.result(), "rb") as handle:
                    outcomes.append((future, pickle.load(handle)))  # written by our own worker
                os.unlink(future.result())
        return outcomes

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._spool, ignore_errors=True)


class Dask:
    """The same tasks on a ``dask.distributed`` cluster at ``address`` (the ``dask`` extra)."""

    kind = "dask"

    def __init__(self, address: str):
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError(
                "--scheduler needs dask.distributed: pip install 'normkit[dask]'"
            ) from None
        try:
            self.client = Client(address, timeout="10s")
        except OSError as error:
            raise ConfigError(f"no Dask scheduler answered at {address} ({error})") from None
        workers = self.client.scheduler_info()["workers"]
        if not workers:
            raise ConfigError(f"the Dask cluster at {address} has no workers yet; start some first")
        # one segment at a time per worker process (torch's generator and threads are per process)
        self.capacity = len(workers)

    def submit(self, task: Task):
        return self.client.submit(run_segment, task, pure=False)

    def wait_any(self, handles: list) -> list[tuple[object, object]]:
        from distributed.scheduler import KilledWorker

        from distributed import wait as dask_wait

        done, _ = dask_wait(handles, return_when="FIRST_COMPLETED")
        outcomes = []
        for future in done:
            if future.status == "error":
                error = future.exception()
                if isinstance(error, KilledWorker):
                    error = WorkerLost(f"Dask gave up on a worker: {error}")
                outcomes.append((future, error))
            else:
                outcomes.append((future, future.result()))
        return outcomes

    def close(self) -> None:
        self.client.close()


def usable_cores() -> int:
    """Cores this process may use (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def free_cores() -> tuple[int, float]:
    """Cores this process may use, minus the machine's 1-minute load (at least 1), and the load."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, usable_cores() - round(load)), load


def default_threads(workers: int) -> tuple[int, str]:
    """Torch threads per worker: ``$NORMKIT_THREADS`` if set, else free cores ÷ workers, at least
    1; and the rule as it applied."""
    if os.environ.get("NORMKIT_THREADS", "").strip():
        try:
            threads = int(os.environ["NORMKIT_THREADS"])
        except ValueError:
            raise ConfigError(f"NORMKIT_THREADS={os.environ['NORMKIT_THREADS']!r}: give a number") from None
        if threads < 1:
            raise ConfigError(f"NORMKIT_THREADS={threads}: give 1 or more")
        return threads, f"NORMKIT_THREADS={threads}"
    free, load = free_cores()
    threads = max(1, free // workers)
    return threads, f"free cores {free} (load {load:.1f}) ÷ {workers} worker(s), at least 1"

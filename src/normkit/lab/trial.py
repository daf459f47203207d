"""Training one trial, in whatever process runs it: the parent, a worker process or a Dask worker.

:func:`run_segment` trains a trial from a given state (or from its start) until an evaluation step
at least ``segment_s`` seconds later, or to its end, and returns the metrics rows it produced and
the trial's state at that point (as bytes). The parent process writes both (it is the run folder's
only writer) and sends the next segment, with that state, to any worker; a worker that ran the
previous segment keeps the live trial and goes on without rebuilding it.

Everything a trial draws comes from its own seed (:mod:`normkit.lab.seeds`) and its state holds
every source of randomness (the model, the optimizer, the batch order and its generator, torch's
global generator and the running loss), so rebuilding a trial from its state continues it exactly:
the rows are the same whichever worker runs which segment, and after a resume. Segments in one
process run one at a time (torch's global generator and thread count belong to the process).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from normkit.errors import ConfigError
from normkit.lab.files import json_ready
from normkit.lab.plan import Trial
from normkit.lab.seeds import BATCHES, GLOBAL, WEIGHTS, BatchOrder, derived_seed
from normkit.lab.settings import Settings

RESERVED = frozenset({"kind", "trial", "step", "train_loss", "steps", "diverged"})
LIVE_TRIALS = 2  # trials a process keeps alive between their segments


@dataclass(frozen=True)
class DataSpec:
    """How a worker gets the run's data: loaded from its own disk by name, then checked against
    the parent's description (so every worker trains on the same examples)."""

    dataset: str
    data_dir: str | None
    description: dict

    def comparable(self) -> dict:
        return comparable(self.description)


def comparable(description: dict) -> dict:
    return {k: description[k] for k in ("name", "train", "validation", "test", "sample_shape")}


@dataclass(frozen=True)
class Execution:
    """Where and how trials run: torch threads per process, the device, and mixed precision."""

    threads: int = 1
    device: str = "cpu"
    amp: bool = False


@dataclass(frozen=True)
class Task:
    """One segment of one trial. ``chain`` names the sequence of segments of this trial in this
    invocation of the run (a worker's live trial is reused only for the same chain and segment)."""

    experiment: type
    settings: Settings
    data: DataSpec
    trial: Trial
    chain: str
    segment: int
    state: bytes | None
    segment_s: float
    execution: Execution


@dataclass
class SegmentResult:
    key: str
    segment: int
    rows: list[dict]  # JSON-ready; the final row last when the trial finished
    state: bytes | None  # the trial's state after the segment (None once it finished)
    done: bool
    step: int
    seconds: float  # the trial's training wall time so far (work redone after a resume excluded)


def to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")


def _row(row: dict) -> dict:
    """A row as it will read back from metrics.jsonl (strict JSON: NaN and Inf become null)."""
    return json.loads(json.dumps(json_ready(row), allow_nan=False))


def dataset_to(data, device: torch.device):
    """The data set with its tensors on ``device`` (itself when they already are)."""
    import dataclasses

    if device.type == "cpu" or data is None:
        return data
    moved = {
        f.name: getattr(data, f.name).to(device)
        for f in dataclasses.fields(data)
        if isinstance(getattr(data, f.name), torch.Tensor)
    }
    return dataclasses.replace(data, **moved)


class TrialRun:
    """One trial, live: its setup, batch order, step count and running loss (see the module doc)."""

    def __init__(self, experiment, settings: Settings, data, trial: Trial, execution: Execution,
                 state: dict | None = None):  # fmt: skip
        clash = RESERVED & set(trial.params)
        if clash:
            raise ConfigError(f"trial {trial.key}: parameter names {sorted(clash)} are reserved")
        self.experiment, self.settings, self.trial = experiment, settings, trial
        self.device = torch.device(execution.device)
        self.amp = execution.amp
        torch.manual_seed(derived_seed(trial.seed, GLOBAL))
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(derived_seed(trial.seed, GLOBAL))
        generator = torch.Generator().manual_seed(derived_seed(trial.seed, WEIGHTS))
        setup = experiment.setup(trial, settings, data, generator)
        setup.model.to(self.device)
        setup.data = dataset_to(setup.data, self.device)
        self.setup = setup
        self.data = data if setup.data is None else setup.data
        self.loss_fn = nn.functional.cross_entropy if setup.loss_fn is None else setup.loss_fn
        order = setup.batch_order or (lambda labels, size, seed: BatchOrder(len(labels), size, seed))
        self.batches = order(self.data.y_train, setup.batch_size, derived_seed(trial.seed, BATCHES))
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count, self.step, self.seconds = 0, 0, 0.0
        self.train_loss, self.diverged, self.fresh = None, False, state is None
        if state is not None:
            setup.model.load_state_dict(state["model"])
            setup.optimizer.load_state_dict(state["optimizer"])
            self.batches.load(state["batches"])
            torch.set_rng_state(state["rng"])
            if self.device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"])
            self.loss_sum = state["loss_sum"].to(self.device)
            self.loss_count, self.step = state["loss_count"], state["step"]
            self.train_loss, self.seconds = state["train_loss"], state["seconds"]
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state() if self.device.type == "cuda" else None

    def state(self) -> dict:
        return {
            "step": self.step,
            "model": self.setup.model.state_dict(),
            "optimizer": self.setup.optimizer.state_dict(),
            "batches": self.batches.state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "loss_sum": self.loss_sum.cpu(),
            "loss_count": self.loss_count,
            "train_loss": self.train_loss,
            "seconds": self.seconds,
        }

    def _evaluate(self) -> dict:
        setup = self.setup
        setup.model.eval()
        setup.step = self.step
        with torch.no_grad():
            values = self.experiment.measure(self.trial, self.settings, setup, self.data)
        setup.model.train()
        return _row({"kind": "eval", "trial": self.trial.key, **self.trial.params, "step": self.step,
                     "train_loss": self.train_loss, **values})  # fmt: skip

    def _train_step(self) -> None:
        setup = self.setup
        if setup.lr_factor is not None:
            factor = setup.lr_factor(self.step)
            for group, initial in zip(setup.optimizer.param_groups, setup.initial_lrs, strict=True):
                group["lr"] = initial * factor
        index = self.batches.next()
        x, y = self.data.x_train[index], self.data.y_train[index]
        if setup.train_step is not None:
            loss = setup.train_step(x, y)
        else:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.loss_fn(setup.model(x), y)
            setup.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            setup.optimizer.step()
        self.loss_sum += loss.detach()
        self.loss_count += 1
        self.step += 1

    def advance(self, segment_s: float) -> tuple[list[dict], bool]:
        """Train until an evaluation step ``segment_s`` seconds from now, or to the end; return the
        rows produced and whether the trial finished (its final row is then the last row)."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng)
        rows = []
        if self.fresh:
            rows.append(self._evaluate())
            self.fresh = False
        began = started = time.perf_counter()
        trial = self.trial
        self.setup.model.train()
        while self.step < trial.steps and not self.diverged:
            self._train_step()
            if self.step % trial.eval_every == 0 or self.step == trial.steps:
                self.train_loss = float(self.loss_sum) / self.loss_count
                self.diverged = not self.train_loss <= self.experiment.divergence_loss  # NaN too
                rows.append(self._evaluate())
                self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                self.loss_count = 0
                now = time.perf_counter()
                self.seconds, started = self.seconds + now - started, now
                if now - began >= segment_s:
                    break
        done = self.diverged or self.step >= trial.steps
        if done:
            rows.append(self._final())
            self.seconds += time.perf_counter() - started
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        return rows, done

    def _final(self) -> dict:
        self.setup.model.eval()
        with torch.no_grad():
            values = self.experiment.finish(self.trial, self.settings, self.setup, self.data)
        self.close()
        return _row({"kind": "final", "trial": self.trial.key, **self.trial.params, "step": self.step,
                     "steps": self.trial.steps, "diverged": self.diverged,
                     "train_loss": self.train_loss, **values})  # fmt: skip

    def close(self) -> None:
        close = getattr(self.setup.train_step, "close", None)
        if close is not None:
            close()


# ------------------------------------------------------------------------------- in a worker

_LOCK = threading.Lock()
_LIVE: OrderedDict[str, tuple[int, TrialRun]] = OrderedDict()
_DATA: dict[tuple, object] = {}


def preload(experiment: type, settings: Settings, dataset: str, data_dir: str | None, device: str):
    """Load the run's data into this process (a worker does so as it starts, while the parent
    loads its own copy), once per process."""
    from normkit.lab.datasets import load_dataset

    key = (experiment.name, repr(settings), dataset, data_dir, device)
    if key not in _DATA:
        data = experiment().prepare_data(settings, load_dataset(dataset, data_dir))
        _DATA.clear()
        _DATA[key] = dataset_to(data, torch.device(device))
    return _DATA[key]


def _data(task: Task):
    """The run's data in this process, checked against the parent's description."""
    data = preload(task.experiment, task.settings, task.data.dataset, task.data.data_dir,
                   task.execution.device)  # fmt: skip
    if comparable(data.describe()) != task.data.comparable():
        import socket

        raise ConfigError(
            f"the worker on {socket.gethostname()} found other data than the run's "
            f"({data.describe()['name']} from {data.source}, not {task.data.description['source']}); "
            "put the same files at the same path on every worker, or set NORMKIT_DATA there"
        )
    return data


def run_segment(task: Task, data=None) -> SegmentResult:
    """Run one segment of ``task``'s trial (see the module docstring). ``data``: the run's data
    when the caller has it (the parent process), else loaded here."""
    with _LOCK:
        torch.set_num_threads(task.execution.threads)
        key = task.trial.key
        live = _LIVE.pop(key, None)
        run = None
        if live is not None and live[0] == task.segment and live[1].trial == task.trial:
            run = live[1] if getattr(live[1], "chain", None) == task.chain else None
        if run is None:
            if live is not None:
                live[1].close()
            state = None if task.state is None else from_bytes(task.state)
            experiment = task.experiment()
            run = TrialRun(experiment, task.settings, data if data is not None else _data(task),
                           task.trial, task.execution, state)  # fmt: skip
            run.chain = task.chain
        try:
            rows, done = run.advance(task.segment_s)
        except BaseException:
            run.close()
            raise
        state = None
        if not done:
            state = to_bytes(run.state())
            _LIVE[key] = (task.segment + 1, run)
            while len(_LIVE) > LIVE_TRIALS:
                _LIVE.popitem(last=False)[1][1].close()
        return SegmentResult(key, task.segment, rows, state, done, run.step, run.seconds)


def forget_live_trials() -> None:
    """Close every live trial of this process (the parent does so when a run ends)."""
    with _LOCK:
        while _LIVE:
            _LIVE.popitem()[1][1].close()


def calibrate(experiment, settings: Settings, data, trial: Trial, execution: Execution,
              steps: int = 10) -> tuple[float, float]:  # fmt: skip
    """Seconds per training step and per evaluation of ``trial`` on this machine (``--dry-run``)."""
    torch.set_num_threads(execution.threads)
    run = TrialRun(experiment, settings, data, trial, execution)
    try:
        run.setup.model.train()
        count = min(steps, trial.steps)  # 0 for a trial that trains nothing (it may not be able to)
        if count:
            run._train_step()  # warm-up
        started = time.perf_counter()
        for _ in range(count):
            run._train_step()
        per_step = (time.perf_counter() - started) / max(1, count)
        started = time.perf_counter()
        run._evaluate()
        return per_step, time.perf_counter() - started
    finally:
        run.close()

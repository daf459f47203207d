"""Training one trial's model across several gloo processes on this machine, for SyncBatchNorm.

:class:`GlooDataParallel` is a :attr:`normkit.lab.Setup.train_step`: the lab's process is rank 0
and holds the model the runner measures and checkpoints; ``processes - 1`` worker processes hold
replicas. Every step, rank 0 broadcasts the learning rates and the global batch drawn by the
runner; rank r trains on its slice ``[r*b, (r+1)*b)`` under ``DistributedDataParallel``, so the
gradient is the global batch's and a model converted with ``nk.SyncBatchNorm`` normalizes with the
statistics of all ``processes * b`` samples while each process holds b. Parameters, optimizer state
and running statistics stay identical on every rank (DDP averages the gradients; SyncBatchNorm's
running statistics are bit-identical across ranks), so rank 0's model is the trained model.

The workers start on the first step, from rank 0's state at that moment (so a resumed trial goes on
from its checkpoint), and stop at :meth:`close` (the experiment's ``finish``), when this object is
garbage collected, or when the process exits. A worker whose parent dies exits by itself, and every
collective has a timeout, so nothing waits forever.
"""

from __future__ import annotations

import datetime
import inspect
import io
import math
import os
import socket
import threading
import time
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from normkit.errors import ConfigError

TIMEOUT_S = 300.0  # a collective's limit: longer than rank 0's pause for an evaluation
_ACTIVE: weakref.ref | None = None  # the trainer whose ranks run now (one at a time per process)
_STEP, _STOP = 1.0, 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, world: int, port: int, timeout_s: float) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _ddp(model: nn.Module) -> nn.Module:
    """``model`` under DistributedDataParallel, without the per-step broadcast of buffers (the
    running statistics of SyncBatchNorm are identical on every rank anyway)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, forward_sync_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)


def _pack(lrs: list[float], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One float64 message: [command, learning rates..., x..., y...] (exact for float32 x and
    integer labels), so a step costs one broadcast."""
    head = torch.tensor([_STEP, *lrs], dtype=torch.float64)
    return torch.cat([head, x.reshape(-1).double(), y.double()])


def _train_slice(ddp, optimizer, x, y, rank: int, world: int) -> torch.Tensor:
    """One step of this rank on its slice of the global batch; returns the slice's loss."""
    per = x.shape[0] // world
    mine = slice(rank * per, (rank + 1) * per)
    loss = nn.functional.cross_entropy(ddp(x[mine]), y[mine])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP averages the gradients over the ranks: the global batch's gradient
    optimizer.step()
    return loss.detach()


class GlooDataParallel:
    """Trains ``model`` with ``optimizer`` on ``processes`` gloo ranks; see the module docstring.

    Call it with the global batch ``(x, y)`` (``processes`` times the per-process batch, drawn by
    the runner); it returns rank 0's loss, on its share of the batch (an all-reduce of the loss
    would cost one more collective per step for a number that is only logged).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        processes: int,
        timeout_s: float = TIMEOUT_S,
    ):
        if processes < 2:
            raise ConfigError(f"processes={processes}: training across processes needs >= 2")
        self.model, self.optimizer, self.processes = model, optimizer, processes
        self.timeout_s = timeout_s
        self._ddp = None
        self._workers: list = []
        self._shape: tuple[int, ...] | None = None
        self._closer = None
        self._stepping = {"now": False}  # shared with the finalizer: is a step in flight?

    def _start(self, x: torch.Tensor) -> None:
        global _ACTIVE
        previous = _ACTIVE() if _ACTIVE is not None else None
        if previous is not None:  # a trial abandoned by an exception: its ranks go first
            previous.close()
        if dist.is_available() and dist.is_initialized():
            raise ConfigError(
                "a torch.distributed process group is already initialized in this process; the "
                "lab starts its own gloo ranks for SyncBN trials, so run it outside torchrun"
            )
        if x.shape[0] % self.processes:
            raise ConfigError(
                f"a global batch of {x.shape[0]} does not split into {self.processes} processes"
            )
        port, world = _free_port(), self.processes
        context = mp.get_context("spawn")
        optimizer = self.optimizer
        # The replica travels as bytes: torch.multiprocessing would otherwise hand the worker
        # this process's tensors in shared memory, and both ranks would update the same weights.
        replica = _serialize(
            self.model, type(optimizer), dict(optimizer.defaults), optimizer.state_dict()
        )
        for rank in range(1, world):
            worker = context.Process(
                target=_worker,
                args=(rank, world, port, self.timeout_s, replica, tuple(x.shape), os.getpid()),
                daemon=True,
            )
            worker.start()
            self._workers.append(worker)
        _init_group(0, world, port, self.timeout_s)
        self._ddp = _ddp(self.model)
        self._shape = tuple(x.shape)
        size = _pack([0.0] * len(optimizer.param_groups), x, x.new_zeros(x.shape[0])).numel()
        self._closer = weakref.finalize(self, _shutdown, self._workers, size, self._stepping)
        _ACTIVE = weakref.ref(self)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._ddp is None:
            self._start(x)
        if tuple(x.shape) != self._shape:
            raise ConfigError(
                f"every global batch must have the shape of the first, {self._shape}; got "
                f"{tuple(x.shape)}"
            )
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._stepping["now"] = True
        dist.broadcast(_pack(lrs, x, y), 0)
        loss = _train_slice(self._ddp, self.optimizer, x, y, 0, self.processes)
        self._stepping["now"] = False
        return loss

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        if self._closer is not None:
            self._closer()  # a weakref.finalize: runs once, here, at collection or at exit
        self._ddp = None


def _shutdown(workers: list, message_size: int, stepping: dict) -> None:
    """Tell the workers to stop (or, if a step was interrupted half-way, so that they wait in a
    collective, kill them), wait for them, and leave the process group."""
    if stepping["now"]:
        for worker in workers:
            worker.kill()
    elif dist.is_available() and dist.is_initialized():
        try:
            message = torch.zeros(message_size, dtype=torch.float64)
            message[0] = _STOP
            dist.broadcast(message, 0)
        except RuntimeError:
            pass  # the workers are gone already
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    deadline = time.monotonic() + 30.0
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()


def _watch_parent(parent: int) -> None:
    """Exit this worker if the lab's process dies (e.g. a SIGKILL), instead of waiting for a
    collective's timeout."""

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def _serialize(model, optimizer_class, defaults, state) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {"model": model, "optimizer": optimizer_class, "defaults": defaults, "state": state}, buffer
    )
    return buffer.getvalue()


def _worker(rank, world, port, timeout_s, replica, shape, parent):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    _watch_parent(parent)
    # a trusted payload: written by the lab's own process a moment ago, classes and all
    payload = torch.load(io.BytesIO(replica), weights_only=False)
    model = payload["model"]
    _init_group(rank, world, port, timeout_s)
    try:
        optimizer = payload["optimizer"](model.parameters(), **payload["defaults"])
        optimizer.load_state_dict(payload["state"])
        ddp = _ddp(model)
        groups = len(optimizer.param_groups)
        count = math.prod(shape)
        message = torch.empty(1 + groups + count + shape[0], dtype=torch.float64)
        while True:
            dist.broadcast(message, 0)
            if message[0].item() == _STOP:
                break
            for group, lr in zip(
                optimizer.param_groups, message[1 : 1 + groups].tolist(), strict=True
            ):
                group["lr"] = lr
            x = message[1 + groups : 1 + groups + count].view(shape).float()
            y = message[1 + groups + count :].long()
            _train_slice(ddp, optimizer, x, y, rank, world)
    finally:
        dist.destroy_process_group()

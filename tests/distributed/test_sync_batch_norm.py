"""SyncBatchNorm across real processes: gloo ranks on localhost against single-process BN.

Each test spawns its ranks once (process start costs seconds) and runs many checks inside; every
rank saves what it computed and the parent compares it with ``normkit.BatchNorm``,
``torch.nn``'s batch norm and the float64 reference, run on the concatenated batch:

- forward outputs and input gradients, per rank, against the matching slice of the single run;
- weight and bias gradients: the ranks' shares add up to the single run's (DDP sums them);
- running statistics: bit-identical on every rank, and equal to the single run's;
- collectives: one all-gather per layer per training forward, one all-reduce per backward, none
  in eval, counted by wrapping ``torch.distributed``'s functions inside the ranks;
- DistributedDataParallel training steps against one process, and torch.compile against eager;
- the errors every rank raises when the ranks disagree, and the bounded wait when one rank never
  joins.

Time is bounded twice: every collective has the process group's timeout (60 s) and the spawn as a
whole a deadline; a free port is picked per run. Tolerances are tests/helpers.py's: the sync layer
merges in float64 and so is at least as accurate as the single-process float32 kernels.
"""

from __future__ import annotations

import collections
import datetime
import functools
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normkit as nk
from helpers import TorchBatchNormAnyRank, assert_close, randomize_parameters
from normkit import reference
from normkit.distributed import RankMismatchError, to_sync_batch_norm
from normkit.errors import BatchTooSmallError, ChannelMismatchError, ConfigError, DtypeError

GROUP_TIMEOUT = datetime.timedelta(seconds=60)
SPAWN_DEADLINE_S = 240.0
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce")

# --- Spawning ranks ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, scenario, out_dir: Path, backend: str = "gloo", device="cpu"):
    """Run ``scenario(rank, world, store, device)`` (a module-level function) on ``world`` fresh
    processes; return each rank's result, in rank order. A rank that raises fails the test with
    its traceback."""
    name = scenario.__name__
    context = mp.start_processes(
        _rank_main,
        args=(world, free_port(), str(out_dir), scenario, backend, device),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{name}: the ranks did not finish within {SPAWN_DEADLINE_S} s")
    return [torch.load(out_dir / f"{name}-{r}.pt", weights_only=False) for r in range(world)]


def _rank_main(rank, world, port, out_dir, scenario, backend, device):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    if device == "cuda":  # one GPU per rank with NCCL; every rank on the one GPU otherwise
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=GROUP_TIMEOUT)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=GROUP_TIMEOUT
    )
    result = scenario(rank, world, store, device)
    torch.save(result, Path(out_dir) / f"{scenario.__name__}-{rank}.pt")
    if not result.get("group_abandoned"):
        dist.destroy_process_group()


class CollectiveCounter:
    """Counts the calls to torch.distributed's collectives made in this process."""

    def __init__(self):
        self.calls: collections.Counter[str] = collections.Counter()
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._counting(name, original))

    def _counting(self, name, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return original(*args, **kwargs)

        return counted

    def take(self) -> dict[str, int]:
        calls = dict(self.calls)
        self.calls.clear()
        return calls


# --- The cases: a layer, per-rank batch sizes, and the data -------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    sizes: tuple[int, ...]  # batch size on each rank of the group
    tail: tuple[int, ...] = (4, 5, 3)  # (C, *spatial)
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    kwargs: dict = field(default_factory=dict)
    steps: int = 2

    @property
    def channels(self) -> int:
        return self.tail[0]


def global_batch(case: Case, step: int, what: str) -> torch.Tensor:
    """The concatenated batch of one step (inputs: away from zero mean, unit variance)."""
    generator = torch.Generator().manual_seed(1000 * step + (0 if what == "x" else 1))
    x = torch.randn((sum(case.sizes), *case.tail), generator=generator, dtype=torch.float64)
    if what == "x":
        x = x * 3.0 + 1.5
    return x.to(case.dtype)


def rank_slice(case: Case, rank: int) -> slice:
    start = sum(case.sizes[:rank])
    return slice(start, start + case.sizes[rank])


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def run_sync_case(case: Case, rank: int, counter: CollectiveCounter, group=None, device="cpu"):
    """The rank's side: train ``case.steps`` steps, then one eval step; keep everything."""
    torch.manual_seed(0)
    layer = nk.SyncBatchNorm(case.channels, process_group=group, **case.kwargs)
    layer = layer.to(device=device, dtype=case.dtype)
    randomize_parameters(layer)
    initial = {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}
    steps, calls = [], []
    for step in range(case.steps):
        layer.train()
        layer.zero_grad(set_to_none=True)
        x = _layout(global_batch(case, step, "x")[rank_slice(case, rank)], case.channels_last)
        dy = _layout(global_batch(case, step, "dy")[rank_slice(case, rank)], case.channels_last)
        leaf = x.to(device).requires_grad_(True)
        y = layer(leaf)
        forward_calls = counter.take()
        y.backward(dy.to(device))
        calls.append((forward_calls, counter.take()))
        grads = {n: p.grad.cpu().clone() for n, p in layer.named_parameters() if p.grad is not None}
        channels_last_kept = y.is_contiguous(memory_format=torch.channels_last) and y.dim() == 4
        steps.append((y.detach().cpu(), leaf.grad.cpu(), grads, channels_last_kept))
    layer.eval()
    x = _layout(global_batch(case, case.steps, "x")[rank_slice(case, rank)], case.channels_last)
    with torch.no_grad():
        y_eval = layer(x.to(device)).cpu()
    eval_calls = counter.take()
    state = {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}
    return {
        "initial": initial,
        "steps": steps,
        "eval": y_eval,
        "state": state,
        "calls": calls,
        "eval_calls": eval_calls,
    }


def gather_name(backend: str) -> str:
    """The torch.distributed function normkit's all-gather goes through on ``backend``."""
    if backend == "gloo":
        return "all_gather"
    return "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


def check_case(case: Case, ranks: list[dict], gather: str = "all_gather") -> None:
    """The parent's side: compare every rank with single-process BN on the concatenated batch."""
    what = f"[{case.name}]"
    kwargs = {k: v for k, v in case.kwargs.items() if k != "timeout"}
    exact = case.dtype in (torch.float32, torch.float64)
    ref_dtype = case.dtype if exact else torch.float64
    ours = nk.BatchNorm(case.channels, **kwargs).to(ref_dtype)
    theirs = TorchBatchNormAnyRank(case.channels, **kwargs).to(ref_dtype)
    for layer in (ours, theirs):
        layer.load_state_dict(ranks[0]["initial"])
    tolerance_dtype = case.dtype
    for step in range(case.steps):
        x = global_batch(case, step, "x").to(ref_dtype)
        dy = global_batch(case, step, "dy").to(ref_dtype)
        singles = {}
        for name, layer in (("nk.BatchNorm", ours), ("torch.nn", theirs)):
            layer.train()
            layer.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_(True)
            y = layer(leaf)
            y.backward(dy)
            singles[name] = (
                y.detach(),
                leaf.grad,
                {n: p.grad for n, p in layer.named_parameters()},
            )
        if step == 0:  # the float64 oracle, written like the paper
            w = ranks[0]["initial"].get("weight", torch.ones(case.channels))
            b = ranks[0]["initial"].get("bias", torch.zeros(case.channels))
            eps = kwargs.get("eps", 1e-5)
            y64, cache = reference.batch_norm_train(
                x.double().numpy(), w.double().numpy(), b.double().numpy(), eps
            )
            dx64, dw64, db64 = reference.batch_norm_backward(dy.double().numpy(), cache)
            grads64 = {"weight": dw64, "bias": db64}
            singles["reference"] = (torch.from_numpy(y64), torch.from_numpy(dx64), grads64)
        for name, (y, dx, grads) in singles.items():
            for rank, result in enumerate(ranks):
                y_r, dx_r, _, channels_last_kept = result["steps"][step]
                part = rank_slice(case, rank)
                where = f"{what} step {step} rank {rank} vs {name}"
                assert_close(y_r, y[part], tolerance_dtype, f"{where}: output")
                assert_close(dx_r, dx[part], tolerance_dtype, f"{where}: input grad")
                if case.channels_last and y_r.dim() == 4 and y_r.numel() > 0:
                    assert channels_last_kept, f"{where}: output lost channels_last"
            for pname in ranks[0]["steps"][step][2]:
                total = sum(r["steps"][step][2][pname].double() for r in ranks)
                expected = torch.as_tensor(np.asarray(grads[pname])).reshape(-1)
                assert_close(total, expected, tolerance_dtype, f"{what} step {step}: {pname} grad")
    # running statistics: bit-identical across ranks, and equal to the single run's
    for key, value in ranks[0]["state"].items():
        for rank, result in enumerate(ranks[1:], 1):
            assert torch.equal(result["state"][key], value), f"{what} {key}: rank {rank} != rank 0"
    for name, layer in (("nk.BatchNorm", ours), ("torch.nn", theirs)):
        for key, value in layer.state_dict().items():
            if key == "num_batches_tracked":
                assert int(ranks[0]["state"][key]) == int(value), f"{what} {key} vs {name}"
            else:
                assert_close(
                    ranks[0]["state"][key], value, tolerance_dtype, f"{what} {key} vs {name}"
                )
    # eval mode is local BatchNorm: running statistics, or without them each rank's own batch
    ours.eval()
    x_eval = global_batch(case, case.steps, "x").to(ref_dtype)
    for rank, result in enumerate(ranks):
        part = rank_slice(case, rank)
        with torch.no_grad():
            y_eval = ours(x_eval)[part] if ours.track_running_stats else ours(x_eval[part])
        assert_close(result["eval"], y_eval, tolerance_dtype, f"{what} rank {rank} eval")
    # collectives: one all-gather per training forward, one all-reduce per backward, none in eval
    for rank, result in enumerate(ranks):
        for forward_calls, backward_calls in result["calls"]:
            assert forward_calls == {gather: 1}, f"{what} rank {rank} forward: {forward_calls}"
            assert backward_calls == {"all_reduce": 1}, f"{what} rank {rank} backward"
        assert result["eval_calls"] == {}, f"{what} rank {rank} eval: {result['eval_calls']}"


UNEVEN = (3, 0, 5)
UNEVEN_CASES = [
    Case("float32", UNEVEN),
    Case("float64", UNEVEN, dtype=torch.float64),
    Case("channels_last", UNEVEN, channels_last=True),
    Case("momentum_none", UNEVEN, kwargs={"momentum": None}, steps=3),
    Case("eps_momentum", UNEVEN, kwargs={"eps": 1e-3, "momentum": 0.3}),
    Case("input_2d", UNEVEN, tail=(6,)),
    Case("input_5d_not_affine", UNEVEN, tail=(3, 2, 3, 2), kwargs={"affine": False}),
    Case("no_bias", UNEVEN, kwargs={"bias": False}),
    # half types against float64: statistics and arithmetic run in float32 and merge in float64,
    # so each value is rounded once to the half type, within the two-roundings tolerance.
    Case("bfloat16", UNEVEN, dtype=torch.bfloat16),
    Case("float16", UNEVEN, dtype=torch.float16, channels_last=True),
]


def _scenario_uneven(rank, world, store, device):
    counter = CollectiveCounter()
    return {case.name: run_sync_case(case, rank, counter, device=device) for case in UNEVEN_CASES}


def test_uneven_and_empty_ranks_match_single_process_batch_norm(tmp_path):
    """Three ranks holding 3, 0 and 5 samples: every check of the module docstring, per case."""
    ranks = run_ranks(3, _scenario_uneven, tmp_path)
    for case in UNEVEN_CASES:
        check_case(case, [r[case.name] for r in ranks])


# --- Two ranks: equal sizes, one sample each, DDP, and every mismatch error ------------------------------

PAIR_CASES = [
    Case("equal_sizes", (4, 4)),
    Case("one_sample_per_rank", (1, 1), tail=(5,)),  # local BN would refuse; globally 2 values
    Case("not_tracking", (2, 3), kwargs={"track_running_stats": False}),
]


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, bias=False),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 3),
    )


DDP_SIZES = (3, 5)


def ddp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(50 + step)
    x = torch.randn(sum(DDP_SIZES), 1, 8, 8, generator=generator) * 2 + 1
    projection = torch.randn(sum(DDP_SIZES), 3, generator=generator)
    return x, projection


def _ddp_steps(rank, counter, device="cpu"):
    """Two SGD steps of a small CNN with SyncBN inside DistributedDataParallel."""
    model = to_sync_batch_norm(small_cnn()).to(device)
    on_gpu = torch.device(device).type == "cuda"
    ids = [torch.device(device)] if on_gpu else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    part = slice(sum(DDP_SIZES[:rank]), sum(DDP_SIZES[: rank + 1]))
    grads, outputs = [], []
    for step in range(2):
        x, projection = ddp_batch(step)
        optimizer.zero_grad()
        out = ddp(x[part].to(device))
        (out * projection[part].to(device)).sum().backward()  # summed over ranks: the single loss
        grads.append({n: p.grad.cpu().clone() for n, p in model.named_parameters()})
        outputs.append(out.detach().cpu())
        optimizer.step()
    calls = counter.take()
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    return {"grads": grads, "outputs": outputs, "calls": calls, "state": state}


def _compiled_and_eager(rank):
    """The same conv -> SyncBN -> ReLU step eagerly and under torch.compile (the synchronized part
    runs eagerly inside the compiled graph): outputs, gradients and running statistics."""

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nk.SyncBatchNorm(4), torch.nn.ReLU())

    eager, compiled = build(), build()
    x = torch.randn(2 + rank, 3, 6, 6, generator=torch.Generator().manual_seed(rank))
    results = []
    for model, run in ((eager, eager), (compiled, torch.compile(compiled, backend="eager"))):
        leaf = x.clone().requires_grad_(True)
        y = run(leaf)
        y.sum().backward()
        results.append([y.detach(), leaf.grad, model[1].running_var, model[0].weight.grad])
    return results


def _expect_error(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as error:  # recorded for the parent to check
        return type(error).__name__, str(error)
    return "no error", ""


def _mismatch_errors(rank, world, store):
    """Each mismatch on purpose, in turn; after each, every rank must have raised, and the layer's
    state must be as before. The collectives complete, so the group stays usable."""
    errors = {}
    layer = nk.SyncBatchNorm(4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 4, 5)
    dtype = torch.bfloat16 if rank == 1 else torch.float32  # each legal alone (mixed precision)
    errors["dtype"] = _expect_error(lambda: layer(x.to(dtype)))
    local_dtype = torch.float64 if rank == 1 else torch.float32  # rank 1's own input is wrong
    errors["local_dtype"] = _expect_error(lambda: layer(x.to(local_dtype)))
    channels = 5 if rank == 1 else 4
    errors["channels"] = _expect_error(lambda: layer(torch.randn(3, channels, 5)))
    eps_layer = nk.SyncBatchNorm(4, eps=1e-5 if rank == 0 else 1e-3)
    errors["eps"] = _expect_error(lambda: eps_layer(x))
    errors["too_small"] = _expect_error(lambda: layer(torch.randn(1 - rank, 4)))
    grad_x = x.clone().requires_grad_(rank == 0)
    errors["requires_grad"] = _expect_error(lambda: layer(grad_x))
    # out of step: rank 0 runs the layer again, rank 1 runs a fresh one (as if it had skipped)
    other = layer if rank == 0 else nk.SyncBatchNorm(4)
    errors["out_of_step"] = _expect_error(lambda: other(x))
    after = {k: v.clone() for k, v in layer.state_dict().items()}
    return {"errors": errors, "before": before, "after": after}


def _eval_rank_times_out(rank, world, store):
    """Rank 1 is in eval mode, so it never joins: rank 0 raises RankSyncError after its timeout."""
    layer = nk.SyncBatchNorm(4, timeout=1.5)
    x = torch.randn(3, 4, 5)
    if rank == 1:
        layer.eval()(x)
        store.wait(["rank 0 gave up"])  # stay alive: rank 0 must give up by its timeout
        return ("no error", ""), 0.0
    start = time.monotonic()
    error = _expect_error(lambda: layer(x))
    store.set("rank 0 gave up", "1")
    return error, time.monotonic() - start


def _scenario_pair(rank, world, store, device):
    counter = CollectiveCounter()
    result = {case.name: run_sync_case(case, rank, counter) for case in PAIR_CASES}
    result["ddp"] = _ddp_steps(rank, counter)
    result["compiled"] = _compiled_and_eager(rank)
    result["mismatch"] = _mismatch_errors(rank, world, store)
    result["timeout"] = _eval_rank_times_out(rank, world, store)
    result["group_abandoned"] = True  # rank 0's timed-out all-gather is still pending
    return result


def test_two_ranks_ddp_and_mismatch_errors(tmp_path):
    ranks = run_ranks(2, _scenario_pair, tmp_path)
    for case in PAIR_CASES:
        check_case(case, [r[case.name] for r in ranks])
    _check_ddp([r["ddp"] for r in ranks])
    _check_mismatch_errors(ranks)
    for rank, result in enumerate(ranks):
        eager, compiled = result["compiled"]
        for a, b in zip(eager, compiled, strict=True):
            assert torch.equal(a, b), f"rank {rank}: torch.compile changed the numbers"
    (name, message), waited = ranks[0]["timeout"]
    assert name == "RankSyncError", (name, message)
    assert "within 1.5 s" in message and "eval mode" in message, message
    assert 1.5 <= waited < 20, waited


def _check_ddp(ranks, gather: str = "all_gather"):
    """DDP averages the ranks' gradients: world x that is the single process's gradient of the
    summed loss, for the conv weights before the BN layers too (the backward all-reduce)."""
    model = small_cnn()  # plain BatchNorm2d, same initialisation
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 / len(ranks))
    for step in range(2):
        x, projection = ddp_batch(step)
        optimizer.zero_grad()
        out = model(x)
        (out * projection).sum().backward()
        for rank, result in enumerate(ranks):
            part = slice(sum(DDP_SIZES[:rank]), sum(DDP_SIZES[: rank + 1]))
            assert_close(result["outputs"][step], out[part], torch.float32, f"ddp step {step} out")
            for name, p in model.named_parameters():
                ddp_grad = result["grads"][step][name] * len(ranks)
                assert_close(ddp_grad, p.grad, torch.float32, f"ddp step {step} rank {rank} {name}")
        optimizer.step()  # lr / world: the single process's step equals DDP's averaged one
    for key, value in model.state_dict().items():
        for result in ranks:
            assert_close(result["state"][key], value, torch.float32, f"ddp final {key}")
    # two SyncBN layers: two all-gathers per forward and two all-reduces per backward (DDP's own
    # gradient all-reduce runs in C++ and is not counted here)
    for result in ranks:
        assert result["calls"] == {gather: 4, "all_reduce": 4}, result["calls"]


EXPECTED_ERRORS = {
    "dtype": (DtypeError, "different dtypes"),
    "local_dtype": (DtypeError, "dtype"),
    "channels": (ChannelMismatchError, "channels"),
    "eps": (RankMismatchError, "eps"),
    "too_small": (BatchTooSmallError, "1 in total"),
    "requires_grad": (RankMismatchError, "needs a gradient"),
    "out_of_step": (RankMismatchError, "out of step"),
}


def _check_mismatch_errors(ranks):
    for rank, result in enumerate(ranks):
        errors = result["mismatch"]["errors"]
        for key, (cls, phrase) in EXPECTED_ERRORS.items():
            name, message = errors[key]
            assert name == cls.__name__, f"rank {rank} {key}: {name}: {message}"
            assert phrase in message and "SyncBatchNorm(4" in message, (
                f"rank {rank} {key}: {message}"
            )
        before, after = result["mismatch"]["before"], result["mismatch"]["after"]
        for key in before:
            assert torch.equal(before[key], after[key]), f"rank {rank}: {key} changed by an error"
    # the rank whose input was at fault explains it; the other names that rank
    assert "build the layer for 5 channels" in ranks[1]["mismatch"]["errors"]["channels"][1]
    assert "rank 1 could not normalize" in ranks[0]["mismatch"]["errors"]["channels"][1]
    own = "has dtype torch.float32, but the input has dtype torch.float64"
    assert own in ranks[1]["mismatch"]["errors"]["local_dtype"][1]
    assert "rank 1 could not normalize" in ranks[0]["mismatch"]["errors"]["local_dtype"][1]


# --- Four ranks: sub-groups, and a world of four with an empty rank ------------------------------------

GROUP_CASES = [Case("group_a", (2, 3)), Case("group_b", (1, 4), channels_last=True)]
WORLD4_CASE = Case("world_of_four", (1, 2, 0, 5), dtype=torch.float64)


def _scenario_groups(rank, world, store, device):
    counter = CollectiveCounter()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = rank // 2
    case = GROUP_CASES[mine]
    result = {case.name: run_sync_case(case, rank % 2, counter, group=groups[mine])}
    result[WORLD4_CASE.name] = run_sync_case(WORLD4_CASE, rank, counter)
    stranger = nk.SyncBatchNorm(4, process_group=groups[1 - mine])
    result["not_a_member"] = _expect_error(lambda: stranger(torch.randn(2, 4)))
    return result


def test_sub_groups_and_four_ranks(tmp_path):
    """Ranks {0, 1} and {2, 3} synchronize within their own group only."""
    ranks = run_ranks(4, _scenario_groups, tmp_path)
    check_case(GROUP_CASES[0], [ranks[0]["group_a"], ranks[1]["group_a"]])
    check_case(GROUP_CASES[1], [ranks[2]["group_b"], ranks[3]["group_b"]])
    check_case(WORLD4_CASE, [r[WORLD4_CASE.name] for r in ranks])
    for result in ranks:
        name, message = result["not_a_member"]
        assert name == ConfigError.__name__ and "not a member" in message, message

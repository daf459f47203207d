"""Local BatchNorm vs SyncBatchNorm under DistributedDataParallel, with a small batch per process.

    torchrun --nproc-per-node 4 -m normkit.lab.ddp                      # 4 ranks x 2 digits
    torchrun --nproc-per-node 4 -m normkit.lab.ddp --dataset fashion-mnist --steps 1500
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m normkit.lab.ddp --backend nccl                                 # the same on GPUs

Every rank trains the same small CNN (same seed) on its own slice of each global batch: the
global batch is drawn from one seeded generator that every rank replays, and rank r takes images
[r*B, (r+1)*B). The run trains twice with identical data and initial weights: once with local
``nk.BatchNorm2d`` (each rank normalizes with the statistics of its B images) and once with
``nk.SyncBatchNorm`` (statistics of all B x K images, exactly as one process with the global batch
would). Rank 0 evaluates both in eval mode on the test set and prints the comparison. With B = 2-4
the local statistics are noisy and their running averages, used at test time, are those of tiny
batches (Ioffe & Szegedy 2015, §3.1; Wu & He 2018, Fig. 1): that is the effect to look at.

Without torchrun it runs as one process (where SyncBatchNorm is BatchNorm) and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import normkit as nk
from normkit.lab import datasets


def small_cnn(in_channels: int, classes: int, width: int) -> nn.Module:
    """Three conv -> BatchNorm -> ReLU blocks, global average pooling, a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nk.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nk.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False),
        nk.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def load(name: str, data_dir: str | None):
    """``(x_train, y_train, x_test, y_test)`` as (N, 1, H, W) float32 images and int64 labels."""
    if name == "digits":
        x_train, y_train, x_test, y_test = datasets.load_digits()
        images = [torch.from_numpy(x).view(-1, 1, 8, 8) for x in (x_train, x_test)]
        return images[0], torch.from_numpy(y_train), images[1], torch.from_numpy(y_test)
    data = datasets.load_fashion_mnist(data_dir)
    return data.x_train, data.y_train, data.x_test, data.y_test


def train(variant: str, data, args, rank: int, world: int, device: torch.device) -> dict:
    """Train one variant ("local" or "sync") and evaluate it; every rank returns the same keys."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = small_cnn(x_train.shape[1], int(y_train.max()) + 1, args.width)
    if variant == "sync":
        model = nk.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    order = torch.Generator().manual_seed(args.seed)  # every rank draws the same global batches
    mine = slice(rank * args.batch_per_rank, (rank + 1) * args.batch_per_rank)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(len(y_train), (args.batch_per_rank * world,), generator=order)[mine]
        x, y = x_train[batch].to(device), y_train[batch].to(device)
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if step == 0:
            start = time.perf_counter()  # time the steady state, not the first step
    elapsed = time.perf_counter() - start
    tail = torch.stack(losses[-args.steps // 5 :]).mean()
    if world > 1:  # the training loss of the global batch, averaged over the ranks
        dist.all_reduce(tail)
        tail /= world
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x.to(device)) for x in x_test.split(1024)])
        test_loss = F.cross_entropy(logits, y_test.to(device)).item()
        accuracy = (logits.argmax(1).cpu() == y_test).double().mean().item()
    return {
        "norm": "SyncBatchNorm" if variant == "sync" else "BatchNorm (local)",
        "test_accuracy": accuracy,
        "test_loss": test_loss,
        "train_loss_last_fifth": float(tail),
        "ms_per_step": 1e3 * elapsed / max(args.steps - 1, 1),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node K -m normkit.lab.ddp",
        description="Local BatchNorm vs SyncBatchNorm under DDP with a small batch per process.",
    )
    parser.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits")
    parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST's IDX files are")
    parser.add_argument("--batch-per-rank", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--variants", default="local,sync", help="comma-separated: local, sync")
    parser.add_argument("--json", default=None, help="also write the results here (rank 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched:
        timeout = datetime.timedelta(seconds=300)
        dist.init_process_group(args.backend, timeout=timeout)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    data = load(args.dataset, args.data_dir)
    results = [
        train(variant, data, args, rank, world, device) for variant in args.variants.split(",")
    ]
    if rank == 0:
        report(results, args, world)
    if launched:
        dist.destroy_process_group()
    return results


def report(results: list[dict], args: argparse.Namespace, world: int) -> None:
    print(
        f"normkit lab ddp: {world} rank(s) ({args.backend}), {args.dataset}, "
        f"{args.batch_per_rank} images per rank (global batch {args.batch_per_rank * world}), "
        f"{args.steps} steps, seed {args.seed}"
    )
    if world == 1:
        print("(one process: SyncBatchNorm is BatchNorm here; launch with torchrun for K ranks)")
    header = f"{'norm':20s} {'test acc':>9s} {'test loss':>10s} {'train loss':>11s} {'ms/step':>8s}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['norm']:20s} {100 * r['test_accuracy']:8.1f}% {r['test_loss']:10.3f} "
            f"{r['train_loss_last_fifth']:11.3f} {r['ms_per_step']:8.1f}"
        )
    print("train loss: mean over the last fifth of the steps and over the ranks")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"world": world, "args": vars(args), "results": results}, file, indent=2)


if __name__ == "__main__":
    main()

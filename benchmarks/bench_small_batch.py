"""The small-batch layers on the CPU, each against its baseline in the same process (issue "Small
batches, solved", its performance targets):

- ``rms``: nk.RMSNorm against torch.nn.RMSNorm at (4096, 4096) and (8, 512, 4096), float32 and
  bfloat16, forward (no grad) and forward + backward; target <= 1.0;
- ``frn``, ``evonorm_b0``, ``evonorm_s0``: against timm's FilterResponseNormTlu2d, EvoNorm2dB0 and
  EvoNorm2dS0 at (32, 64, 56, 56) float32, NCHW and channels_last; target <= 1.0;
- ``ws_conv``: StdConv2d(64, 64, 3) against Conv2d on (32, 64, 56, 56): forward + backward in
  training (target <= 1.1) and the eval forward under no_grad (target <= 1.0, the weight
  standardized once);
- ``mabn``, ``cbn``: forward + backward against BatchNorm2d at (32, 64, 56, 56) (target <= 1.5);
  CBN with a full window of 8, without compensation (the layer alone), and with it behind its 3x3
  convolution against the convolution and BatchNorm2d (the two weight-gradient passes of the
  Taylor compensation included);
- ``accumulate``: one micro-batch's forward + backward of a small ConvNet (four conv + BN blocks,
  batch 8 of 3 x 32 x 32) inside ``nk.accumulate`` against the same without it; target <= 1.05.

Every row alternates its providers for several rounds and keeps the median of each (wall time and
this process's CPU time, the steadier on a shared machine); ratios are normkit / baseline. timm is
imported through the tests' torchvision shim (tests/conftest.py), as the tests do.

    python benchmarks/bench_small_batch.py                # every row (about five minutes, 2 cores)
    python benchmarks/bench_small_batch.py --only rms     # rows whose name contains "rms"
    python benchmarks/bench_small_batch.py --quick        # one short round, a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import normkit as nk
from environment import environment
from timing import time_call

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 64, 56, 56)


def _timm_layers():
    """timm.layers, with the tests' shim for a torchvision whose compiled ops do not load."""
    spec = importlib.util.spec_from_file_location(
        "normkit_tests_conftest", ROOT / "tests/conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import timm.layers

    return timm.layers


@dataclass(frozen=True)
class Row:
    """One comparison: ``make()`` returns ``{provider: step}``, the baseline first; ``target`` is
    the bound on normkit / baseline."""

    name: str
    make: Callable[[], dict[str, Callable[[], object]]]
    target: float


def _train(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    module.train()

    def step():
        leaf = x.detach().requires_grad_(True)
        module(leaf).backward(dy)

    return step


def _infer(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    module.eval()

    def step():
        with torch.no_grad():
            return module(x)

    return step


def _input(shape, dtype=torch.float32, channels_last=False):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --- rows -------------------------------------------------------------------------------------------


def _rms(shape, dtype, train):
    def make():
        x = _input(shape, dtype)
        theirs, ours = torch.nn.RMSNorm(shape[-1]).to(dtype), nk.RMSNorm(shape[-1]).to(dtype)
        if not train:
            return {"torch": _infer(theirs, x), "normkit": _infer(ours, x)}
        dy = torch.randn_like(x)
        return {"torch": _train(theirs, x, dy), "normkit": _train(ours, x, dy)}

    return make


def _timm_pair(name, channels_last, train):
    def make():
        layers = _timm_layers()
        c = SHAPE[1]
        theirs, ours = {
            "frn": (
                layers.FilterResponseNormTlu2d(c, eps=1e-5),
                nk.FilterResponseNorm(c, eps=1e-5),
            ),
            "evonorm_b0": (layers.EvoNorm2dB0(c, eps=1e-3), nk.EvoNormB0(c, eps=1e-3)),
            "evonorm_s0": (layers.EvoNorm2dS0(c), nk.EvoNormS0(c)),
        }[name]
        x = _input(SHAPE, channels_last=channels_last)
        if not train:
            return {"timm": _infer(theirs, x), "normkit": _infer(ours, x)}
        dy = torch.randn_like(x)
        return {"timm": _train(theirs, x, dy), "normkit": _train(ours, x, dy)}

    return make


def _ws_conv(train):
    def make():
        torch.manual_seed(0)
        conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        ours = nk.StdConv2d(64, 64, 3, padding=1, bias=False)
        x = _input(SHAPE)
        if not train:
            return {"conv": _infer(conv, x), "normkit": _infer(ours, x)}
        dy = torch.randn_like(x)
        return {"conv": _train(conv, x, dy), "normkit": _train(ours, x, dy)}

    return make


def _versus_batch_norm(build):
    def make():
        x = _input(SHAPE)
        dy = torch.randn_like(x)
        layer = build()
        for _ in range(3):  # past warm-up, windows full
            _train(layer, x, dy)()
        return {"bn": _train(nn.BatchNorm2d(SHAPE[1]), x, dy), "normkit": _train(layer, x, dy)}

    return make


def _conv_then(norm: Callable[[nn.Conv2d], nn.Module]):
    """The 3x3 convolution feeding the normalization, forward + backward of both, against the same
    convolution followed by BatchNorm2d."""

    def make():
        torch.manual_seed(0)
        u = _input(SHAPE)
        dy = torch.randn_like(u)
        conv_a = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        conv_b = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        conv_b.load_state_dict(conv_a.state_dict())
        baseline = nn.Sequential(conv_a, nn.BatchNorm2d(64))
        ours = nn.Sequential(conv_b, norm(conv_b))
        for _ in range(8):  # the window full
            _train(ours, u, dy)()
        return {"conv+bn": _train(baseline, u, dy), "normkit": _train(ours, u, dy)}

    return make


def _accumulate():
    def small_net():
        torch.manual_seed(0)
        layers, c = [], 3
        for out in (32, 64, 64, 128):
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))

    def make():
        x = _input((8, 3, 32, 32))
        target = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
        plain, inside = small_net(), small_net()
        context = nk.accumulate(inside, micro_batches=4)
        context.__enter__()  # entered once, as a loop would; every 4th micro-batch ends a step

        def step(model):
            def run():
                loss = nn.functional.cross_entropy(model(x), target)
                loss.backward()

            return run

        return {"plain": step(plain), "normkit": step(inside)}

    return make


ROWS: list[Row] = []
for _shape in ((4096, 4096), (8, 512, 4096)):
    for _dtype in (torch.float32, torch.bfloat16):
        for _train_mode in (False, True):
            _label = "x".join(map(str, _shape))
            _kind = "fwd+bwd" if _train_mode else "fwd"
            ROWS.append(
                Row(
                    f"rms {_label} {str(_dtype)[6:]} {_kind}",
                    _rms(_shape, _dtype, _train_mode),
                    1.0,
                )
            )
for _name in ("frn", "evonorm_b0", "evonorm_s0"):
    for _cl in (False, True):
        for _train_mode in (False, True):
            _label = f"{_name} {'channels_last' if _cl else 'nchw'} {'fwd+bwd' if _train_mode else 'fwd'}"
            ROWS.append(Row(_label, _timm_pair(_name, _cl, _train_mode), 1.0))
ROWS += [
    Row("ws_conv train fwd+bwd", _ws_conv(True), 1.1),
    Row("ws_conv eval fwd", _ws_conv(False), 1.0),
    Row(
        "mabn fwd+bwd",
        _versus_batch_norm(lambda: nk.MovingAverageBatchNorm(64, window=2, warmup_iters=1)),
        1.5,
    ),
    Row(
        "cbn fwd+bwd (window 8, no compensation)",
        _versus_batch_norm(lambda: nk.CrossIterationBatchNorm(64, compensate=False)),
        1.5,
    ),
    Row(
        "conv3x3+cbn fwd+bwd (window 8, compensated)",
        _conv_then(lambda conv: nk.CrossIterationBatchNorm(64).attach(conv)),
        float("nan"),
    ),
    Row("accumulate micro-batch fwd+bwd", _accumulate(), 1.05),
]


# --- measuring ------------------------------------------------------------------------------------


def measure(row: Row, rounds: int, min_run_time: float) -> dict:
    providers = row.make()
    wall: dict[str, list[float]] = {name: [] for name in providers}
    cpu: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(rounds):  # alternate providers so drift hits them all alike
        for name, step in providers.items():
            step()  # warm-up
            seconds, cpu_seconds = time_call(step, min_run_time)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    baseline = next(iter(providers))
    ms = {name: statistics.median(values) * 1e3 for name, values in wall.items()}
    cpu_ms = {name: statistics.median(values) * 1e3 for name, values in cpu.items()}
    return {
        "name": row.name,
        "baseline": baseline,
        "ms": ms,
        "cpu_ms": cpu_ms,
        "ratio": ms["normkit"] / ms[baseline],
        "cpu_ratio": cpu_ms["normkit"] / cpu_ms[baseline],
        "target": row.target,
    }



def print_table(results: list[dict]) -> None:
    header = (
        f"{'row':48s} {'baseline':>9s} {'base ms':>9s} {'normkit ms':>11s} {'ratio':>6s} "
        f"{'cpu ratio':>9s} {'target':>7s}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        base = r["baseline"]
        target = "" if r["target"] != r["target"] else f"{r['target']:.2f}"
        print(
            f"{r['name']:48s} {base:>9s} {r['ms'][base]:9.2f} {r['ms']['normkit']:11.2f} "
            f"{r['ratio']:6.2f} {r['cpu_ratio']:9.2f} {target:>7s}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 0.1 s per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="only rows whose name contains this")
    parser.add_argument(
        "--accumulation-report",
        action="store_true",
        help="print what nk.accumulate makes equal to the large batch (docs/accumulate.md)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/bench_small_batch.json")
    )
    args = parser.parse_args(argv)
    if args.accumulation_report:
        print(json.dumps(accumulation_report(), indent=2))
        return
    torch.set_num_threads(args.threads)
    rounds, min_run_time = (1, 0.1) if args.quick else (args.rounds, args.min_run_time)
    results = []
    for row in ROWS:
        if args.only in row.name:
            results.append(measure(row, rounds, min_run_time))
            print(f"measured {row.name}", file=sys.stderr)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "results": results}, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)


# --- what nk.accumulate makes equal to the large batch, and what not (docs/accumulate.md) ---------


def accumulation_report(micro: int = 4, accumulate_steps: int = 16, steps: int = 20) -> dict:
    """A small ConvNet trained ``steps`` optimizer steps on batches of ``micro`` x
    ``accumulate_steps`` samples three ways from the same start, plus the large batch itself:
    plain accumulation, nk.accumulate, and nk.accumulate(whole_batch=True). Measures, in float64,
    relative to one pass over the large batch at the same weights: the running statistics after
    each way's steps (with SGD steps of lr 0, so the weights, hence the data each layer sees,
    are the same), the training-mode outputs, and the parameter gradients of one step."""
    torch.manual_seed(0)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        ).double()  # fmt: skip

    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(micro * accumulate_steps, 3, 16, 16, generator=generator, dtype=torch.float64)
         * 2 + 0.5,
         torch.randint(0, 10, (micro * accumulate_steps,), generator=generator))
        for _ in range(steps)
    ]  # fmt: skip

    def run(mode: str):
        model = net()
        outputs, grads = [], None
        for step, (x, y) in enumerate(batches):
            model.zero_grad()
            if mode == "large":
                out = model(x)
                nn.functional.cross_entropy(out, y, reduction="sum").backward()
                outs = [out]
            else:
                outs = []
                context = (
                    nk.accumulate(model, micro_batches=accumulate_steps,
                                  whole_batch=mode == "whole_batch")
                    if mode != "plain" else None
                )  # fmt: skip
                if context is not None:
                    context.__enter__()
                    if mode == "whole_batch":
                        context.prepare(list(x.split(micro)))
                for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
                    out = model(xs)
                    nn.functional.cross_entropy(out, ys, reduction="sum").backward()
                    outs.append(out)
                if context is not None:
                    context.__exit__(None, None, None)
            if step == 0:
                outputs = torch.cat(outs).detach()
                grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        stats = torch.cat([torch.cat([m.running_mean, m.running_var])
                           for m in model.modules() if isinstance(m, nn.BatchNorm2d)])  # fmt: skip
        return outputs, grads, stats

    results = {mode: run(mode) for mode in ("large", "plain", "accumulate", "whole_batch")}
    large = results["large"]

    def relative(a, b):
        return float((a - b).norm() / b.norm())

    return {
        "setup": {"micro_batch": micro, "micro_batches": accumulate_steps, "steps": steps},
        **{
            mode: {
                "running_statistics": relative(stats, large[2]),
                "training_outputs": relative(outputs, large[0]),
                "gradients": relative(grads, large[1]),
            }
            for mode, (outputs, grads, stats) in results.items()
            if mode != "large"
        },
    }


if __name__ == "__main__":
    main()

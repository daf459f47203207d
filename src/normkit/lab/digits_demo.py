"""The demo: a sigmoid MLP with and without batch normalization on scikit-learn's 8x8 digits.

A small replay of Ioffe & Szegedy (2015), Fig. 1 and §4.2.1: three hidden layers of 100 sigmoid units,
small Gaussian initial weights, plain SGD on mini-batches of 60, one network with ``nk.BatchNorm1d``
before each sigmoid (its Linear has no bias: β takes that role, §3.2) and one without, at learning
rates from moderate to 80 times larger. The paper's claims to look for: BN trains much faster, and it
keeps training at learning rates where the plain network stalls or diverges. Test accuracy is measured
in eval mode, so BN's numbers use its running statistics (Algorithm 2).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import normkit as nk


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; the defaults finish in about 15 s on two CPU cores."""

    learning_rates: tuple[float, ...] = (0.1, 0.5, 2.0, 8.0)
    steps: int = 2000
    batch_size: int = 60
    hidden: int = 100
    init_std: float = 0.05  # "small random Gaussian values" (the paper gives no number)
    eval_every: int = 250
    target_accuracy: float = 0.9
    seed: int = 0


@dataclass
class RunResult:
    """One training run: which network, its learning rate and its test-accuracy curve."""

    batch_norm: bool
    learning_rate: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, test accuracy)
    final_loss: float = float("nan")
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.curve[-1][1]

    def steps_to(self, accuracy: float) -> int | None:
        """The first evaluated step at which test accuracy reached ``accuracy``, or None."""
        return next((step for step, value in self.curve if value >= accuracy), None)


def build_mlp(batch_norm: bool, config: DemoConfig, in_features: int = 64, classes: int = 10):
    """64 -> 100 -> 100 -> 100 -> 10 with sigmoids; BN before each sigmoid when asked."""
    generator = torch.Generator().manual_seed(config.seed)
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(3):
        linear = nn.Linear(width, config.hidden, bias=not batch_norm)
        layers.append(linear)
        if batch_norm:
            layers.append(nk.BatchNorm1d(config.hidden))
        layers.append(nn.Sigmoid())
        width = config.hidden
    layers.append(nn.Linear(width, classes))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.weight.mul_(config.init_std)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train_run(
    batch_norm: bool,
    learning_rate: float,
    data: Sequence[torch.Tensor],
    config: DemoConfig,
    on_step: Callable[[], None] | None = None,
) -> RunResult:
    """Train one network with plain SGD and record eval-mode test accuracy along the way."""
    x_train, y_train, x_test, y_test = data
    model = build_mlp(batch_norm, config, x_train.shape[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    batches = torch.Generator().manual_seed(config.seed + 1)
    result = RunResult(batch_norm, learning_rate)
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        index = torch.randint(0, len(x_train), (config.batch_size,), generator=batches)
        model.train()
        loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.eval_every == 0 or step == config.steps:
            result.curve.append((step, accuracy(model, x_test, y_test)))
        if on_step is not None:
            on_step()
    result.final_loss = loss.item()
    result.seconds = time.perf_counter() - start
    return result


def load_data(seed: int = 0) -> list[torch.Tensor]:
    from normkit.lab.datasets import load_digits

    return [torch.from_numpy(a) for a in load_digits(seed=seed)]


def run_demo(
    config: DemoConfig = DemoConfig(), on_step: Callable[[], None] | None = None
) -> list[RunResult]:
    """Every learning rate, with and without BN, on the same data, initial weights and batches."""
    torch.manual_seed(config.seed)
    data = load_data(config.seed)
    return [
        train_run(batch_norm, lr, data, config, on_step)
        for lr in config.learning_rates
        for batch_norm in (False, True)
    ]


def summarize(results: list[RunResult], config: DemoConfig) -> dict:
    """JSON-ready results and the comparison they support."""

    def best(batch_norm: bool) -> RunResult:
        runs = [r for r in results if r.batch_norm == batch_norm]
        return max(runs, key=lambda r: r.final_accuracy)

    plain, normalized = best(False), best(True)
    return {
        "config": asdict(config),
        "runs": [
            {
                "batch_norm": r.batch_norm,
                "learning_rate": r.learning_rate,
                "final_test_accuracy": r.final_accuracy,
                "steps_to_target": r.steps_to(config.target_accuracy),
                "final_train_loss": r.final_loss,
                "seconds": r.seconds,
                "curve": r.curve,
            }
            for r in results
        ],
        "best_plain": {"learning_rate": plain.learning_rate, "accuracy": plain.final_accuracy},
        "best_batch_norm": {
            "learning_rate": normalized.learning_rate,
            "accuracy": normalized.final_accuracy,
        },
        "learning_rates_reaching_target": {
            "plain": [
                r.learning_rate
                for r in results
                if not r.batch_norm and r.steps_to(config.target_accuracy)
            ],
            "batch_norm": [
                r.learning_rate
                for r in results
                if r.batch_norm and r.steps_to(config.target_accuracy)
            ],
        },
    }

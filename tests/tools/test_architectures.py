"""Small real architectures for the model tools' tests, built here (no downloads), and checks that
they are what the tests need: trained running statistics and γ/β away from their initial values.

Each architecture mixes torch.nn's and normkit's BatchNorm, so every tool is exercised on both.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import normkit as nk


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016): conv-BN-ReLU-conv-BN plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nk.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nk.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet() -> nn.Module:
    """A ResNet-style network on (N, 3, 16, 16): stem, two blocks (one downsampling), head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8, 8),
        BasicBlock(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project (each with BN), residual add."""

    def __init__(self, channels: int, expand: int = 2):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nk.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(
            nn.Conv2d(hidden, channels, 1, bias=False), nk.BatchNorm2d(channels)
        )

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


def mobilenet() -> nn.Module:
    """Depthwise-separable blocks (MobileNet v1 style) and an inverted residual, on (N, 3, 16, 16)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),
        nk.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),  # depthwise
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 12, 1, bias=False),  # pointwise
        nk.BatchNorm2d(12),
        nn.ReLU6(),
        InvertedResidual(12),
    )


def decoder() -> nn.Module:
    """A ConvTranspose decoder (N, 16, 4, 4) -> (N, 3, 16, 16), one transposed conv grouped and with a
    bias, one without bias."""
    return nn.Sequential(
        nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 4, 2, 1, groups=2),
        nk.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 3, 3, 1, 1),
    )


def mlp() -> nn.Module:
    """An MLP with BatchNorm1d after each hidden Linear, on (N, 20)."""
    return nn.Sequential(
        nn.Linear(20, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 16),
        nk.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


class SharedNorm(nn.Module):
    """One BatchNorm used after two convolutions (a layer reused in forward)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, 1)
        self.bn = nk.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv1(x))) + self.bn(self.conv2(x))


def bn_after_relu() -> nn.Module:
    """conv → ReLU → BN → conv: the BN has no layer to fold into before it."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 4, 3, padding=1),
    )


ARCHITECTURES = {
    "resnet": (resnet, (4, 3, 16, 16)),
    "mobilenet": (mobilenet, (4, 3, 16, 16)),
    "decoder": (decoder, (4, 16, 4, 4)),
    "mlp": (mlp, (8, 20)),
    "shared_norm": (SharedNorm, (4, 3, 8, 8)),
    "bn_after_relu": (bn_after_relu, (4, 3, 8, 8)),
}


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def trained(model: nn.Module, shape, steps: int = 4, seed: int = 0) -> nn.Module:
    """``model`` with running statistics from a few training-mode batches (inputs away from zero
    mean and unit variance), γ and β drawn away from 1 and 0, and in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in batch_norms(model):
            m.momentum = 0.5
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.5)
        model.train()
        for _ in range(steps):
            model(torch.randn(shape, generator=generator) * 2 + 0.5)
    return model.eval()


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A trained, eval-mode architecture and an input for it."""
    factory, shape = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = trained(factory(), shape, seed=seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)) * 2 + 0.5
    return model, x


def exact(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output computed in float64 (the oracle the float32 results are held to)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def test_architectures_are_trained_and_in_eval_mode():
    for name in ARCHITECTURES:
        model, x = build(name)
        assert not model.training
        norms = batch_norms(model)
        assert norms, name
        for m in norms:
            assert int(m.num_batches_tracked) > 0, name
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var)), name
            assert not torch.allclose(m.weight, torch.ones_like(m.weight)), name
        assert torch.isfinite(model(x)).all(), name

"""torch.ao quantization of a normkit model: ``nk.tools.convert(model, "torch")`` is the one call
that gives torch.ao what its fusion and quantization know (torch.nn's BatchNorm, and a BatchNorm +
activation layer as BatchNorm then an activation module); then eager fusion, FX PTQ and FX QAT run."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import normkit as nk
from helpers import assert_close

quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")
quantization = pytest.importorskip("torch.ao.quantization")
if "x86" not in torch.backends.quantized.supported_engines:  # pragma: no cover
    pytest.skip("no x86 quantized engine on this machine", allow_module_level=True)


class Net(nn.Module):
    """conv → nk.BatchNorm2d → ReLU, conv → nk.BatchNormAct(relu), pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nk.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nk.BatchNormAct(8, activation="relu")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.bn2(self.conv2(x))).flatten(1))


def _trained() -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return model.eval(), torch.randn(16, 3, 8, 8) * 2 + 0.5


def _sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    noise = (actual - reference).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


def test_convert_to_torch_keeps_the_output_and_gives_torch_ao_its_patterns():
    model, x = _trained()
    converted, replaced = nk.tools.convert(model, "torch", example_inputs=x)
    assert not replaced.skipped and type(converted.bn1) is nn.BatchNorm2d
    assert type(converted.bn2.norm) is nn.BatchNorm2d and type(converted.bn2.act) is nn.ReLU
    with torch.no_grad():
        assert_close(converted(x), model(x), torch.float32)
    fused = quantize_fx.fuse_fx(copy.deepcopy(converted))  # conv-bn-relu, twice
    kinds = {type(m).__name__ for m in fused.modules()}
    assert "ConvReLU2d" in kinds and "BatchNorm2d" not in kinds
    eager = quantization.fuse_modules(
        copy.deepcopy(converted), [["conv1", "bn1", "relu"], ["conv2", "bn2.norm", "bn2.act"]]
    )
    assert type(eager.conv2).__name__ == "ConvReLU2d"
    with torch.no_grad():
        assert_close(fused(x), model(x), torch.float32)
        assert_close(eager(x), model(x), torch.float32)


def test_post_training_quantization_round_trip():
    """PTQ (x86 int8, per-channel weights, calibrated on 8 batches) of the converted model. Bound:
    SQNR >= 20 dB (noise 1% of the signal's power). 8-bit activations alone give ~40 dB per
    tensor; four quantized layers compound to ~30 dB here. A lost activation or an unfolded BN
    statistic gives about 0 dB."""
    model, x = _trained()
    converted, _ = nk.tools.convert(model, "torch", example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        prepared = quantize_fx.prepare_fx(
            copy.deepcopy(converted), quantization.get_default_qconfig_mapping("x86"), (x,)
        )
        with torch.no_grad():
            for _ in range(8):
                prepared(torch.randn(16, 3, 8, 8) * 2 + 0.5)
        quantized = quantize_fx.convert_fx(prepared)
    assert any(".quantized." in type(m).__module__ for m in quantized.modules())
    with torch.no_grad():
        assert _sqnr_db(model(x), quantized(x)) >= 20.0


def test_quantization_aware_training_prepares_and_trains():
    model, x = _trained()
    converted, _ = nk.tools.convert(model.train(), "torch", example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_qat_fx(
            converted, quantization.get_default_qat_qconfig_mapping("x86"), (x,)
        )
    assert "ConvBnReLU2d" in {type(m).__name__ for m in prepared.modules()}
    prepared(x).sum().backward()
    assert prepared.conv1.weight.grad is not None

"""BatchNorm + activation layers under the tools: every conversion and fold keeps what the layer
computes besides its normalization (activation, residual, InPlaceABN's floored γ), or refuses; and
every tool returns a copy unless inplace=True, leaving the model given as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from test_architectures import build, exact, trained
from torch import nn

import normkit as nk
from helpers import assert_close
from normkit.tools import NormAct, convert, fold_batchnorm, freeze

SHAPE = (8, 4, 5, 5)


def _act_layers():
    """normkit's BatchNorm + activation layers, trained, with γ and β away from 1 and 0."""
    layers = {
        "relu": nk.BatchNormAct(4, activation="relu"),
        "silu": nk.BatchNormAct(4, activation="silu"),
        "gelu": nk.BatchNormAct(4, activation="gelu"),
        "leaky": nk.BatchNormAct(4, activation="leaky_relu", activation_param=0.2),
        "abn": nk.InPlaceABN(4, activation="leaky_relu", activation_param=0.1, inplace=False),
        "abn_elu": nk.InPlaceABN(4, activation="elu", activation_param=0.5, inplace=False),
    }
    return {name: trained(nn.Sequential(layer), SHAPE) for name, layer in layers.items()}


def _output(model, x, *rest):
    with torch.no_grad():
        return copy.deepcopy(model)(x.clone(), *rest)


@pytest.mark.parametrize("name", list(_act_layers()))
@pytest.mark.parametrize("to", ["frozen", "renorm", "sync", "torch"])
def test_conversions_with_the_same_eval_map_keep_the_output(name, to):
    """Frozen BN, Batch Renorm, SyncBN and torch's BN all equal BatchNorm in eval mode: with
    the activation kept, the converted model must give the same output (today freeze dropped it:
    nk.BatchNormAct(activation="relu") then gave negative outputs)."""
    model = _act_layers()[name]
    x = torch.randn(SHAPE) * 2 + 0.5
    converted, replaced = convert(model, to, example_inputs=x)
    (record,) = replaced
    assert isinstance(converted[0], NormAct) and record.kept, record
    assert "activation" in record.kept[0]
    # float32 against the float32 original: the split layer runs the same maths unfused (1e-5).
    assert_close(_output(converted, x), _output(model, x), torch.float32)


def test_freeze_keeps_a_relu(tmp_path):
    """The issue's reproducer."""
    model = nn.Sequential(nk.BatchNormAct(4, activation="relu")).eval()
    frozen, replaced = freeze(model)
    x = torch.randn(SHAPE)
    assert frozen(x).min() >= 0 and replaced[0].kept == ["activation ReLU()"]
    frozen.train()  # frozen: the same map in training mode, activation included
    assert frozen(x).min() >= 0
    torch.save(frozen, tmp_path / "frozen.pt")  # a NormAct pickles like any module
    again = torch.load(tmp_path / "frozen.pt", weights_only=False)
    assert torch.equal(again(x), frozen(x))


def test_group_norm_conversion_keeps_the_activation():
    """A change of normalizer changes the normalization, never the activation after it."""
    model = _act_layers()["relu"]
    converted, (record,) = convert(model, "group:2")
    assert isinstance(converted[0].norm, nk.GroupNorm) and isinstance(converted[0].act, nn.ReLU)
    x = torch.randn(SHAPE)
    expected = torch.relu(converted[0].norm(x))
    assert torch.equal(converted(x), expected) and converted(x).min() >= 0
    assert record.source == "nk.BatchNormAct" and record.target == "nk.GroupNorm"


def test_in_place_abn_keeps_its_floored_gamma():
    """InPlaceABN computes with |γ| floored at min_abs_weight: the converted layer must too."""
    model = _act_layers()["abn"]
    with torch.no_grad():
        model[0].weight[:2] = torch.tensor([0.0, -1e-5])  # below min_abs_weight = 1e-3
    converted, (record,) = freeze(model)
    assert converted[0].norm.weight[:2].tolist() == pytest.approx([1e-3, -1e-3])
    assert any("floored" in kept for kept in record.kept)
    x = torch.randn(SHAPE)
    assert_close(_output(converted, x), _output(model, x), torch.float32)


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(3, 4, 1)
        self.bn = nk.BatchNormAct(4, activation="relu", residual=True)

    def forward(self, x):
        return self.bn(self.conv(x), self.shortcut(x))


def _residual_block():
    model = ResidualBlock()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6) * 2 + 0.5)
    return model.eval()


def test_the_residual_input_is_kept_by_convert_and_fold():
    model = _residual_block()
    x = torch.randn(2, 3, 6, 6)
    frozen, (record,) = freeze(model)
    assert frozen.bn.residual and "residual" in record.kept[-1]
    assert_close(_output(frozen, x), exact(model, x), torch.float32)
    folded, report = fold_batchnorm(model, x)
    assert [(f.norm, f.into) for f in report.folded] == [("bn", "conv")]
    assert type(folded) is ResidualBlock and isinstance(folded.bn, NormAct)
    assert isinstance(folded.bn.norm, nn.Identity) and folded.bn.residual
    assert_close(_output(folded, x), exact(model, x), torch.float32)


@pytest.mark.parametrize("name", list(_act_layers()))
def test_fold_keeps_the_activation_of_normkits_layers(name):
    layer = _act_layers()[name][0]
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), layer), (8, 3, 7, 7))
    x = torch.randn(4, 3, 7, 7)
    folded, report = fold_batchnorm(model, x)
    assert len(report.folded) == 1 and not report.left and report.graph_module is None
    assert isinstance(folded[1], NormAct) and isinstance(folded[1].norm, nn.Identity)
    assert not any(k.startswith("1.") for k in folded.state_dict())  # the BN's tensors are gone
    assert_close(_output(folded, x), _output(model, x), torch.float32)


class ShiftedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass that computes something else: no tool may treat it as BatchNorm."""

    def forward(self, x):
        return super().forward(x) + 1


def test_a_forward_normkit_does_not_know_is_refused_not_changed():
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), ShiftedBatchNorm(4)), (8, 3, 7, 7))
    x = torch.randn(2, 3, 7, 7)
    for to in ("frozen", "group:2", "torch", "normkit"):
        converted, replaced = convert(model, to, which="batch")
        assert not replaced and "overrides forward" in replaced.skipped[0].reason, to
        assert type(converted[1]) is ShiftedBatchNorm
    folded, report = fold_batchnorm(model, x)
    assert not report.folded and "overrides forward" in report.left[0].reason
    _, bias_report = nk.tools.remove_redundant_bias(model)
    assert not bias_report.removed and "overrides forward" in bias_report.kept[0].reason
    assert torch.equal(_output(folded, x), _output(model, x))


def test_a_callable_gets_the_normalization_alone_and_the_activation_stays():
    model = _act_layers()["relu"]
    seen = []

    def to_frozen(layer):
        seen.append(type(layer))
        return nk.FrozenBatchNorm.from_batch_norm(layer)

    converted, _ = convert(model, to_frozen)
    assert seen == [nk.BatchNorm] and isinstance(converted[0].act, nn.ReLU)


class _HookCounter:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1


class Untraceable(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it, so the tools fall back
    to nn.Sequential neighbours, where every Conv2d subclass is a candidate producer."""

    def forward(self, x):
        return x if x.sum() > -1e9 else -x


def test_fold_leaves_a_batch_norm_with_hooks_and_producers_that_transform_their_weight():
    class StandardizedConv(nn.Conv2d):  # as timm's StdConv2d: folding s·W would be undone
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    model = trained(
        nn.Sequential(Untraceable(), StandardizedConv(3, 4, 3), nn.BatchNorm2d(4),
                      nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), (8, 3, 7, 7)
    )  # fmt: skip
    model[4].register_forward_hook(_HookCounter())
    x = torch.randn(2, 3, 7, 7)
    folded, report = fold_batchnorm(model, x)
    reasons = {item.norm: item.reason for item in report.left}
    assert not report.traced and not report.folded and set(reasons) == {"2", "4"}
    assert "overrides Conv2d's forward" in reasons["2"] and "hooks" in reasons["4"]
    assert torch.equal(_output(folded, x), _output(model, x))


def test_fold_leaves_a_producer_whose_hook_recomputes_its_weight():
    import torch.nn.utils.prune as prune

    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (8, 3, 7, 7))
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # a pre-hook computes W ⊙ mask
    x = torch.randn(2, 3, 7, 7)
    folded, report = fold_batchnorm(model, x)
    assert not report.folded and "hooks" in report.left[0].reason
    assert torch.equal(_output(folded, x), _output(model, x))


@pytest.mark.parametrize("parametrization", ["weight_norm", "spectral_norm"])
def test_fold_under_a_parametrization_folds_its_current_weight(parametrization):
    """The issue's reproducer crashed with KeyError: attribute 'weight' already exists."""
    wrap = getattr(torch.nn.utils.parametrizations, parametrization)
    model = trained(nn.Sequential(wrap(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)), (8, 3, 7, 7))
    x = torch.randn(2, 3, 7, 7)
    expected = exact(model, x)
    folded, report = fold_batchnorm(model, x)
    (done,) = report.folded
    assert done.into == "0" and "parametrization of 'weight' was removed" in done.note
    assert type(folded[0]) is nn.Conv2d and isinstance(folded[1], nn.Identity)
    assert_close(_output(folded, x), expected, torch.float32)
    assert_close(_output(model, x), expected, torch.float32)  # the original still works
    assert torch.nn.utils.parametrize.is_parametrized(model[0])


def test_fold_leaves_a_spectral_norm_in_training_mode():
    model = trained(
        nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3)),
                      nn.BatchNorm2d(4)), (8, 3, 7, 7)
    )  # fmt: skip
    model[0].train()  # its power iteration changes the weight at every call
    _, report = fold_batchnorm(model)
    assert not report.folded and "training mode" in report.left[0].reason


def test_fold_measures_the_error_on_the_inputs_given_even_when_the_model_writes_over_them():
    model = trained(nn.Sequential(nk.InPlaceABN(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                    (8, 3, 7, 7))  # fmt: skip
    x = torch.randn(2, 3, 7, 7)
    before = x.clone()
    _, report = fold_batchnorm(model, x)
    assert torch.equal(x, before) and report.max_relative_error < 1e-5
    nk.tools.doctor(model, x)
    assert torch.equal(x, before)


class ReadsItsNorm(nn.Module):
    """A forward that reads the BatchNorm's parameters: only a rewritten graph can drop the BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.mean()


def test_fold_returns_the_models_class_or_says_why_not():
    from test_architectures import BasicBlock

    model = trained(BasicBlock(3, 8, stride=2), (8, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_batchnorm(model, x)
    assert type(folded) is BasicBlock and report.graph_module is None and len(report.folded) == 3
    kept = {k for k in model.state_dict() if "bn" not in k and k != "shortcut.1.weight"}
    assert {k for k in folded.state_dict() if not k.endswith("bias")} == {
        k for k in kept if not k.endswith("bias") and "shortcut.1" not in k
    }
    assert_close(_output(folded, x), exact(model, x), torch.float32)
    other = trained(ReadsItsNorm(), (8, 3, 7, 7))
    x = torch.randn(2, 3, 7, 7)
    folded, report = fold_batchnorm(other, x)
    assert isinstance(folded, torch.fx.GraphModule) and "reads" in report.graph_module
    assert_close(_output(folded, x), exact(other, x), torch.float32)


def _tools():
    batches = [torch.randn(8, 3, 16, 16) * 2 + 0.5 for _ in range(2)]
    return {
        "fold_batchnorm": lambda m, **kw: fold_batchnorm(m, **kw),
        "convert": lambda m, **kw: convert(m, "group:2", **kw),
        "freeze": lambda m, **kw: freeze(m, **kw),
        "remove_redundant_bias": lambda m, **kw: nk.tools.remove_redundant_bias(m, **kw),
        "recalibrate": lambda m, **kw: nk.tools.recalibrate(m, batches, progress=False, **kw),
        "adapt": lambda m, **kw: nk.tools.adapt(m, batches, progress=False, **kw),
    }


@pytest.mark.parametrize("tool", list(_tools()))
def test_every_tool_returns_a_copy_unless_inplace(tool):
    run = _tools()[tool]
    model, x = build("resnet")
    model[0] = nn.Conv2d(3, 8, 3, padding=1)  # a bias before BN, for remove_redundant_bias
    state = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    new, _ = run(model)
    assert new is not model
    assert dict(model.named_modules()) == modules  # same objects at the same paths
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert set(model.state_dict()) == set(state)
    same, _ = run(model, inplace=True)
    assert same is model

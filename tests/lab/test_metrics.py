"""normkit.lab.metrics: ics and landscape_probe on problems with known answers, exact restoration of
model and optimizer, and the activation-percentile recorder.

Known answers are computed in float64 NumPy from the formulas, and the models run in float64, so
they are held to TOLERANCES[float64] (1e-10): a few hundred roundings of a double at most.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normkit as nk
from helpers import TOLERANCES
from normkit.errors import ConfigError
from normkit.lab.metrics import (
    ActivationPercentiles,
    LandscapeProbe,
    ics,
    landscape_probe,
    layer_names,
    preserved,
)

RTOL, ATOL = TOLERANCES[torch.float64]


def close(actual: float, expected: float, scale: float = 1.0) -> bool:
    return abs(actual - expected) <= RTOL * abs(expected) + ATOL * max(scale, 1.0)


def first_output(output, _target):
    return output


# ------------------------------------------------------------------------------ a quadratic bowl


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀ A θ: gradient A θ, Hessian A, smoothness (Lipschitz constant of the gradient)
    the largest eigenvalue of A."""

    def __init__(self, a: np.ndarray, theta: np.ndarray):
        super().__init__()
        self.register_buffer("a", torch.tensor(a))
        self.theta = nn.Parameter(torch.tensor(theta))

    def forward(self, _x):
        return 0.5 * self.theta @ self.a @ self.theta


def spd(eigenvalues, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric matrix with the given eigenvalues, and its eigenvectors (columns)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues),) * 2))
    return q @ np.diag(eigenvalues) @ q.T, q


STEPS = (0.05, 0.1, 0.2, 0.3, 0.4)


def test_quadratic_smoothness_is_the_largest_eigenvalue_along_its_eigenvector():
    eigenvalues = [7.5, 3.0, 1.0, 0.25]
    a, q = spd(eigenvalues)
    model = Quadratic(a, 2.0 * q[:, 0])  # θ on the top eigenvector: g = 7.5 θ
    probe = landscape_probe(model, first_output, (None, None), STEPS)
    assert close(probe.beta_smoothness, 7.5, 7.5)
    assert close(probe.grad_norm, 7.5 * 2.0, 15.0)
    assert close(probe.loss, 0.5 * 7.5 * 4.0, 15.0)


def test_quadratic_probe_matches_the_closed_form_everywhere():
    eigenvalues = [5.0, 2.0, 0.5, 0.1, 0.01]
    a, _ = spd(eigenvalues, seed=1)
    theta = np.random.default_rng(2).standard_normal(5)
    probe = landscape_probe(Quadratic(a, theta), first_output, (None, None), STEPS)
    g = a @ theta
    losses = [0.5 * (theta - eta * g) @ a @ (theta - eta * g) for eta in STEPS]
    changes = [eta * np.linalg.norm(a @ g) for eta in STEPS]  # ∇L(θ - ηg) - g = -η A g
    for actual, expected in zip(probe.losses, losses, strict=True):
        assert close(actual, expected, max(losses))
    for actual, expected in zip(probe.grad_changes, changes, strict=True):
        assert close(actual, expected, max(changes))
    assert probe.loss_range == (min(probe.losses), max(probe.losses))
    assert probe.grad_change_range == (probe.grad_changes[0], probe.grad_changes[-1])
    beta = np.linalg.norm(a @ g) / np.linalg.norm(g)  # the same for every η on a quadratic
    assert close(probe.beta_smoothness, beta, 5.0)
    assert probe.beta_smoothness <= 5.0 * (1 + RTOL)  # never above the largest eigenvalue
    row = probe.as_dict()
    assert row["loss_min"] == min(probe.losses) and row["beta_smoothness"] == probe.beta_smoothness


def test_a_step_that_overflows_makes_the_bands_and_beta_infinite():
    probe = LandscapeProbe((0.1, 0.2, 0.4), 1.0, 2.0, (0.5, math.nan, 3.0), (1.0, math.inf, 2.0))
    assert probe.loss_range == (0.5, math.inf) and probe.grad_change_range == (1.0, math.inf)
    assert probe.beta_smoothness == math.inf
    finite = LandscapeProbe((0.1, 0.2), 1.0, 2.0, (0.5, 0.4), (1.0, 3.0))
    assert finite.loss_range == (0.4, 0.5) and finite.beta_smoothness == 3.0 / (0.2 * 2.0)


def test_zero_gradient_has_no_direction():
    a, _ = spd([1.0, 2.0])
    probe = landscape_probe(Quadratic(a, np.zeros(2)), first_output, (None, None), (0.1,))
    assert probe.grad_norm == 0 and probe.grad_changes == (0.0,)
    assert math.isnan(probe.beta_smoothness)


# ----------------------------------------------------------------- a deep linear network by hand


class LinearNet(nn.Module):
    """x ↦ W_k ... W_2 W_1 x without biases, its layers registered in *reverse* order of use, so
    that "the layers before i" must come from the forward pass, not from the registration order."""

    def __init__(self, weights: list[np.ndarray]):
        super().__init__()
        self.layers = nn.ModuleDict()
        for index in reversed(range(len(weights))):
            layer = nn.Linear(weights[index].shape[1], weights[index].shape[0], bias=False)
            layer.weight = nn.Parameter(torch.tensor(weights[index]))
            self.layers[f"w{index + 1}"] = layer
        self.depth = len(weights)

    def forward(self, x):
        for index in range(self.depth):
            x = self.layers[f"w{index + 1}"](x)
        return x


def half_mse(output, target):
    return 0.5 * (output - target).pow(2).sum() / len(output)


def linear_net_gradients(weights, x, y) -> list[np.ndarray]:
    """By hand: with H_0 = X, H_i = H_{i-1} W_iᵀ, R = (H_k - Y) / N and B_k = R,
    B_{i-1} = B_i W_i, the gradient of ½ mean ||H_k - Y||² for W_i is B_iᵀ H_{i-1}."""
    hidden = [x]
    for w in weights:
        hidden.append(hidden[-1] @ w.T)
    back = (hidden[-1] - y) / len(x)
    grads = [None] * len(weights)
    for i in reversed(range(len(weights))):
        grads[i] = back.T @ hidden[i]
        back = back @ weights[i]
    return grads


def sgd_momentum_step(weights, grads, buffers, lr, momentum, weight_decay):
    """torch.optim.SGD's update written out: d = g + λW; b ← μb + d; W' = W - lr b."""
    updated = []
    for w, g, b in zip(weights, grads, buffers, strict=True):
        d = g + weight_decay * w
        b_new = d if b is None else momentum * b + d
        updated.append(w - lr * b_new)
    return updated


def expected_ics(weights, x, y, buffers, lr, momentum, weight_decay):
    """G_i, and G'_i with W_1..W_{i-1} replaced by their updated values, for every layer i."""
    g = linear_net_gradients(weights, x, y)
    new = sgd_momentum_step(weights, g, buffers, lr, momentum, weight_decay)
    result = []
    for i in range(len(weights)):
        shifted = linear_net_gradients(new[:i] + weights[i:], x, y)[i]
        l2 = np.linalg.norm(g[i] - shifted)
        cosine = np.sum(g[i] * shifted) / (np.linalg.norm(g[i]) * np.linalg.norm(shifted))
        result.append((l2, cosine, np.linalg.norm(g[i])))
    return result


def linear_problem(widths, batch, seed):
    rng = np.random.default_rng(seed)
    weights = [
        rng.standard_normal((widths[i + 1], widths[i])) / math.sqrt(widths[i])
        for i in range(len(widths) - 1)
    ]
    x = rng.standard_normal((batch, widths[0]))
    y = rng.standard_normal((batch, widths[-1]))
    return weights, x, y


def check_linear_net(widths, batch, seed, lr=0.3, momentum=0.9, weight_decay=0.01):
    weights, x, y = linear_problem(widths, batch, seed)
    model = LinearNet(weights)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    # One real step on other data first, so the momentum buffers are not empty.
    x0, y0 = (torch.tensor(a) for a in linear_problem(widths, batch, seed + 100)[1:])
    half_mse(model(x0), y0).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    current = [
        model.layers[f"w{i + 1}"].weight.detach().numpy().copy() for i in range(len(weights))
    ]
    buffers = [
        optimizer.state[model.layers[f"w{i + 1}"].weight]["momentum_buffer"].numpy().copy()
        for i in range(len(weights))
    ]
    shift = ics(model, half_mse, (torch.tensor(x), torch.tensor(y)), optimizer)
    assert list(shift.layers) == [f"layers.w{i + 1}" for i in range(len(weights))]  # forward order
    expected = expected_ics(current, x, y, buffers, lr, momentum, weight_decay)
    for (name, measured), (l2, cosine, grad_norm) in zip(
        shift.layers.items(), expected, strict=True
    ):
        assert close(measured.grad_norm, grad_norm, grad_norm), name
        assert close(measured.l2, l2, grad_norm), (name, measured.l2, l2)
        assert close(measured.cosine, cosine), (name, measured.cosine, cosine)
    first = shift.layers["layers.w1"]
    assert first.l2 == 0.0 and close(first.cosine, 1.0)  # nothing before the first layer moves
    return shift


def test_linear_network_ics_equals_the_hand_computation():
    shift = check_linear_net((4, 6, 5, 3), batch=8, seed=0)
    assert all(layer.l2 > 0 for name, layer in shift.layers.items() if name != "layers.w1")


@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=6),
    batch=st.integers(1, 9),
    seed=st.integers(0, 10_000),
)
def test_linear_network_ics_random_shapes(widths, batch, seed):
    check_linear_net(tuple(widths), batch, seed)


def test_zero_learning_rate_means_no_shift():
    weights, x, y = linear_problem((3, 4, 4, 2), 5, 0)
    model = LinearNet(weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    shift = ics(model, half_mse, (torch.tensor(x), torch.tensor(y)), optimizer)
    for layer in shift.layers.values():
        assert layer.l2 == 0.0 and close(layer.cosine, 1.0)


def test_reported_layers_can_be_chosen():
    weights, x, y = linear_problem((3, 4, 4, 2), 5, 0)
    model = LinearNet(weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.tensor(x), torch.tensor(y))
    everything = ics(model, half_mse, batch, optimizer)
    chosen = ics(model, half_mse, batch, optimizer, layers=["layers.w3"])
    assert list(chosen.layers) == ["layers.w3"]
    assert chosen.layers["layers.w3"] == everything.layers["layers.w3"]
    assert set(layer_names(model)) == {"layers.w1", "layers.w2", "layers.w3"}


# --------------------------------------------------------------- restored exactly, bit for bit


class Net(nn.Module):
    """Conv, BatchNorm, BatchRenorm (whose training forward reads its running statistics), dropout:
    everything a measurement could disturb."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nk.BatchNorm2d(6)
        self.renorm = nk.BatchRenorm2d(6, r_max=3.0, d_max=5.0)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(6 * 4 * 4, 5)
        self.unused = nn.Linear(2, 2)  # never called: no gradient, never stepped

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.dropout(torch.relu(self.renorm(x)))
        return self.head(x.flatten(1))


def cross_entropy(output, target):
    return nn.functional.cross_entropy(output, target)


def batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 3, 4, 4, generator=generator),
            torch.randint(0, 5, (8,), generator=generator),
        )
        for _ in range(count)
    ]


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
}


def trained(optimizer_name: str, steps: int = 3):
    torch.manual_seed(0)
    model = Net()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    for x, y in batches(steps, seed=1):
        optimizer.zero_grad(set_to_none=True)
        cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, optimizer


def snapshot(model, optimizer):
    """Everything, deep-copied, with the identities of the tensor objects."""
    return {
        "parameters": [(n, p, p.detach().clone()) for n, p in model.named_parameters()],
        "grads": [
            (n, p.grad, None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        ],
        "buffers": [(n, b, b.clone()) for n, b in model.named_buffers()],
        "training": [m.training for m in model.modules()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "state_objects": {
            id(p): (s, {k: v for k, v in s.items()}) for p, s in optimizer.state.items()
        },
        "groups": [id(g) for g in optimizer.param_groups],
        "rng": torch.get_rng_state(),
    }


def assert_same(before, model, optimizer):
    for (name, p, values), (name2, p2) in zip(
        before["parameters"], model.named_parameters(), strict=True
    ):
        assert name == name2 and p is p2 and torch.equal(p2.detach(), values), name
    for (name, grad, values), (_, p) in zip(before["grads"], model.named_parameters(), strict=True):
        assert p.grad is grad, f"{name}.grad is another object"
        assert values is None or torch.equal(p.grad, values), name
    for (name, b, values), (name2, b2) in zip(
        before["buffers"], model.named_buffers(), strict=True
    ):
        assert name == name2 and b is b2 and torch.equal(b2, values), name
    assert [m.training for m in model.modules()] == before["training"]
    after = optimizer.state_dict()
    assert after["param_groups"] == before["optimizer"]["param_groups"]
    assert set(after["state"]) == set(before["optimizer"]["state"])
    for index, entry in before["optimizer"]["state"].items():
        assert set(after["state"][index]) == set(entry)
        for key, value in entry.items():
            actual = after["state"][index][key]
            assert torch.equal(actual, value) if torch.is_tensor(value) else actual == value, key
    for p, s in optimizer.state.items():
        saved, items = before["state_objects"][id(p)]
        assert s is saved and all(s[k] is v for k, v in items.items())
    assert [id(g) for g in optimizer.param_groups] == before["groups"]
    assert torch.equal(torch.get_rng_state(), before["rng"])


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_model_and_optimizer_are_restored_bit_for_bit(optimizer_name, mode):
    model, optimizer = trained(optimizer_name)
    model.train(mode != "eval")
    if mode == "mixed":
        model.bn.eval()
    x, y = batches(1, seed=5)[0]
    cross_entropy(model(x), y).backward()  # gradients pending, as between backward and step
    model.conv.bias.grad = None  # and one that is None
    before = snapshot(model, optimizer)
    shift = ics(model, cross_entropy, (x, y), optimizer)
    assert_same(before, model, optimizer)
    probe = landscape_probe(model, cross_entropy, (x, y), STEPS)
    assert_same(before, model, optimizer)
    assert set(shift.layers) == {"conv", "bn", "renorm", "head"}  # "unused" is never called
    assert all(math.isfinite(v) for v in probe.losses)


def test_training_with_measurements_equals_training_without():
    """The strongest form of "restored exactly": measure before every step, and the trajectory
    (weights, BN statistics, optimizer state, dropout masks) is the same as never measuring."""
    runs = []
    for measure in (False, True):
        model, optimizer = trained("sgd-momentum", steps=1)
        for x, y in batches(5, seed=7):
            if measure:
                ics(model, cross_entropy, (x, y), optimizer)
                landscape_probe(model, cross_entropy, (x, y), (0.1, 0.4))
            optimizer.zero_grad(set_to_none=True)
            cross_entropy(model(x), y).backward()
            optimizer.step()
        runs.append((model.state_dict(), optimizer.state_dict(), torch.get_rng_state()))
    (model_a, opt_a, rng_a), (model_b, opt_b, rng_b) = runs
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    for index, entry in opt_a["state"].items():
        assert torch.equal(entry["momentum_buffer"], opt_b["state"][index]["momentum_buffer"])
    assert torch.equal(rng_a, rng_b)


def test_dropout_masks_repeat_across_passes():
    """With dropout, G' of the first layer equals G only because every pass draws the same mask."""
    model, optimizer = trained("sgd-momentum")
    model.train()
    x, y = batches(1, seed=3)[0]
    shift = ics(model, cross_entropy, (x, y), optimizer)
    assert shift.layers["conv"].l2 == 0.0
    probe_a = landscape_probe(model, cross_entropy, (x, y), (0.1,))
    probe_b = landscape_probe(model, cross_entropy, (x, y), (0.1,))
    assert probe_a == probe_b


def test_every_pass_sees_the_same_masks_and_statistics():
    """At learning rate 0 nothing moves, so G' = G exactly for every layer, but only if each pass
    draws the same dropout mask and BatchRenorm (whose r, d depend on its running statistics,
    which every training forward updates) starts from the same buffers."""
    model, _ = trained("sgd-momentum")
    model.train()
    x, y = batches(1, seed=3)[0]
    shift = ics(model, cross_entropy, (x, y), torch.optim.SGD(model.parameters(), lr=0.0))
    for name, layer in shift.layers.items():
        assert layer.l2 == 0.0 and close(layer.cosine, 1.0), name


class NoisyQuadratic(Quadratic):
    """½ θᵀAθ + nᵀθ with n ~ N(0, I) drawn anew at every forward: the probe's passes agree on
    n only if each starts from the same random state."""

    def forward(self, _x):
        return (
            super().forward(_x) + torch.randn(len(self.theta), dtype=self.theta.dtype) @ self.theta
        )


def test_landscape_passes_share_the_random_state():
    a, _ = spd([3.0, 1.0, 0.5], seed=3)
    model = NoisyQuadratic(a, np.ones(3))
    probe = landscape_probe(model, first_output, (None, None), STEPS)
    noise = torch.randn(3, dtype=torch.float64).numpy()  # the probe rewound: what it drew each pass
    g = a @ np.ones(3) + noise
    for eta, change in zip(STEPS, probe.grad_changes, strict=True):
        assert close(change, eta * np.linalg.norm(a @ g), 3.0)


def test_preserved_restores_after_an_exception():
    model, optimizer = trained("adam")
    before = snapshot(model, optimizer)
    with pytest.raises(RuntimeError, match="inside"), preserved(model, optimizer):
        x, y = batches(1, seed=4)[0]
        cross_entropy(model(x), y).backward()
        optimizer.step()
        model.eval()
        torch.rand(3)
        raise RuntimeError("inside")
    assert_same(before, model, optimizer)


def test_ics_under_no_grad_and_in_eval_mode():
    """The lab calls measurements from evaluation code, under torch.no_grad()."""
    model, optimizer = trained("sgd-momentum")
    model.eval()
    x, y = batches(1, seed=6)[0]
    with torch.no_grad():
        shift = ics(model, cross_entropy, (x, y), optimizer)
        probe = landscape_probe(model, cross_entropy, (x, y), (0.1,))
    assert shift.layers["head"].grad_norm > 0 and probe.grad_norm > 0


# ------------------------------------------------------------------------------------- errors


def test_bad_arguments_raise_config_errors_that_say_what_to_do():
    model, optimizer = trained("sgd-momentum")
    x, y = batches(1)[0]
    with pytest.raises(ConfigError, match=r"pair \(inputs, targets\)"):
        ics(model, cross_entropy, x, optimizer)
    with pytest.raises(ConfigError, match="torch.optim.Optimizer"):
        ics(model, cross_entropy, (x, y), "sgd")
    with pytest.raises(ConfigError, match="choose among"):
        ics(model, cross_entropy, (x, y), optimizer, layers=["conv", "nope"])
    with pytest.raises(ConfigError, match="not called in the forward"):
        ics(model, cross_entropy, (x, y), optimizer, layers=["unused"])
    with pytest.raises(ConfigError, match="scalar"):
        ics(model, lambda out, t: out, (x, y), optimizer)
    with pytest.raises(ConfigError, match="closure"):
        ics(model, cross_entropy, (x, y), torch.optim.LBFGS(model.parameters()))
    for steps in ((), (0.1, -0.1), (math.nan,), "abc"):
        with pytest.raises(ConfigError, match="step_sizes"):
            landscape_probe(model, cross_entropy, (x, y), steps)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter that requires a gradient"):
        landscape_probe(frozen, cross_entropy, (x, y), (0.1,))
    before = snapshot(model, optimizer)
    with pytest.raises(ConfigError):
        ics(model, cross_entropy, (x, y), optimizer, layers=["unused"])
    assert_same(before, model, optimizer)  # a failed measurement leaves no trace either


# ------------------------------------------------------------------------ activation percentiles


def test_activation_percentiles_record_training_forwards_only():
    layer = nn.Conv2d(2, 3, 1)
    recorder = ActivationPercentiles({"conv": layer}, channel=1, every=2)
    inputs = [torch.randn(4, 2, 5, 5) for _ in range(5)]
    outputs = [layer(x) for x in inputs]
    layer.eval()
    layer(inputs[0])  # not recorded
    calls, records = recorder.take()
    assert calls == 5 and [r[0] for r in records["conv"]] == [2, 4]
    for row, output in zip(records["conv"], (outputs[1], outputs[3]), strict=True):
        expected = torch.quantile(
            output[:, 1].detach().double().flatten(),
            torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64),
        )
        assert row[1:] == expected.tolist()
    assert recorder.take() == (0, {"conv": []})
    recorder.remove()
    layer.train()
    layer(inputs[0])
    assert recorder.take() == (0, {"conv": []})
    with pytest.raises(ConfigError, match="every"):
        ActivationPercentiles({"conv": layer}, every=0)
    bad = ActivationPercentiles({"conv": layer}, channel=7)
    with pytest.raises(ConfigError, match="channel=7"):
        layer(inputs[0])
    bad.remove()

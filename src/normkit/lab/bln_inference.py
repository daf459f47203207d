"""Batch Layer Normalization's inference configurations (Ziaee & Çano 2022, official code
A2Amir/Batch-Layer-Normalization, ``helpers/bln_layer.py``): four switches choose each statistic
(batch mean and variance, feature mean and variance) between its population average and the
current batch's or example's. Used by the ``batch-layer-norm`` experiment, which evaluates a trained
``nk.BatchLayerNorm`` network in the configurations that treat mean and variance alike.
"""

from __future__ import annotations

import copy
from itertools import product

import torch
from torch import nn

import normkit as nk
from normkit.lab.evaluation import forward_in_chunks

CONFIGS = list(product(("population", "batch"), ("example", "population")))  # (BN part, LN part)


def config_name(batch: str, feature: str) -> str:
    return f"BN part: {batch}, LN part: {feature}"


class BlnInference(nn.Module):
    """A trained ``nk.BatchLayerNorm`` in one of the code's inference configurations. ``batch``: BN
    statistics from the running averages (``"population"``) or the input batch (``"batch"``);
    ``feature``: LN statistics from each example and position (``"example"``) or the population's
    per-position averages ``feature_mean``/``feature_var`` (shape (*spatial))."""

    def __init__(self, layer: nk.BatchLayerNorm, batch: str, feature: str, feature_mean, feature_var):
        super().__init__()
        self.layer, self.batch, self.feature = layer, batch, feature
        self.feature_mean, self.feature_var = feature_mean, feature_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, shape, reduce = self.layer, (1, -1) + (1,) * (x.dim() - 2), [0, *range(2, x.dim())]
        if self.batch == "population":
            mean, var = layer.running_mean.view(shape), layer.running_var.view(shape)
        else:
            mean, var = x.mean(reduce, keepdim=True), x.var(reduce, unbiased=False, keepdim=True)
        if self.feature == "example":
            mean_f, var_f = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
        else:
            mean_f, var_f = self.feature_mean.unsqueeze(0), self.feature_var.unsqueeze(0)
        w_b, w_f = layer.mixing_weights(x.shape[0])
        y = w_b * (x - mean) / torch.sqrt(var + layer.eps)
        y = y + w_f * (x - mean_f) / torch.sqrt(var_f + layer.eps)
        return y if layer.weight is None else y * layer.weight.view(shape) + layer.bias.view(shape)


@torch.no_grad()
def feature_population(model: nn.Module, x: torch.Tensor, chunk: int = 500) -> dict[str, tuple]:
    """Each BatchLayerNorm's population LN statistics: the average over ``x`` of every example's
    per-position mean and (biased) variance over the channels, in eval mode."""
    sums: dict[str, list] = {}

    def hook(name):
        def record(_module, inputs, _output):
            h = inputs[0].double()
            total = sums.setdefault(name, [0.0, 0.0, 0])
            total[0], total[1] = total[0] + h.mean(1).sum(0), total[1] + h.var(1, unbiased=False).sum(0)
            total[2] += h.shape[0]

        return record

    hooks = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
             if isinstance(module, nk.BatchLayerNorm)]  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        forward_in_chunks(model, x, hooks, chunk)
    finally:
        model.train(was_training)
    return {name: ((m / n).float(), (v / n).float()) for name, (m, v, n) in sums.items()}


@torch.no_grad()
def configured_accuracy(model, x, y, batch_size: int, batch: str, feature: str, population) -> float:
    """Accuracy of a BLN network in one inference configuration; the test images go in batches of
    ``batch_size`` (what "the current batch" means), the last incomplete one dropped."""
    replica = copy.deepcopy(model).eval()
    for name, module in list(replica.named_children()):
        if isinstance(module, nk.BatchLayerNorm):
            replica._modules[name] = BlnInference(module, batch, feature, *population.get(name, (None, None)))
    step = batch_size if batch == "batch" else 500
    count = len(y) // step * step if batch == "batch" else len(y)
    correct = sum(int((replica(x[i : min(i + step, count)]).argmax(1) == y[i : min(i + step, count)]).sum())
                  for i in range(0, count, step))  # fmt: skip
    return correct / count

"""Tools for the problems normalization causes in practice, for any PyTorch model.

Each tool takes a model, checks it, works on a deep copy (``inplace=True`` to change the model itself)
and returns the new model with a report of what it did; the maths underneath is a pure function on
tensors, exported too.

- :func:`fold_batchnorm`: fold eval-mode BatchNorm into the Conv/Linear feeding it, for inference
  (:func:`fold_conv_bn_weights`, :func:`fold_linear_bn_weights`).
- :func:`convert`: replace normalization layers with another kind (``"group:32"``, ``"sync"``,
  ``"frozen"``, ``"renorm"``, torch.nn ↔ normkit, ...), carrying the state that means the same;
  :func:`freeze`: BatchNorm → frozen BatchNorm for fine-tuning.
- :func:`remove_redundant_bias`: drop a Conv/Linear bias that a BatchNorm cancels
  (:func:`absorb_bias`).
- :func:`recalibrate`: PreciseBN, population statistics as a true average over batches.
- :func:`adapt`: AdaBN, statistics re-estimated on a new domain.
- :func:`accumulate`: BatchNorm's running statistics under gradient accumulation, those of the
  large batch (also ``normkit.accumulate``).
- :func:`doctor`: find normalization mistakes; :func:`advise`: which normalizer to use
  (:data:`ADVICE_TABLE`).

No tool changes what a model computes without saying so: a BatchNorm + activation layer keeps its
activation (:class:`NormAct`), and a layer whose forward normkit does not know is left as it was and
reported with the reason. docs/tools.md lists what each tool guarantees.
"""

from normkit.tools._statistics import LayerShift, StatisticsReport
from normkit.tools.accumulate import Accumulation, accumulate
from normkit.tools.adapt import adapt
from normkit.tools.advice import ADVICE_TABLE, Advice, advise, guess_task
from normkit.tools.bias import BiasReport, absorb_bias, remove_redundant_bias
from normkit.tools.convert import Replacement, Replacements, carry_state, convert, freeze
from normkit.tools.doctor import DoctorReport, Finding, doctor
from normkit.tools.fold import (
    FoldReport,
    fold_batchnorm,
    fold_conv_bn_weights,
    fold_linear_bn_weights,
)
from normkit.tools.norm_act import NormAct, activation_module
from normkit.tools.recalibrate import recalibrate

__all__ = [
    "ADVICE_TABLE",
    "Accumulation",
    "Advice",
    "BiasReport",
    "DoctorReport",
    "Finding",
    "FoldReport",
    "LayerShift",
    "NormAct",
    "Replacement",
    "Replacements",
    "StatisticsReport",
    "absorb_bias",
    "accumulate",
    "activation_module",
    "adapt",
    "advise",
    "carry_state",
    "convert",
    "doctor",
    "fold_batchnorm",
    "fold_conv_bn_weights",
    "fold_linear_bn_weights",
    "freeze",
    "guess_task",
    "recalibrate",
    "remove_redundant_bias",
]

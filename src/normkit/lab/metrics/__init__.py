"""Measurements of what a training step does to a network, usable on any model and optimizer.

From Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?"
(arXiv 1805.11604):

- :func:`ics`: internal covariate shift per layer (Definition 2.1, Fig. 3): the gradient G of a
  simultaneous update against G', the gradient after the layers before have taken this step's
  update, on the same batch; ||G - G'||_2 and cos(G, G').
- :func:`landscape_probe`: the loss and the gradient along the gradient direction (§3.1, Fig. 4):
  the range of the loss, gradient predictiveness and effective β-smoothness.
- :class:`ActivationPercentiles`: percentiles of layer inputs during training (Fig. 2).
- :func:`preserved`: the block both measurements run in: on exit the model (parameters, their
  ``.grad``, buffers, train/eval flags), the optimizer (state, groups) and torch's random
  generators are exactly as on entry, so measuring never changes what training does.

Example::

    from normkit.lab.metrics import ics, landscape_probe

    shift = ics(model, F.cross_entropy, (x, y), optimizer)
    shift.layers["conv2"].l2, shift.layers["conv2"].cosine
    probe = landscape_probe(model, F.cross_entropy, (x, y), step_sizes=(0.05, 0.1, 0.2, 0.4))
    probe.loss_range, probe.grad_change_range, probe.beta_smoothness
"""

from normkit.lab.metrics._activations import ActivationPercentiles
from normkit.lab.metrics._ics import CovariateShift, LayerShift, ics, layer_names
from normkit.lab.metrics._landscape import LandscapeProbe, landscape_probe
from normkit.lab.metrics._state import preserved

__all__ = [
    "ActivationPercentiles",
    "CovariateShift",
    "LandscapeProbe",
    "LayerShift",
    "ics",
    "landscape_probe",
    "layer_names",
    "preserved",
]

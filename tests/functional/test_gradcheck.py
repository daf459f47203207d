"""Finite-difference checks of every op's gradient (and gradient of the gradient) in float64.

The reference backend's backward is derived by hand (Ioffe & Szegedy §3); gradcheck compares it with
finite differences, and gradgradcheck checks that it is itself differentiable (double backward, as
used by gradient penalties).
"""

import pytest
import torch

import normkit.functional as nkf


def _inputs(shape, *param_shapes):
    generator = torch.Generator().manual_seed(0)
    make = lambda s, scale, shift: (  # noqa: E731
        torch.randn(s, generator=generator, dtype=torch.float64) * scale + shift
    ).requires_grad_()
    return [make(shape, 2.0, 0.5)] + [make(s, 0.3, 1.0) for s in param_shapes]


def _batch_norm_train(x, w, b):
    return nkf.batch_norm(
        x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), w, b, True
    )


def _batch_norm_eval(x, w, b):
    mean = torch.tensor([0.1, -0.2, 0.3], dtype=x.dtype)
    var = torch.tensor([0.5, 1.5, 2.0], dtype=x.dtype)
    return nkf.batch_norm(x, mean, var, w, b, False)


OPS = {
    "batch_norm_train": (_batch_norm_train, (4, 3, 2, 3), (3,), (3,)),
    "batch_norm_train_no_affine": (
        lambda x: nkf.batch_norm(x, None, None, training=True),
        (4, 3, 5),
    ),
    "batch_norm_eval": (_batch_norm_eval, (4, 3, 2), (3,), (3,)),
    "layer_norm": (lambda x, w, b: nkf.layer_norm(x, (2, 3), w, b), (3, 4, 2, 3), (2, 3), (2, 3)),
    "group_norm": (lambda x, w, b: nkf.group_norm(x, 3, w, b), (2, 6, 2, 2), (6,), (6,)),
    "instance_norm": (
        lambda x, w, b: nkf.instance_norm(x, weight=w, bias=b),
        (2, 3, 3, 2),
        (3,),
        (3,),
    ),
    "channel_layer_norm": (nkf.channel_layer_norm, (2, 4, 3, 2), (4,), (4,)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck(name, backend):
    fn, *shapes = OPS[name]
    assert torch.autograd.gradcheck(fn, _inputs(*shapes))


@pytest.mark.parametrize("name", list(OPS))
def test_gradgradcheck(name, backend):
    fn, *shapes = OPS[name]
    assert torch.autograd.gradgradcheck(fn, _inputs(*shapes))

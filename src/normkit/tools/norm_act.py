"""``NormAct``: a normalization layer and what its layer computed after it, as separate modules.

Many layers compute more than a normalization: normkit's ``BatchNormAct`` (an activation, and a
residual added before it) and ``InPlaceABN`` (an invertible activation), timm's ``BatchNormAct2d``
(a drop-path/drop-block module, then an activation module). When a tool replaces the normalization
(``convert``, ``freeze``) or folds it away (``fold_batchnorm``), what follows the normalization must
stay. The tools then put a ``NormAct`` where the layer was:

    y = act(drop(norm(x)) + residual)        (``+ residual`` only for a layer built with one)

with ``norm`` the new (or, after folding, ``nn.Identity``) normalization and ``drop``/``act`` the
layer's own modules (timm's), or torch.nn modules computing its fused activation (normkit's).
"""

from __future__ import annotations

import torch
from torch import nn

from normkit.errors import ConfigError

# normkit's fused activations (normkit.functional._activation) as torch.nn modules.
_ACTIVATIONS = {
    "relu": lambda param: nn.ReLU(),
    "leaky_relu": lambda param: nn.LeakyReLU(param),
    "silu": lambda param: nn.SiLU(),
    "gelu": lambda param: nn.GELU(),
    "elu": lambda param: nn.ELU(param),
    "identity": lambda param: nn.Identity(),
}


def activation_module(name: str, param: float = 0.01) -> nn.Module:
    """The torch.nn module computing normkit's fused activation ``name`` (``param``: leaky_relu's
    negative slope or elu's alpha)."""
    if name not in _ACTIVATIONS:
        raise ConfigError(f"no torch.nn module known for the activation {name!r}")
    return _ACTIVATIONS[name](float(param))


class NormAct(nn.Module):
    """``act(drop(norm(x)) [+ residual])``: a normalization followed by the rest of its layer.

    Args:
        norm: the normalization (``nn.Identity()`` once folded into the layer before it).
        drop: applied to the normalized output first (timm's drop path/drop block); None: none.
        act: the activation; None: none.
        residual: the layer takes a second input, added before the activation, as
            ``nk.BatchNormAct(residual=True)`` does: ``layer(x, z)``.

    The tools (``convert``, ``fold_batchnorm``, ...) look through it: its ``norm`` is the
    normalization they see, and a torch.fx trace records ``norm``, ``drop`` and ``act`` as calls
    of their own, which torch.ao's fusion patterns (Conv, BatchNorm, ReLU) then find.
    """

    def __init__(
        self,
        norm: nn.Module,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
        *,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.norm = norm
        # None where the layer has none, so that a trace records no call there and torch.ao's
        # fusion sees Conv -> BatchNorm -> ReLU with nothing in between.
        self.register_module("drop", drop)
        self.register_module("act", act)
        self.residual = bool(residual)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.residual and residual is None:
            raise ConfigError(
                "this layer adds a second input before its activation: call layer(x, z)"
            )
        if not self.residual and residual is not None:
            raise ConfigError("a residual was passed to a layer built without one")
        output = self.norm(input)
        if self.drop is not None:
            output = self.drop(output)
        if residual is not None:
            output = output + residual
        return output if self.act is None else self.act(output)

    def extra_repr(self) -> str:
        return "residual=True" if self.residual else ""

"""``BatchNormAct``: batch norm, an optional residual add and an activation as one layer."""

from __future__ import annotations

import torch

from normkit.errors import ConfigError
from normkit.functional import batch_norm_act
from normkit.functional._activation import FUSED_ACTIVATIONS, check_activation
from normkit.nn._base import NormBase, named


class BatchNormAct(NormBase):
    r"""Batch norm fused with an optional residual and an activation: y = act(BN(x) [+ z]).

    The batch norm is :class:`normkit.BatchNorm`'s (Ioffe & Szegedy 2015, any rank (N, C, \*),
    same arguments, buffers, guard and ``state_dict`` keys: a plain BatchNorm's state loads as it
    is). It is not an instance of torch's ``_BatchNorm``, so converters that replace batch norms
    (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) leave it, activation and all
    (:class:`~normkit.nn._base.NormBase` says why). The activation and the residual ``z`` (a ResNet
    block's shortcut, added before the activation as in ``relu(bn(conv(x)) + shortcut)``) run in
    the same pass, forward and backward. Memory: the layer saves only x (and z) and per-channel
    float32 statistics; the pre-activation is recomputed in backward, so nothing of the size of the
    output is kept (BatchNorm followed by ReLU keeps x and the output).

    Backends (``nk.backend``): ``native`` (ATen's batch norm and activation kernels around a
    hand-written backward), ``compiled`` (the same maths fused by torch.compile; on the CPU
    ``auto`` picks it where docs/benchmarks.md measured it faster; the first call per shape
    compiles, a few seconds), ``triton`` (one kernel per pass on CUDA), ``reference`` (the unfused
    definition, differentiated by autograd).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, decay,
        on_nonfinite: as :class:`normkit.BatchNorm`.
        activation: ``"relu"`` (default), ``"leaky_relu"``, ``"silu"``, ``"gelu"`` (the exact erf
            form, torch's default) or ``"identity"``.
        activation_param: leaky_relu's negative slope. Default: 0.01.
        residual: the layer takes a second input ``z`` of the input's shape, added before the
            activation: ``layer(x, z)``. Default: False.

    Shape:
        Input (N, C, \*), residual the same; output the same shape, dtype and memory format.

    Example::

        >>> import torch, normkit as nk
        >>> layer = nk.BatchNormAct(8, activation="relu", residual=True)
        >>> x, shortcut = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
        >>> with nk.backend("native"):
        ...     y = layer(x, shortcut)
        >>> bool((y >= 0).all()), y.shape
        (True, torch.Size([4, 8, 5, 5]))
        >>> plain = nk.BatchNorm(8)
        >>> plain.load_state_dict(layer.state_dict())  # the same keys both ways
        <All keys matched successfully>
    """

    def __init__(
        self, *args, activation: str = "relu", activation_param: float = 0.01,
        residual: bool = False, **kwargs,
    ) -> None:  # fmt: skip
        check_activation(activation, activation_param, FUSED_ACTIVATIONS, "BatchNormAct")
        super().__init__(*args, **kwargs)
        self.activation = activation
        self.activation_param = float(activation_param)
        self.residual = bool(residual)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        if self.residual and residual is None:
            raise named(
                self,
                ConfigError(
                    "this layer was built with residual=True and adds a second input before the "
                    "activation: call layer(x, z), or build it with residual=False"
                ),
            )
        if not self.residual and residual is not None:
            raise named(
                self,
                ConfigError(
                    "a residual was passed to a layer built with residual=False; build it with "
                    "residual=True to add it before the activation"
                ),
            )
        return self._normalize(
            batch_norm_act,
            input,
            activation=self.activation,
            activation_param=self.activation_param,
            residual=residual,
        )

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", activation_param={self.activation_param}"
        return text + (", residual=True" if self.residual else "")

"""Batch-Instance Normalization: a learned per-channel gate between BatchNorm and InstanceNorm."""

from __future__ import annotations

import torch
from torch import nn

from normkit.functional import batch_instance_norm
from normkit.nn._base import NormBase


class BatchInstanceNorm(NormBase):
    r"""Batch-Instance Normalization (Nam & Kim 2018): BN and IN mixed per channel by a gate ρ.

    Paper: https://arxiv.org/abs/1805.07925 (eqs. 6-7); official code hyseob/Batch-Instance-
    Normalization. Style (contrast, texture) lives in the instance statistics that BatchNorm keeps
    and InstanceNorm removes; the gate learns, per channel, how much of it to remove:

    .. math::
        y = \left(\rho\, \hat{x}_B + (1 - \rho)\, \hat{x}_I\right) \gamma + \beta,
        \qquad \rho \in [0, 1]^C

    where :math:`\hat{x}_B` is BatchNorm's normalization (batch statistics in training, running
    statistics in eval) and :math:`\hat{x}_I` InstanceNorm's (each sample's own, always). ρ = 1 is
    BatchNorm and ρ = 0 InstanceNorm.

    Decisions (tested):

    - ρ is the parameter ``rho``, initialised to 1 (pure BN) as in the paper's code. The paper keeps
      ρ in [0, 1] by clipping it after every update; here each training-mode forward first projects
      ``rho`` onto [0, 1] in place (the clip of the previous step, applied when ρ is next used; undone
      if the forward raises), and the formula always uses ``rho.clamp(0, 1)``, so a value set by
      hand outside the range is never used. The gradient passes at the bounds, so ρ can leave 1.
    - The paper trains the gates with 10× the learning rate and no weight decay: give ``rho`` its own
      parameter group, e.g. ``[p for n, p in model.named_parameters() if n.endswith("rho")]``.
    - ``running_mean``/``running_var`` are the BN part's, with BatchNorm's conventions and guard.

    Args:
        num_features: C.
        eps: added to both variances; must be > 0. Default: 1e-5.
        momentum, affine, track_running_stats, device, dtype, bias, decay, on_nonfinite: as
            :class:`BatchNorm`.

    Shape:
        Input: (N, C, \*spatial) with at least one spatial dim; output: the same shape, dtype and
        memory format.

    Example::

        >>> import torch, normkit as nk
        >>> import torch.nn.functional as F
        >>> x = torch.randn(4, 3, 5, 5)
        >>> bin_ = nk.BatchInstanceNorm(3, affine=False)  # rho = 1: BatchNorm
        >>> bool(torch.allclose(bin_(x), F.batch_norm(x, None, None, training=True), atol=1e-5))
        True
        >>> _ = torch.nn.init.zeros_(bin_.rho)  # rho = 0: InstanceNorm
        >>> bool(torch.allclose(bin_(x), F.instance_norm(x), atol=1e-5))
        True
    """

    def _init_parameters(self, factory: dict) -> None:
        self.rho = nn.Parameter(torch.ones(self.num_features, **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "rho", None) is not None:
            nn.init.ones_(self.rho)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rho = self.rho
        if not self.training:
            return self._normalize(batch_instance_norm, input, rho)
        before = rho.detach().clone()
        rho.detach().clamp_(0.0, 1.0)  # Nam & Kim's clip of the gate after each update
        try:
            return self._normalize(batch_instance_norm, input, rho)
        except Exception:
            rho.detach().copy_(before)  # a forward that raises leaves the layer as it was
            raise

"""``FilterResponseNorm``: Filter Response Normalization and its Thresholded Linear Unit."""

from __future__ import annotations

import torch
from torch import nn

from normkit.errors import NormkitError
from normkit.functional import filter_response_norm
from normkit.functional._checks import check_channels, check_eps, check_min_rank, check_positive_int
from normkit.nn._base import NormLayer, named


class FilterResponseNorm(NormLayer, nn.Module):
    r"""Filter Response Normalization + TLU (Singh & Krishnan 2020): batch-independent, no centring.

    Paper: https://arxiv.org/abs/1911.09737, eqs. 1-3. Each filter response (sample n, channel c)
    is divided by its root mean square over the spatial dims, scaled and shifted per channel, and
    passed through a learned threshold:

    .. math::
        \nu^2 = \tfrac{1}{N}\textstyle\sum_i x_i^2, \qquad
        z = \max\!\left(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon}} + \beta,\ \tau\right)

    No statistic is shared between samples, so training and eval compute the same function at any
    batch size. The paper: FRN "performs ≈0.7–1.0% better than BN on top-1 validation accuracy
    with large mini-batch sizes for ImageNet classification using InceptionV3 and ResnetV2-50" and
    ">1% better than GN ... in the small mini-batch size regime" (abstract; its Table 2 and
    Figure 4 have the per-batch-size numbers). FRN replaces BN *and* the ReLU after it: the TLU
    is the activation, without which FRN alone trains poorly (§3.2).

    Numerically equal to timm's ``FilterResponseNormTlu2d`` (and ``FilterResponseNormAct2d``
    without its activation when ``tlu=False``) given the same eps — timm's default is 1e-5, the
    paper's 1e-6 — with the same ``state_dict`` keys (``weight``, ``bias``, ``tau``), so timm
    checkpoints load.

    Args:
        num_features: C.
        eps: the constant added to nu2; > 0. Default: 1e-6 (the paper's).
        tlu: apply the thresholded linear unit (learned ``tau``, zeros at first). Default: True.
        learnable_eps: learn a per-channel ``learned_eps`` and use ``eps + |learned_eps|``, which
            the paper recommends for layers whose maps are 1x1 (or (N, C) inputs), where
            x / sqrt(x^2 + eps) is otherwise nearly sign(x) (§3.1). Default: False.
        device, dtype: where and in what dtype the parameters are created.

    Shape:
        Input: (N, C, \*) (an (N, C) input is a 1x1 map); output: the same shape, dtype and memory
        format.

    Example::

        >>> import torch, normkit as nk
        >>> frn = nk.FilterResponseNorm(8)
        >>> x = torch.randn(4, 8, 5, 5) * 3
        >>> y = frn(x)
        >>> bool((y >= 0).all())  # tau starts at 0: the TLU is a ReLU at first
        True
        >>> bool(torch.allclose(frn(x[:1]), y[:1]))  # every sample on its own
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        tlu: bool = True,
        learnable_eps: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        check_positive_int(num_features, "num_features")
        check_eps(eps)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.tlu = bool(tlu)
        self.learnable_eps = bool(learnable_eps)
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        if tlu:
            self.tau = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("tau", None)
        if learnable_eps:
            self.learned_eps = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("learned_eps", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)
        if self.learned_eps is not None:
            nn.init.zeros_(self.learned_eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        try:
            check_min_rank(input, 2, "(N, C, *)")
            check_channels(input, self.num_features)
            return filter_response_norm(
                input, self.weight, self.bias, self.tau, self.eps, self.learned_eps
            )
        except NormkitError as error:
            raise named(self, error) from None

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, tlu={self.tlu}"
        return text + (", learnable_eps=True" if self.learnable_eps else "")

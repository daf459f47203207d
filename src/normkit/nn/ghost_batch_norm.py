"""Ghost Batch Normalization: BatchNorm over virtual sub-batches of a large batch."""

from __future__ import annotations

import torch

from normkit.functional import batch_norm, ghost_batch_norm
from normkit.functional._checks import check_positive_int
from normkit.nn._base import NormBase


class GhostBatchNorm(NormBase):
    r"""BatchNorm whose training statistics come from virtual batches of ``virtual_batch_size``
    samples (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better", §4).

    Paper: https://arxiv.org/abs/1705.08741. Large batches give BatchNorm statistics with little
    noise, one of the causes of their generalization gap; Ghost BN splits the batch into "ghost"
    batches of v samples and normalizes each with its own per-channel mean and biased variance,
    restoring the noise of small batches while the gradient stays that of the large batch. γ and β
    are shared. Any rank (N, C, \*); channels_last stays channels_last.

    Decisions (tested):

    - A batch of N samples is split, in order, into G = max(1, N // v) ghost batches of as equal
      sizes as possible (sizes differ by at most one; none is smaller than v unless N < v). So
      ``v >= N`` is BatchNorm exactly, and N = 33, v = 16 gives ghost batches of 17 and 16.
    - The running statistics are an exponential average over the ghost batches, updated once per
      ghost batch in order as in the paper's code (in closed form, not a loop), each ghost batch's
      variance unbiased with its own size; ``num_batches_tracked`` counts ghost batches, which is
      what ``momentum=None`` (the cumulative average) averages over.
    - Eval mode uses the running statistics at any batch size: it is BatchNorm's eval map (Keras's
      version applied the virtual split at inference too). With ``track_running_stats=False``, eval
      uses ghost-batch statistics, as BatchNorm uses batch statistics.

    Args:
        num_features: C.
        virtual_batch_size: v, the samples per ghost batch. Default: 32 (Hoffer et al. use 128
            inside batches of 4096).
        eps, momentum, affine, track_running_stats, device, dtype: as :class:`BatchNorm`.
        bias, decay, on_nonfinite: as :class:`BatchNorm`.

    Shape:
        Input: (N, C, \*); output: the same shape, dtype and memory format.

    Example::

        >>> import torch, normkit as nk
        >>> gbn = nk.GhostBatchNorm(3, virtual_batch_size=4, affine=False)
        >>> y = gbn(torch.randn(16, 3, 5) * 2 + 1)
        >>> ghost = y.view(4, 4, 3, 5)  # every ghost batch is normalized on its own
        >>> bool(ghost.mean((1, 3)).abs().max() < 1e-5), int(gbn.num_batches_tracked)
        (True, 4)
    """

    def __init__(self, num_features: int, virtual_batch_size: int = 32, *args, **kwargs) -> None:
        check_positive_int(virtual_batch_size, "virtual_batch_size")
        super().__init__(num_features, *args, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self._uses_batch_statistics():  # eval with running statistics: BatchNorm's map
            return self._normalize(batch_norm, input)
        return self._normalize(ghost_batch_norm, input, virtual_batch_size=self.virtual_batch_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

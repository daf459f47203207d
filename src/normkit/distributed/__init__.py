"""Batch normalization across the ranks of a ``torch.distributed`` process group.

- :class:`SyncBatchNorm` (also ``normkit.SyncBatchNorm``): exact global statistics from every rank's
  (count, mean, M2), one all-gather per layer and step, one all-reduce in backward; uneven and
  empty ranks; gloo (CPU) and NCCL (GPU).
- :func:`synchronized_batch_norm`: the functional form.
- :func:`to_sync_batch_norm` / :func:`to_batch_norm`: convert a model's batch norms both ways,
  sharing parameters and buffers (also ``SyncBatchNorm.convert_sync_batchnorm`` /
  ``SyncBatchNorm.revert_sync_batchnorm``).
- :func:`merge_moments`: Chan et al.'s merge of per-part (count, mean, M2).
- :class:`RankMismatchError`, :class:`RankSyncError`: what fails across ranks, raised on every rank.
"""

from normkit.distributed._moments import local_moments, merge_moments
from normkit.distributed._sync_batch_norm import synchronized_batch_norm
from normkit.distributed.sync_batch_norm import SyncBatchNorm, to_batch_norm, to_sync_batch_norm
from normkit.errors import RankMismatchError, RankSyncError

__all__ = [
    "RankMismatchError",
    "RankSyncError",
    "SyncBatchNorm",
    "local_moments",
    "merge_moments",
    "synchronized_batch_norm",
    "to_batch_norm",
    "to_sync_batch_norm",
]

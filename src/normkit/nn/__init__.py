"""normkit's layers: drop-ins for torch.nn's normalizers, and the tools to control their state."""

from normkit.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normkit.nn.groupnorm import GroupNorm
from normkit.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normkit.nn.layernorm import LayerNorm, LayerNorm2d
from normkit.nn.snapshot import RunningStatsSnapshot, frozen_running_stats, snapshot_running_stats

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RunningStatsSnapshot",
    "frozen_running_stats",
    "snapshot_running_stats",
]

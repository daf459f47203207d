"""normkit's layers: drop-ins for torch.nn's normalizers, and the tools to control their state."""

from normkit.nn.batch_instance_norm import BatchInstanceNorm
from normkit.nn.batch_layer_norm import BatchLayerNorm
from normkit.nn.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normkit.nn.batch_norm_act import BatchNormAct
from normkit.nn.batch_renorm import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    RenormRamp,
)
from normkit.nn.cross_iteration_batch_norm import CrossIterationBatchNorm
from normkit.nn.evo_norm_b0 import EvoNormB0
from normkit.nn.evo_norm_s0 import EvoNormS0
from normkit.nn.filter_response_norm import FilterResponseNorm
from normkit.nn.frozen_batch_norm import FrozenBatchNorm
from normkit.nn.ghost_batch_norm import GhostBatchNorm
from normkit.nn.group_norm import GroupNorm
from normkit.nn.inplace_abn import InPlaceABN
from normkit.nn.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normkit.nn.layer_norm import LayerNorm, LayerNorm2d
from normkit.nn.moving_average_batch_norm import MovingAverageBatchNorm
from normkit.nn.rms_norm import RMSNorm, RMSNorm2d
from normkit.nn.snapshot import RunningStatsSnapshot, frozen_running_stats, snapshot_running_stats
from normkit.nn.std_conv import CenteredConv2d, ScaledStdConv2d, StdConv2d
from normkit.nn.switchable_norm import SwitchableNorm

__all__ = [
    "BatchInstanceNorm",
    "BatchLayerNorm",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CenteredConv2d",
    "CrossIterationBatchNorm",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InPlaceABN",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "MovingAverageBatchNorm",
    "RMSNorm",
    "RMSNorm2d",
    "RenormRamp",
    "RunningStatsSnapshot",
    "ScaledStdConv2d",
    "StdConv2d",
    "SwitchableNorm",
    "frozen_running_stats",
    "snapshot_running_stats",
]

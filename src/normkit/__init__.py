"""normkit: batch normalization and its family for PyTorch, done properly.

Exact drop-in layers (``nk.BatchNorm2d`` for ``torch.nn.BatchNorm2d``, ...) on one statistics core,
with running statistics you can trust, a choice of backends, and a float64 reference
(:mod:`normkit.reference`) that reads like the papers. Importing normkit never imports triton.

    >>> import torch, normkit as nk
    >>> bn = nk.BatchNorm2d(16)
    >>> bn(torch.randn(8, 16, 4, 4)).shape
    torch.Size([8, 16, 4, 4])
"""

from normkit import errors, functional
from normkit.backends import available_backends, backend, get_backend, set_backend
from normkit.distributed import SyncBatchNorm
from normkit.factory import create_norm
from normkit.functional._running_stats import momentum_from_decay
from normkit.nn import (
    BatchInstanceNorm,
    BatchLayerNorm,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct,
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    CenteredConv2d,
    CrossIterationBatchNorm,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    GroupNorm,
    InPlaceABN,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    MovingAverageBatchNorm,
    RenormRamp,
    RMSNorm,
    RMSNorm2d,
    RunningStatsSnapshot,
    ScaledStdConv2d,
    StdConv2d,
    SwitchableNorm,
    frozen_running_stats,
    snapshot_running_stats,
)

__version__ = "0.1.0"

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
    "SyncBatchNorm",
    "accumulate",
    "available_backends",
    "backend",
    "create_norm",
    "errors",
    "frozen_running_stats",
    "functional",
    "get_backend",
    "momentum_from_decay",
    "reference",
    "set_backend",
    "snapshot_running_stats",
    "tools",
]


def __getattr__(name: str):
    # The NumPy oracle and the model tools load on first use, keeping `import normkit` to torch's
    # own cost.
    if name in ("reference", "tools"):
        import importlib

        return importlib.import_module(f"normkit.{name}")
    if name == "accumulate":  # a tool (it touches SyncBatchNorm), at the top level for loops
        return __getattr__("tools").accumulate
    raise AttributeError(f"module 'normkit' has no attribute {name!r}")

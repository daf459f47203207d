"""The functional forms of normkit's normalizers, and the shared core they are built from.

The ops take the same arguments as their ``torch.nn.functional`` namesakes and add normkit's checks,
the non-finite guard on running statistics and the cumulative average. The core — :func:`moments`,
:func:`normalize`, :func:`normalize_over`, :func:`update_running_stats` — is public for code that
builds new normalizers from the same pieces.
"""

from normkit.functional._batch_instance_norm import batch_instance_norm
from normkit.functional._batch_layer_norm import batch_layer_norm
from normkit.functional._batch_norm import batch_norm
from normkit.functional._batch_norm_act import batch_norm_act
from normkit.functional._batch_renorm import batch_renorm
from normkit.functional._cross_iteration_batch_norm import cross_iteration_batch_norm
from normkit.functional._evo_norm_b0 import evo_norm_b0
from normkit.functional._evo_norm_s0 import evo_norm_s0
from normkit.functional._filter_response_norm import filter_response_norm
from normkit.functional._ghost_batch_norm import ghost_batch_norm
from normkit.functional._group_norm import group_norm
from normkit.functional._inplace_abn import inplace_abn
from normkit.functional._instance_norm import instance_norm
from normkit.functional._layer_norm import channel_layer_norm, layer_norm
from normkit.functional._moments import moments, stats_dtype, unbiased
from normkit.functional._moving_average_batch_norm import moving_average_batch_norm
from normkit.functional._normalize import normalize, normalize_over
from normkit.functional._rms_norm import channel_rms_norm, rms_norm
from normkit.functional._running_stats import (
    guarded_update,
    momentum_from_decay,
    update_running_stats,
)
from normkit.functional._std_conv import centered_weight, standardized_weight, std_conv
from normkit.functional._switchable_norm import switchable_norm

__all__ = [
    "batch_instance_norm",
    "batch_layer_norm",
    "batch_norm",
    "batch_norm_act",
    "batch_renorm",
    "centered_weight",
    "channel_layer_norm",
    "channel_rms_norm",
    "cross_iteration_batch_norm",
    "evo_norm_b0",
    "evo_norm_s0",
    "filter_response_norm",
    "ghost_batch_norm",
    "group_norm",
    "guarded_update",
    "inplace_abn",
    "instance_norm",
    "layer_norm",
    "moments",
    "momentum_from_decay",
    "moving_average_batch_norm",
    "normalize",
    "normalize_over",
    "rms_norm",
    "standardized_weight",
    "stats_dtype",
    "std_conv",
    "switchable_norm",
    "unbiased",
    "update_running_stats",
]

"""The errors normkit raises for bad input and bad configuration.

Every error is a ``ValueError`` or ``TypeError`` subclass, so code written against ``torch.nn`` that
catches those keeps working, and every message names the argument, the shape and the fix. All derive
from :class:`NormkitError`, so a layer can add its own name to a message raised deeper down.
"""

from __future__ import annotations


class NormkitError(Exception):
    """Base class of every error normkit raises on purpose."""


class ConfigError(NormkitError, ValueError):
    """A constructor or functional argument is out of range (eps <= 0, groups not dividing channels)."""


class ShapeError(NormkitError, ValueError):
    """The input has the wrong rank or a shape that does not fit the layer."""


class ChannelMismatchError(ShapeError):
    """The input's channel dimension differs from the layer's ``num_features``."""


class BatchTooSmallError(NormkitError, ValueError):
    """Training would compute statistics from a single value per channel (or group)."""


class DtypeError(NormkitError, TypeError):
    """The input is not a floating-point tensor, or parameters and input disagree on dtype."""


class NonFiniteStatisticsError(NormkitError, ValueError):
    """A batch's statistics are NaN or Inf and the layer was asked to raise rather than skip."""


class BackendError(NormkitError, ValueError):
    """An unknown backend name, or a backend that cannot run on this device and dtype."""


class RankMismatchError(NormkitError, ValueError):
    """Ranks reached the same synchronized layer but disagree on how to run it (channels, dtype,
    eps, momentum, whether the input needs a gradient, how many synchronized steps it has taken).
    Raised on every rank, so no rank waits in a collective for a peer that has stopped."""


class RankSyncError(NormkitError, RuntimeError):
    """A collective did not complete: a peer never joined it (a rank in eval mode, control flow
    that differs across ranks), timed out, or died. A ``RuntimeError``, as torch.distributed's own
    timeouts are, so existing handlers keep working."""

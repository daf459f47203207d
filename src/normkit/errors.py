"""The errors normkit raises for bad input, bad configuration and unsupported transforms.

Every error subclasses the exception ``torch.nn`` raises in the same situation, so code written
against torch that catches it keeps working: ``ValueError`` for bad arguments and ranks,
``RuntimeError`` where torch's kernels reject shapes, dtypes or devices (a channel count that does
not match the running statistics, a float64 input into float32 parameters), ``TypeError`` for what
is not a floating-point tensor. Every message names the argument, the shape and the fix, and all
derive from :class:`NormkitError`, so a layer can add its own name to a message raised deeper down.
"""

from __future__ import annotations


class NormkitError(Exception):
    """Base class of every error normkit raises on purpose."""


class ConfigError(NormkitError, ValueError):
    """A constructor or functional argument is out of range (eps <= 0, groups not dividing channels)."""


class ShapeError(NormkitError, ValueError, RuntimeError):
    """The input has the wrong rank or a shape that does not fit the layer. A ``ValueError`` (what
    torch.nn raises for a wrong rank) and a ``RuntimeError`` (what its kernels raise for a shape
    that does not fit, e.g. LayerNorm's ``normalized_shape``)."""


class ChannelMismatchError(ShapeError):
    """The input's channel dimension differs from the layer's ``num_features`` (torch's kernels
    raise ``RuntimeError``: "running_mean should contain 5 elements not 4")."""


class BatchTooSmallError(NormkitError, ValueError):
    """Training would compute statistics from a single value per channel (or group)."""


class DtypeError(NormkitError, TypeError, RuntimeError):
    """The input is not a floating-point tensor, or parameters, buffers and input disagree on dtype.
    A ``TypeError`` and a ``RuntimeError`` (torch's kernels raise the latter: "mixed dtype")."""


class DeviceError(NormkitError, RuntimeError):
    """Parameters, buffers and input are on different devices (torch raises ``RuntimeError``:
    "Expected all tensors to be on the same device")."""


class NonFiniteStatisticsError(NormkitError, ValueError):
    """A batch's statistics are NaN or Inf and the layer was asked to raise rather than skip."""


class BackendError(NormkitError, ValueError):
    """An unknown backend name, or a backend that cannot run on this device and dtype."""


class UnsupportedTransformError(NormkitError, RuntimeError):
    """A PyTorch transform a layer refuses in this configuration (``torch.jit.script``, vmap over a
    batch whose statistics would update the running ones, ...), with the reason and what to do
    instead. docs/transforms.md lists every refusal; a ``RuntimeError``, as torch's own are."""


class RankMismatchError(NormkitError, ValueError):
    """Ranks reached the same synchronized layer but disagree on how to run it (channels, dtype,
    eps, momentum, whether the input needs a gradient, how many synchronized steps it has taken).
    Raised on every rank, so no rank waits in a collective for a peer that has stopped."""


class RankSyncError(NormkitError, RuntimeError):
    """A collective did not complete: a peer never joined it (a rank in eval mode, control flow
    that differs across ranks), timed out, or died. A ``RuntimeError``, as torch.distributed's own
    timeouts are, so existing handlers keep working."""

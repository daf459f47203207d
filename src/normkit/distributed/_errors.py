"""The two ways a synchronized layer fails that a single process never does.

Both name the layer, the ranks involved and the fix, and both are raised on every rank of the
process group, so that no rank is left waiting in a collective for a peer that has stopped.
"""

from __future__ import annotations

from normkit.errors import NormkitError


class RankMismatchError(NormkitError, ValueError):
    """The ranks reached the same layer but disagree on how to run it (eps, momentum, whether the
    input needs a gradient, how many synchronized steps the layer has taken)."""


class RankSyncError(NormkitError, RuntimeError):
    """A collective did not complete: a peer never joined it (a rank in eval mode, control flow
    that differs across ranks), timed out, or died. A ``RuntimeError``, as torch.distributed's own
    timeouts are, so existing handlers keep working."""

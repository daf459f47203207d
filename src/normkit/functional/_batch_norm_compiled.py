"""The ``compiled`` batch norm on the CPU: forward + backward in the 8 passes over the tensor that
a two-pass normalization needs at least, fused by torch.compile (Inductor) in the input's layout.

ATen's CPU batch norm reads x twice for its statistics (the mean, then the centred variance),
once more to normalize, and twice x and dy in backward: 9 passes, each slower than a copy. Here
the statistics take one pass of shifted sums (:func:`shifted_moments`), then one normalize pass
(read x, write y), one reduction pass (``sum(dy)``, ``sum(dy * x_hat)``: read x and dy) and one
elementwise pass for dx (read x, dy, write dx): 8 passes, each a vectorized loop in the input's
own layout, channels_last reductions by blocks of positions (:func:`row_block`). For float32
inputs, contiguous or channels_last, the same four passes run as C loops instead
(:mod:`normkit.functional._plane_sums` for the sums, :mod:`normkit.functional._channel_pass` for
the normalize and dx passes, :mod:`normkit.functional._channel_epilogue` for the per-channel
steps between them), which reach the copy's speed where Inductor's reductions do not;
docs/benchmarks.md has the fraction of that bound each implementation reaches.

Where compiling cannot pay or cannot work, the call runs ATen's kernels instead (the same results
within float32 rounding):

- evaluation (``training=False``): one pass that reads x and writes y, which ATen's inference
  kernel already runs at memory speed (measured faster than the compiled pass, docs/benchmarks.md);
- inputs below ``_compiled.MIN_NUMEL`` elements: a compiled call costs tens of microseconds of
  guards and each new shape seconds of compilation, more than ATen needs for the whole layer. The
  C passes compile nothing and cost a few hundred microseconds a call; they run from
  ``C_MIN_NUMEL`` elements (1M), above which they beat ATen in NCHW (docs/benchmarks.md);
- inside the user's own torch.compile (which fuses ATen's batch norm into its graph), under
  ``torch.jit.trace`` and under torch.func transforms (vmap, grad, jvp), which need ATen's
  differentiable, batchable op (:func:`normkit.functional._compiled.worth_compiling`).

Double backward (``create_graph=True``) is supported: the backward then recomputes the layer with
ATen's twice-differentiable batch norm and differentiates that.
"""

from __future__ import annotations

import torch

from normkit.functional import _channel_epilogue, _channel_pass, _plane_sums
from normkit.functional._batch_norm import batch_dims
from normkit.functional._compiled import CompiledMaths, like_input, worth_compiling
from normkit.functional._moments import stats_dtype
from normkit.functional._normalize import channel_view
from normkit.functional._running_stats import compiling, update_running_stats
from normkit.functional._transforms import transforming

MIN_ROW_BLOCK, MAX_ROW_BLOCK = 8, 128  # positions per block of a channels_last reduction
C_MIN_NUMEL = 1 << 20  # the smallest input the C passes take (4 MB of float32)


def row_block(size: int) -> int:
    """Positions per block of a channels_last reduction: the largest divisor of ``size`` up to
    MAX_ROW_BLOCK (at least MIN_ROW_BLOCK), or 0 where there is none.

    A channels_last tensor reduced per channel over its positions directly makes Inductor's loop
    take 16 channels at a time and sweep every position once per 16 channels: a 64-byte read every
    256 bytes (64 channels of float32), four sweeps over memory. Viewed as blocks of K positions and
    reduced over each block first (all channels of a block: K * C values, a few KiB, in L1), then
    over the blocks, the tensor is read once, in order."""
    for rows in range(min(size, MAX_ROW_BLOCK), MIN_ROW_BLOCK - 1, -1):
        if size % rows == 0:
            return rows
    return 0


def channel_blocks(t: torch.Tensor) -> torch.Tensor | None:
    """A channels-innermost (N, C, *) tensor as (M / K, K, C) blocks of its M = N * S positions
    (:func:`row_block`), or None (another layout, or no block size)."""
    if t.dim() < 3 or t.is_contiguous() or not t.movedim(1, -1).is_contiguous():
        return None
    positions = t.numel() // t.shape[1]
    rows = row_block(positions)
    if not rows:
        return None
    return t.movedim(1, -1).reshape(positions // rows, rows, t.shape[1])


def sample_mean(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The mean over ``dims`` of a strided sample of ``x`` (at most 4 positions along each of them,
    a stride of ceil(size / 4), spread over the whole batch): a cheap estimate of the mean, kept
    with keepdim.

    At most 4^len(dims) values per kept index, whatever the shape (a stride of size // 4 took all
    7 positions of a 7 x 7 plane). The sample is gathered as (samples, *kept) and averaged over its
    first axis, except for the trailing dims of a contiguous tensor (NCHW planes), which ATen
    averages well in place; ATen's reduction of the strided sample itself was slow on wide
    channels_last tensors (docs/benchmarks.md, "The step between the passes")."""
    index = tuple(
        slice(None, None, -(-size // 4)) if d in dims else slice(None)
        for d, size in enumerate(x.shape)
    )
    sample = x[index]
    if x.is_contiguous() and tuple(dims) == tuple(range(x.dim() - len(dims), x.dim())):
        return sample.mean(dims, keepdim=True)
    kept = [d for d in range(x.dim()) if d not in dims]
    rows = sample.permute(*dims, *kept).reshape(-1, *(x.shape[d] for d in kept))
    return rows.mean(0).reshape([1 if d in dims else size for d, size in enumerate(x.shape)])


def shifted_moments(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over ``dims`` in one pass of sums (keepdim): the sums of
    d = x - k and d^2 with k a sampled mean (:func:`sample_mean`), var = (S2 - S1^2 / n) / n.

    Subtracting k first keeps the cancellation of S2 - S1^2 / n to the order of (mean - k)^2 / var,
    small for a sample of the data (PERF.md §4: a shifted sum of squares); E[x^2] - E[x]^2 itself
    would lose everything for inputs far from zero. Two additions and a multiply per element, where
    a Welford update divides: the pass runs at memory speed."""
    k = sample_mean(x, dims)
    d = x - k
    n = 1
    for i in dims:  # not math.prod over a generator, which Dynamo cannot trace
        n *= x.shape[i]
    s1 = d.sum(dims, keepdim=True)
    s2 = (d * d).sum(dims, keepdim=True)
    return k + s1 / n, ((s2 - s1 * s1 / n) / n).clamp_min(0.0)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel mean and biased variance of an (N, C, *) tensor over all its other dims, in one
    pass of shifted sums (:func:`shifted_moments`), by blocks of positions for channels_last
    (:func:`channel_blocks`); shaped for broadcasting against ``x``."""
    ndim = x.dim()
    blocks = channel_blocks(x)
    if blocks is None:
        return shifted_moments(x, batch_dims(ndim))
    n = blocks.shape[0] * blocks.shape[1]
    k = sample_mean(x, batch_dims(ndim)).reshape(-1)
    d = blocks - k
    s1, s2 = d.sum(1).sum(0), (d * d).sum(1).sum(0)
    mean = channel_view(k + s1 / n, ndim)
    return mean, channel_view(((s2 - s1 * s1 / n) / n).clamp_min(0.0), ndim)


def channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Per channel sum of an (N, C, *) tensor (or of an expression of tensors, which torch.compile
    fuses into the reduction), shape (C,): by blocks of positions for channels_last."""
    blocks = channel_blocks(t)
    return t.sum(batch_dims(t.dim())) if blocks is None else blocks.sum(1).sum(0)


def _forward_maths(x, weight, bias, eps: float):
    """Batch statistics in one pass of shifted sums (float32 for half inputs), then the normalize
    pass (:func:`_normalize_maths`)."""
    dtype = stats_dtype(x.dtype)
    xf = x.to(dtype)
    mean, var = (s.reshape(-1) for s in channel_moments(xf))
    y, invstd = _normalize_maths(xf, _as(weight, dtype), _as(bias, dtype), mean, var, eps)
    return y.to(x.dtype), mean, invstd, var


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _normalize_maths(x, weight, bias, mean, var, eps: float):
    """The normalize pass given the batch statistics (C,): y = (x - mean) invstd w + b."""
    ndim = x.dim()
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight
    y = (x - channel_view(mean, ndim)) * channel_view(scale, ndim)
    return (y if bias is None else y + channel_view(bias, ndim)), invstd


def _input_grad_maths(dy, x, weight, mean, invstd, sum_g, sum_gx):
    """The elementwise pass of the backward given the per-channel sums (Ioffe & Szegedy §3):
    dx = w invstd (g - sum g / n - x_hat sum g x_hat / n)."""
    ndim, n = x.dim(), x.numel() // x.shape[1]
    scale = invstd if weight is None else invstd * weight
    x_hat = (x - channel_view(mean, ndim)) * channel_view(invstd, ndim)
    g = dy - channel_view(sum_g / n, ndim) - x_hat * channel_view(sum_gx / n, ndim)
    return g * channel_view(scale, ndim)


def _in_c(*tensors: torch.Tensor) -> bool:
    """Whether float32 inputs, contiguous or channels_last, take the C passes
    (:mod:`._plane_sums`, :mod:`._channel_pass`) and the steps between them
    (:mod:`._channel_epilogue`)."""
    return (
        not compiling()
        and _channel_pass.available(*tensors)
        and _plane_sums.built()
        and _channel_epilogue.available()
    )


def _backward_maths(dy, x, weight, mean, invstd):
    """One reduction pass (sum g, sum g * x_hat per channel; by blocks for channels_last) and the
    elementwise pass of :func:`_input_grad_maths`."""
    ndim, dims, dtype = x.dim(), batch_dims(x.dim()), stats_dtype(x.dtype)
    xf, g = x.to(dtype), dy.to(dtype)
    blocks = channel_blocks(xf)
    if blocks is not None:
        g_blocks = g.movedim(1, -1).reshape(blocks.shape)
        sum_g = g_blocks.sum(1).sum(0)
        sum_gx = (g_blocks * ((blocks - mean) * invstd)).sum(1).sum(0)
    else:
        x_hat = (xf - channel_view(mean, ndim)) * channel_view(invstd, ndim)
        sum_g, sum_gx = g.sum(dims), (g * x_hat).sum(dims)
    dx = _input_grad_maths(g, xf, _as(weight, dtype), mean, invstd, sum_g, sum_gx)
    return dx.to(x.dtype), sum_gx, sum_g


def _aten(input, running_mean, running_var, weight, bias, training, momentum, eps):
    return torch.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps, False
    )


class _CompiledBatchNorm(torch.autograd.Function):
    """torch.batch_norm's contract in training (running statistics updated in place) on the
    compiled engine; saves x, the parameters and float32 mean and 1/std."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, in_c):
        ctx.in_c = in_c  # the C passes (decided once per call: compiled_batch_norm)
        n, updated = x.numel() // x.shape[1], False
        if in_c:  # shifted sums, the per-channel steps (and the running update) in C, normalize
            shift = sample_mean(x, batch_dims(x.dim())).reshape(-1)
            s1, s2 = _plane_sums.shifted_sums(x, x, shift, shift)
            mean, var, invstd, scale, updated = _channel_epilogue.statistics(
                s1, s2, shift, weight, eps, n, running_mean, running_var, momentum
            )
            y = _channel_pass.channel_pass(None, x, mean, None, scale, bias)
        else:
            y, mean, invstd, var = CompiledMaths.call(_forward_maths, x, weight, bias, eps)
        if running_mean is not None and running_var is not None and not updated:
            update_running_stats(running_mean, running_var, mean, var, n, momentum)
        y = like_input(y, x)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiate ATen's batch norm instead
            return _differentiable_backward(ctx, dy, x, weight, bias)
        if ctx.in_c:  # dx = w invstd (dy - sum g / n - x_hat sum g x_hat / n)
            dy = like_input(dy, x)  # dy in another layout, or expanded: into x's
            sg, sgx = _plane_sums.shifted_sums(dy, x, None, mean)
            sum_g, sum_gx, A, B, D = _channel_epilogue.input_grad_coefficients(
                sg, sgx, weight, invstd, x.numel() // x.shape[1]
            )  # sum_gx: sum(dy * x_hat)
            dx = _channel_pass.channel_pass(dy, x, mean, A, B, D) if needs[0] else None
        else:
            dx, sum_gx, sum_g = CompiledMaths.call(_backward_maths, dy, x, weight, mean, invstd)
        dx = None if dx is None else like_input(dx, x)
        dweight = sum_gx.to(weight.dtype) if weight is not None and needs[1] else None
        dbias = sum_g.to(bias.dtype) if bias is not None and needs[2] else None
        return (dx if needs[0] else None), dweight, dbias, None, None, None, None, None


def _differentiable_backward(ctx, dy, x, weight, bias):
    """The gradients as functions of the inputs (for a gradient of the gradient): the layer
    recomputed with ATen's batch norm (batch statistics, no running update), whose backward is
    itself differentiable."""
    y = torch.batch_norm(x, weight, bias, None, None, True, 0.0, ctx.eps, False)
    needs = ctx.needs_input_grad
    inputs = [t for t, need in zip((x, weight, bias), needs[:3], strict=True) if need]
    grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return (*(next(grads) if need else None for need in needs[:3]), None, None, None, None, None)


def _engine(input: torch.Tensor) -> str | None:
    """Which passes run ``input``: None for ATen's, below C_MIN_NUMEL elements where the C passes
    take it (below MIN_NUMEL elsewhere, :func:`worth_compiling`) and under a program transform;
    else ``"c"`` where the C passes take it, ``"inductor"`` where they do not."""
    in_c = _in_c(input)
    large = input.numel() >= C_MIN_NUMEL and in_c
    run = not transforming() if large else worth_compiling(input)
    return ("c" if in_c else "inductor") if run else None


def compiled_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """``torch.batch_norm``'s contract, compiled for large inputs (see the module docstring)."""
    engine = _engine(input) if training and input.numel() else None
    if engine is None:
        return _aten(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _CompiledBatchNorm.apply(
        input, weight, bias, running_mean, running_var, momentum, eps, engine == "c"
    )

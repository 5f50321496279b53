"""Triton kernels of the mdarts fused ops (forward and backward), with plain Python launchers.

Each launcher mirrors one schema of ``csrc/ops.cpp`` and is checked against
``mdarts_kernels.reference``. The launchers register nothing; wrapping them as custom ops
(fake kernels, autograd) is done elsewhere.

Shapes: every tensor in ``outs``/``xs`` and ``h``/``residual``/``grad`` share one shape
``(..., D)``; ``N = numel / D`` rows; ``weights`` is ``(K,)``; ``ln_weight``/``ln_bias`` are
``(K, D)``; the LayerNorm statistics ``mean``/``rstd`` are ``(K, N)``.

Numerics: loads are upcast to the accumulation dtype (float64 for float64 data, float32 for
float32, float16 and bfloat16), all arithmetic happens there, and results are cast back to
the dtype of the tensor they stand for. ``weights``, ``ln_weight`` and ``ln_bias`` may have any
float dtype; they are converted to the accumulation dtype before the launch.

Variable-length tensor lists: each list is passed as a tuple of tensors, a kernel argument like
any other; the kernel walks it with ``tl.static_range`` (K is a compile-time constant: one
compiled variant per list length, 2 to 14 here). The list is never stacked into a copy and
nothing is copied from the host per launch, so the launchers can be captured in a CUDA graph;
and Triton specialises each listed pointer on its 16-byte alignment, as it does every pointer
argument, so the kernels load the lists with vector instructions
(``.ci/check_triton_kernels.py`` compiles them for sm_90 and checks). Every launch runs under a
device guard for the device of its tensors, whatever the current device.

Indexing is 64-bit: program ids are cast to int64 before they are multiplied by a size.
Inputs are made contiguous; every output is contiguous. Row kernels hold a whole row in
registers (``BLOCK_D = next_power_of_2(D)``), so ``D`` is limited to ``MAX_BLOCK_D``.

The LayerNorm backward reduces the column sums ``S_k[j] = sum_n g[n, j] * xhat_k[n, j]`` and
``C[j] = sum_n g[n, j]`` through per-program partial buffers ``(P, K, D)`` and ``(P, D)``
that are summed with ``torch.sum`` afterwards: deterministic, no atomics.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .reference import OP_NAMES, accumulation_dtype, dropout_threshold

__all__ = ["MAX_BLOCK_D", *OP_NAMES]  # one launcher per op

MAX_BLOCK_D = 16384
"""Largest padded row length (a power of two) of the LayerNorm kernels."""

_ELEMENTWISE_BLOCK = 1024
_ROW_TILE_ELEMENTS = 4096
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------------


_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _tl_dtypes(dtype: torch.dtype) -> tuple[tl.dtype, tl.dtype]:
    """(Triton data dtype, Triton accumulation dtype) for data of ``dtype``."""
    return _TL_DTYPES[dtype], _TL_DTYPES[accumulation_dtype(dtype)]


def _check_list(tensors: Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Validate a non-empty list of same-shape, same-dtype, same-device float tensors.

    Returns the tensors made contiguous.
    """
    if len(tensors) == 0:
        raise ValueError(f"{name}: expected at least one tensor")
    first = tensors[0]
    if first.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {first.dtype}")
    for i, t in enumerate(tensors):
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{name}[{i}]: expected shape {tuple(first.shape)}, dtype {first.dtype}, device "
                f"{first.device}; got {tuple(t.shape)}, {t.dtype}, {t.device}"
            )
    return [t.contiguous() for t in tensors]


def _check_like(t: torch.Tensor, ref: torch.Tensor, name: str) -> torch.Tensor:
    """Check that ``t`` has the shape and device of ``ref``; return it contiguous."""
    if t.shape != ref.shape or t.device != ref.device:
        raise ValueError(
            f"{name}: expected shape {tuple(ref.shape)} on {ref.device}, got {tuple(t.shape)} on {t.device}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return t.contiguous()


def _check_vector(
    t: torch.Tensor, shape: tuple[int, ...], device: torch.device, acc: torch.dtype, name: str
) -> torch.Tensor:
    """Check the shape of a small parameter or statistics tensor; return it in the accumulation
    dtype, contiguous, on ``device``."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return t.to(device=device, dtype=acc).contiguous()


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A guard making ``t``'s GPU the current device (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _row_config(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_ROWS, num_warps) of a row kernel for rows of length ``d``."""
    if d < 1:
        raise ValueError("the last dimension D must be >= 1")
    block_d = max(16, triton.next_power_of_2(d))
    if block_d > MAX_BLOCK_D:
        raise ValueError(
            f"D={d} is too large for the Triton LayerNorm kernels (rows are held in registers; "
            f"at most {MAX_BLOCK_D} elements)"
        )
    block_rows = max(1, _ROW_TILE_ELEMENTS // block_d)
    num_warps = min(16, block_rows * block_d // 512)
    return block_d, block_rows, num_warps


def _max_programs(device: torch.device) -> int:
    """Upper bound on persistent programs for reductions: 2 per SM on CUDA, 8 elsewhere."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _launch_elementwise(kernel, like: torch.Tensor, numel: int, *args, **constexprs) -> None:
    """Launch an elementwise kernel over ``numel`` > 0 elements of data like ``like`` (its dtype,
    on its device): one program per ``_ELEMENTWISE_BLOCK`` elements; ``args`` and
    ``constexprs``, then DTYPE, ACC and BLOCK."""
    data_tl, acc_tl = _tl_dtypes(like.dtype)
    grid = (triton.cdiv(numel, _ELEMENTWISE_BLOCK),)
    with _on_device(like):
        kernel[grid](*args, **constexprs, DTYPE=data_tl, ACC=acc_tl, BLOCK=_ELEMENTWISE_BLOCK)


def _check_ln_data(h: torch.Tensor, outs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Check ``outs`` and ``h`` (like ``outs[0]``, at least one dimension) of the LayerNorm ops;
    return them contiguous."""
    xs = _check_list(outs, "outs")
    h = _check_like(h, xs[0], "h")
    if h.dtype != xs[0].dtype:
        raise TypeError(f"h: expected dtype {xs[0].dtype} (that of outs), got {h.dtype}")
    if h.dim() == 0:
        raise ValueError("h: expected at least one dimension")
    return h, xs


def _check_ln_params(
    weights: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    k_count: int,
    d: int,
    device: torch.device,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weights`` (K,) and ``ln_weight``, ``ln_bias`` (K, D) of the LayerNorm ops, checked as by
    :func:`_check_vector`."""
    return (
        _check_vector(weights, (k_count,), device, acc, "weights"),
        _check_vector(ln_weight, (k_count, d), device, acc, "ln_weight"),
        _check_vector(ln_bias, (k_count, d), device, acc, "ln_bias"),
    )


# --------------------------------------------------------------------------------------------
# Kernels. DTYPE is the element type of the listed tensors (tuples of K tensors), ACC the
# accumulation type.
# --------------------------------------------------------------------------------------------


@triton.jit
def _mixed_sum_fwd_kernel(
    xs, w_ptr, y_ptr, numel, K: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    """y[i] = sum_k w[k] * x_k[i] over one block of BLOCK flat elements."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=ACC)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + k)
        acc += w * tl.load(xs[k] + offs, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + offs, acc.to(DTYPE), mask=mask)


@triton.jit
def _mixed_sum_bwd_kernel(
    g_ptr,
    xs,
    gxs,
    w_ptr,
    partial_ptr,
    numel,
    K: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """gx_k = w[k] * g over one block; partial[pid, k] = sum over the block of g * x_k."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + k)
        x = tl.load(xs[k] + offs, mask=mask, other=0.0).to(ACC)
        tl.store(gxs[k] + offs, (w * g).to(DTYPE), mask=mask)
        tl.store(partial_ptr + pid * K + k, tl.sum(g * x, axis=0))


@triton.jit
def _mixed_ln_sum_fwd_kernel(
    h_ptr,
    xs,
    w_ptr,
    lnw_ptr,
    lnb_ptr,
    res_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    N,
    D,
    K: tl.constexpr,
    eps,
    sign,
    HAS_RESIDUAL: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One tile of BLOCK_ROWS rows: y = res + sign * sum_k w[k] * LN_k(h + x_k); stores mean/rstd[k, row]."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=ACC)
    mean_ptrs = mean_ptr + rows
    rstd_ptrs = rstd_ptr + rows
    lnw_ptrs = lnw_ptr + cols
    lnb_ptrs = lnb_ptr + cols
    for k in tl.static_range(K):
        z = h + tl.load(xs[k] + offs, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(z, axis=1) / D
        diff = tl.where(mask, z - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptrs, mean, mask=row_mask)
        tl.store(rstd_ptrs, rstd, mask=row_mask)
        lnw = tl.load(lnw_ptrs, mask=col_mask, other=0.0)
        lnb = tl.load(lnb_ptrs, mask=col_mask, other=0.0)
        w = tl.load(w_ptr + k)
        acc += w * (diff * rstd[:, None] * lnw[None, :] + lnb[None, :])
        mean_ptrs += N
        rstd_ptrs += N
        lnw_ptrs += D
        lnb_ptrs += D
    out = sign * acc
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixed_ln_sum_bwd_kernel(
    g_ptr,
    h_ptr,
    xs,
    gxs,
    gh_ptr,
    w_ptr,
    lnw_ptr,
    mean_ptr,
    rstd_ptr,
    partial_s_ptr,
    partial_c_ptr,
    N,
    D,
    K: tl.constexpr,
    rows_per_program,
    sign,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Persistent program over rows [pid * rows_per_program, ...), in tiles of BLOCK_ROWS rows.

    Writes gx_k = dz_k and gh = sum_k dz_k, accumulates partial_s[pid, k, :] += sum_rows g * xhat_k
    (partial_s zero-initialised, owned by this program) and stores partial_c[pid, :] = sum_rows g.
    """
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    c_acc = tl.zeros([BLOCK_D], dtype=ACC)
    for tile_start in range(row_start, row_end, BLOCK_ROWS):
        rows = tile_start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
        c_acc += tl.sum(g, axis=0)
        gh = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=ACC)
        mean_ptrs = mean_ptr + rows
        rstd_ptrs = rstd_ptr + rows
        lnw_ptrs = lnw_ptr + cols
        s_ptrs = partial_s_ptr + pid * K * D + cols
        for k in tl.static_range(K):
            x = tl.load(xs[k] + offs, mask=mask, other=0.0).to(ACC)
            mean = tl.load(mean_ptrs, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptrs, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (h + x - mean[:, None]) * rstd[:, None], 0.0)
            lnw = tl.load(lnw_ptrs, mask=col_mask, other=0.0)
            w = tl.load(w_ptr + k)
            dxhat = (sign * w) * g * lnw[None, :]
            c1 = tl.sum(dxhat * xhat, axis=1) / D
            c2 = tl.sum(dxhat, axis=1) / D
            dz = rstd[:, None] * (dxhat - c2[:, None] - xhat * c1[:, None])
            tl.store(gxs[k] + offs, dz.to(DTYPE), mask=mask)
            gh += dz
            s = tl.load(s_ptrs, mask=col_mask, other=0.0) + tl.sum(g * xhat, axis=0)
            tl.store(s_ptrs, s, mask=col_mask)
            mean_ptrs += N
            rstd_ptrs += N
            lnw_ptrs += D
            s_ptrs += D
        # The next tile reloads partial_s rows stored by other threads of this program.
        tl.debug_barrier()
        tl.store(gh_ptr + offs, gh.to(gh_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_c_ptr + pid * D + cols, c_acc, mask=col_mask)


@triton.jit
def _first_max(xs, n: tl.constexpr, offs, mask, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise maximum of the n tensors over one block and the index of the first tensor that
    holds it; a NaN counts as a maximum, so the first NaN wins and propagates."""
    best = tl.load(xs[0] + offs, mask=mask, other=0.0).to(ACC)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    for k in tl.static_range(1, n):
        x = tl.load(xs[k] + offs, mask=mask, other=0.0).to(ACC)
        take = (x > best) | ((x != x) & (best == best))
        best = tl.where(take, x, best)
        best_idx = tl.where(take, k, best_idx)
    return best, best_idx


@triton.jit
def _split_pool_fwd_kernel(
    xs, y_ptr, numel, n: tl.constexpr, IS_MAX: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    """y = elementwise max (NaN propagates, first one wins) or mean of the n tensors."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if IS_MAX:
        acc, _ = _first_max(xs, n, offs, mask, ACC, BLOCK)
    else:
        acc = tl.load(xs[0] + offs, mask=mask, other=0.0).to(ACC)
        for k in tl.static_range(1, n):
            acc += tl.load(xs[k] + offs, mask=mask, other=0.0).to(ACC)
        acc = acc / n
    tl.store(y_ptr + offs, acc.to(DTYPE), mask=mask)


@triton.jit
def _split_pool_bwd_kernel(
    g_ptr,
    xs,
    gxs,
    numel,
    n: tl.constexpr,
    IS_MAX: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """mean: gx_k = g / n. max: gx_k = g where k is the first index of the maximum, else 0."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    if IS_MAX:
        _, best_idx = _first_max(xs, n, offs, mask, ACC, BLOCK)
        for k in tl.static_range(n):
            tl.store(gxs[k] + offs, tl.where(best_idx == k, g, 0.0).to(DTYPE), mask=mask)
    else:
        gx = (g / n).to(DTYPE)
        for k in tl.static_range(n):
            tl.store(gxs[k] + offs, gx, mask=mask)


@triton.jit
def _mix32(h):
    """The 32-bit finaliser of csrc/dropout_hash.h on uint32 values."""
    h ^= h >> 16
    h = (h * 0x7FEB352D).to(tl.uint32)
    h ^= h >> 15
    h = (h * 0x846CA68B).to(tl.uint32)
    h ^= h >> 16
    return h


@triton.jit(do_not_specialize=["k0", "k1", "threshold"])
def _seeded_dropout_kernel(
    x_ptr, y_ptr, numel, k0, k1, threshold, scale, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    """y = x * (scale if mix32(mix32(lo ^ k0) + (k1 ^ hi)) >= threshold else 0) (lo, hi: the
    32-bit halves of the element index)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    lo = (offs & 0xFFFFFFFF).to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    h = _mix32((_mix32(lo ^ k0.to(tl.uint32)) + (k1.to(tl.uint32) ^ hi)).to(tl.uint32))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = x * tl.where(h >= threshold.to(tl.uint32), scale, 0.0)
    tl.store(y_ptr + offs, y.to(DTYPE), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def mixed_sum(outs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * outs[k]``.

    Args:
        outs: K >= 1 tensors of one shape ``S`` and dtype.
        weights: ``(K,)``, any float dtype.
    Returns:
        ``(S)`` tensor in the dtype of ``outs``, contiguous.
    """
    xs = _check_list(outs, "outs")
    acc = accumulation_dtype(xs[0].dtype)
    w = _check_vector(weights, (len(xs),), xs[0].device, acc, "weights")
    y = torch.empty_like(xs[0], memory_format=torch.contiguous_format)
    numel = y.numel()
    if numel == 0:
        return y
    _launch_elementwise(_mixed_sum_fwd_kernel, y, numel, tuple(xs), w, y, numel, len(xs))
    return y


def mixed_sum_backward(
    grad: torch.Tensor, outs: Sequence[torch.Tensor], weights: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Backward of :func:`mixed_sum`.

    Args:
        grad: ``(S)`` upstream gradient, any float dtype.
        outs: K tensors of shape ``S`` (the forward inputs).
        weights: ``(K,)``.
    Returns:
        ``grad_outs``: K tensors ``weights[k] * grad`` of shape ``S`` in the dtype of ``outs``;
        ``grad_weights``: ``(K,)`` with ``grad_weights[k] = sum(grad * outs[k])``, computed in
        the accumulation dtype and returned in ``weights.dtype``.
    """
    xs = _check_list(outs, "outs")
    g = _check_like(grad, xs[0], "grad")
    k_count = len(xs)
    acc = accumulation_dtype(xs[0].dtype)
    w = _check_vector(weights, (k_count,), xs[0].device, acc, "weights")
    grad_outs = [torch.empty_like(x) for x in xs]
    numel = g.numel()
    if numel == 0:
        return grad_outs, torch.zeros_like(weights)
    num_programs = triton.cdiv(numel, _ELEMENTWISE_BLOCK)  # those of _launch_elementwise
    partial = torch.empty((num_programs, k_count), dtype=acc, device=g.device)
    _launch_elementwise(_mixed_sum_bwd_kernel, xs[0], numel, g, tuple(xs), tuple(grad_outs), w, partial, numel, k_count)
    return grad_outs, partial.sum(0).to(weights.dtype)


def mixed_ln_sum(
    h: torch.Tensor,
    outs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor],
    sign: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual + sign * sum_k weights[k] * LayerNorm_k(h + outs[k])`` over the last dim.

    Args:
        h: ``(..., D)``; N = h.numel() / D rows.
        outs: K tensors of the shape and dtype of ``h``.
        weights: ``(K,)``; ln_weight, ln_bias: ``(K, D)``; any float dtypes.
        eps: LayerNorm epsilon (added to the biased variance).
        residual: ``(..., D)`` like ``h`` (any float dtype) or None (zero).
        sign: scale of the mixture, typically +1 or -1.
    Returns:
        ``out`` of the shape and dtype of ``h``; ``mean`` and ``rstd`` of ``h + outs[k]`` per row,
        ``(K, N)`` in the accumulation dtype.
    """
    h, xs = _check_ln_data(h, outs)
    k_count, d = len(xs), h.shape[-1]
    block_d, block_rows, num_warps = _row_config(d)
    acc = accumulation_dtype(h.dtype)
    w, lnw, lnb = _check_ln_params(weights, ln_weight, ln_bias, k_count, d, h.device, acc)
    res = None if residual is None else _check_like(residual, h, "residual")
    n_rows = h.numel() // d
    y = torch.empty_like(h)
    mean = torch.empty((k_count, n_rows), dtype=acc, device=h.device)
    rstd = torch.empty((k_count, n_rows), dtype=acc, device=h.device)
    if n_rows == 0:
        return y, mean, rstd
    dtype, acc_tl = _tl_dtypes(h.dtype)
    grid = (triton.cdiv(n_rows, block_rows),)
    with _on_device(h):
        _mixed_ln_sum_fwd_kernel[grid](
            h,
            tuple(xs),
            w,
            lnw,
            lnb,
            h if res is None else res,
            y,
            mean,
            rstd,
            n_rows,
            d,
            k_count,
            float(eps),
            float(sign),
            HAS_RESIDUAL=res is not None,
            DTYPE=dtype,
            ACC=acc_tl,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return y, mean, rstd


def mixed_ln_sum_backward(
    grad: torch.Tensor,
    h: torch.Tensor,
    outs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    sign: float,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`mixed_ln_sum` (the gradient of ``residual`` is ``grad`` itself).

    ``xhat_k`` is recomputed per row tile from ``h``, ``outs[k]``, ``mean`` and ``rstd``.

    Args:
        grad: ``(..., D)`` upstream gradient (any float dtype); h, outs, weights, ln_weight,
            ln_bias, sign: the forward inputs; mean, rstd: ``(K, N)`` from the forward.
    Returns:
        ``(grad_h, grad_outs, grad_weights, grad_ln_weight, grad_ln_bias)``: ``grad_h`` and the K
        ``grad_outs`` have the shape and dtype of ``h``; ``grad_weights`` is ``(K,)`` and
        ``grad_ln_weight``/``grad_ln_bias`` are ``(K, D)`` in the dtypes of their inputs.
    """
    h, xs = _check_ln_data(h, outs)
    g = _check_like(grad, h, "grad")
    k_count, d = len(xs), h.shape[-1]
    block_d, block_rows, num_warps = _row_config(d)
    n_rows = h.numel() // d
    acc = accumulation_dtype(h.dtype)
    w, lnw, lnb = _check_ln_params(weights, ln_weight, ln_bias, k_count, d, h.device, acc)
    mean = _check_vector(mean, (k_count, n_rows), h.device, acc, "mean")
    rstd = _check_vector(rstd, (k_count, n_rows), h.device, acc, "rstd")
    grad_h = torch.empty_like(h)
    grad_outs = [torch.empty_like(x) for x in xs]
    if n_rows == 0:
        return (grad_h, grad_outs, torch.zeros_like(weights), torch.zeros_like(ln_weight), torch.zeros_like(ln_bias))
    tiles = triton.cdiv(n_rows, block_rows)
    num_programs = min(tiles, _max_programs(h.device))
    rows_per_program = triton.cdiv(tiles, num_programs) * block_rows
    num_programs = triton.cdiv(n_rows, rows_per_program)
    partial_s = torch.zeros((num_programs, k_count, d), dtype=acc, device=h.device)
    partial_c = torch.empty((num_programs, d), dtype=acc, device=h.device)
    dtype, acc_tl = _tl_dtypes(h.dtype)
    with _on_device(h):
        _mixed_ln_sum_bwd_kernel[(num_programs,)](
            g,
            h,
            tuple(xs),
            tuple(grad_outs),
            grad_h,
            w,
            lnw,
            mean,
            rstd,
            partial_s,
            partial_c,
            n_rows,
            d,
            k_count,
            rows_per_program,
            float(sign),
            DTYPE=dtype,
            ACC=acc_tl,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    s = partial_s.sum(0)
    c = partial_c.sum(0)
    scale = sign * w
    grad_weights = sign * ((lnw * s).sum(1) + lnb @ c)
    return (
        grad_h,
        grad_outs,
        grad_weights.to(weights.dtype),
        (scale[:, None] * s).to(ln_weight.dtype),
        (scale[:, None] * c[None, :]).to(ln_bias.dtype),
    )


def _check_mode(mode: str) -> bool:
    """True for "max", False for "mean"; ValueError otherwise."""
    if mode not in ("max", "mean"):
        raise ValueError(f"mode: expected 'max' or 'mean', got {mode!r}")
    return mode == "max"


def split_pool(xs: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """Elementwise max or mean over a list of tensors.

    Args:
        xs: n >= 1 tensors of one shape ``S`` and dtype.
        mode: "max" (NaN propagates) or "mean".
    Returns:
        ``(S)`` tensor in the dtype of ``xs``, contiguous.
    """
    is_max = _check_mode(mode)
    ts = _check_list(xs, "xs")
    y = torch.empty_like(ts[0])
    numel = y.numel()
    if numel == 0:
        return y
    _launch_elementwise(_split_pool_fwd_kernel, y, numel, tuple(ts), y, numel, len(ts), IS_MAX=is_max)
    return y


def split_pool_backward(grad: torch.Tensor, xs: Sequence[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """Backward of :func:`split_pool`.

    Args:
        grad: ``(S)`` upstream gradient (any float dtype); xs: the n forward inputs.
        mode: "max" or "mean".
    Returns:
        n tensors of shape ``S`` in the dtype of ``xs``: ``grad / n`` each for "mean"; for "max",
        ``grad`` at the first index holding the maximum (strict ``>`` scanning from 0; the first
        NaN if any) and zeros elsewhere.
    """
    is_max = _check_mode(mode)
    ts = _check_list(xs, "xs")
    g = _check_like(grad, ts[0], "grad")
    grads = [torch.empty_like(t) for t in ts]
    numel = g.numel()
    if numel == 0:
        return grads
    _launch_elementwise(_split_pool_bwd_kernel, ts[0], numel, g, tuple(ts), tuple(grads), numel, len(ts), IS_MAX=is_max)
    return grads


def seeded_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Dropout whose keep mask is a pure function of (seed, element index), as
    ``reference.seeded_dropout``; also its own backward (applied to the gradient).

    Args:
        x: a float tensor of any shape ``S``.
        p: drop probability in [0, 1).
        seed: int in [-2**63, 2**63); its two 32-bit halves key the hash.
    Returns:
        ``(S)`` tensor in the dtype of x, contiguous.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a dropout probability in [0, 1), got {p!r}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x: expected a float64, float32, float16 or bfloat16 tensor, got {x.dtype}")
    x = x.contiguous()
    y = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return y
    scale = 1.0 / (1.0 - p)
    _launch_elementwise(
        _seeded_dropout_kernel,
        x,
        numel,
        x,
        y,
        numel,
        seed & 0xFFFFFFFF,
        (seed >> 32) & 0xFFFFFFFF,
        dropout_threshold(p),
        scale,
    )
    return y

"""Pure-PyTorch reference of every fused op: the ground truth the kernels are tested against.

Shapes: every tensor in ``outs``/``xs`` and ``h``/``residual`` share one shape ``(..., D)``;
``weights`` is ``(K,)``; ``ln_weight`` and ``ln_bias`` are ``(K, D)``. Arithmetic is done in
float32 (float64 for float64 inputs) and the result is cast back to the inputs' dtype.
Differentiable through ordinary autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

OP_NAMES = (
    "mixed_sum",
    "mixed_sum_backward",
    "mixed_ln_sum",
    "mixed_ln_sum_backward",
    "split_pool",
    "split_pool_backward",
    "seeded_dropout",
)
"""The names of the fused ops, forward and backward, in ``torch.ops.mdarts`` (csrc/ops.cpp); the
Triton launchers (``triton_kernels``) and the fake kernels (``ops``) bear the same names."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 data, float32 for float32, float16 and bfloat16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixed_sum(outs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * outs[k]; shape of outs[0]."""
    acc = accumulation_dtype(outs[0].dtype)
    w = weights.to(acc)
    total = outs[0].to(acc) * w[0]
    for k in range(1, len(outs)):
        total = total + outs[k].to(acc) * w[k]
    return total.to(outs[0].dtype)


def mixed_ln_sum(
    h: torch.Tensor,
    outs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    sign: float = 1.0,
) -> torch.Tensor:
    """residual + sign * sum_k weights[k] * LayerNorm_k(h + outs[k]); shape of h."""
    acc = accumulation_dtype(h.dtype)
    dim = h.shape[-1]
    w = weights.to(acc)
    h_acc = h.to(acc)
    total = None
    for k, out in enumerate(outs):
        normed = F.layer_norm(h_acc + out.to(acc), (dim,), ln_weight[k].to(acc), ln_bias[k].to(acc), eps)
        term = normed * w[k]
        total = term if total is None else total + term
    total = total * sign
    if residual is not None:
        total = residual.to(acc) + total
    return total.to(h.dtype)


def split_pool(xs: Sequence[torch.Tensor], mode: str = "max") -> torch.Tensor:
    """Elementwise max (the gradient goes to the first maximum) or mean of xs."""
    acc = accumulation_dtype(xs[0].dtype)
    stacked = torch.stack([x.to(acc) for x in xs])
    if mode == "max":
        pooled = stacked.max(dim=0).values
    elif mode == "mean":
        pooled = stacked.mean(dim=0)
    else:
        raise ValueError(f"mode: expected 'max' or 'mean', got {mode!r}")
    return pooled.to(xs[0].dtype)


# --- seeded dropout: a counter-based mask, a pure function of (seed, element index) ---------

_MASK32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for int64 h in [0, 2**32), without int64 overflow."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply, 'lowbias32')."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """The uint32 threshold of keep probability 1 - p: an element is kept when its hash >= it."""
    return min(int(p * 4294967296.0), _MASK32)


def dropout_keep(shape: Sequence[int], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The keep mask (bool, ``shape``) of :func:`seeded_dropout`.

    Element i (row-major index) is kept when mix(mix(lo ^ k0) + (k1 ^ hi)) >= threshold(p),
    where lo, hi are the low and high 32 bits of i and k0, k1 those of ``seed``.
    """
    numel = 1
    for size in shape:
        numel *= size
    index = torch.arange(numel, dtype=torch.int64, device=device)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    h = _mix32(((_mix32((index & _MASK32) ^ k0) + ((index >> 32) ^ k1)) & _MASK32))
    return (h >= dropout_threshold(p)).reshape(tuple(shape))


def seeded_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Dropout with a mask that is a pure function of (seed, index): x * (keep ? 1 / (1 - p) : 0)
    in the accumulation dtype (a NaN stays NaN, as in torch's dropout); shape of x.
    Its gradient is the same dropout applied to the incoming gradient."""
    acc = accumulation_dtype(x.dtype)
    factor = dropout_keep(x.shape, p, seed, x.device).to(acc) * (1.0 / (1.0 - p))
    return (x.to(acc) * factor).to(x.dtype)

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

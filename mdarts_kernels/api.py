"""The public fused-op API: argument checks, then the op of the backend in force.

Every function takes tensors shaped ``(..., D)`` (any leading dims; LayerNorm and pooling
work on the last dim D), computes in float32 (float64 for float64 inputs) and returns the
inputs' dtype. Bad arguments raise ValueError naming the argument and what was expected.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import ops, reference
from .backend import resolve_backend

_DATA_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_list(tensors: Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise ValueError(f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name}: expected at least one tensor (K >= 1), got an empty list")
    first = tensors[0]
    for k, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}[{k}]: expected a tensor, got {type(t).__name__}")
        if t.dtype not in _DATA_DTYPES:
            raise ValueError(f"{name}[{k}]: expected a float64, float32, float16 or bfloat16 tensor, got {t.dtype}")
        if t.dim() == 0:
            raise ValueError(f"{name}[{k}]: expected at least one dimension (the feature axis D), got a scalar")
        _check_like(t, first, f"{name}[{k}]", f"{name}[0]")
    if first.shape[-1] == 0:
        raise ValueError(f"{name}: expected a feature axis D >= 1, got shape {tuple(first.shape)}")
    return tensors


def _check_like(t: Tensor, like: Tensor, name: str, like_name: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} like {like_name}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name}: expected dtype {like.dtype} like {like_name}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} like {like_name}, got {t.device}")


def _check_param(t: Tensor, shape: tuple[int, ...], device: torch.device, name: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {shape}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} like the data, got {t.device}")


def _backend_ops(device: torch.device):
    name = resolve_backend(device)
    return None if name == "reference" else getattr(ops, name)


def mixed_sum(outs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """sum_k weights[k] * outs[k].

    outs: K tensors of one shape (..., D), dtype and device; weights: (K,) float.
    Returns a tensor shaped like outs[0].
    """
    outs = _check_list(outs, "outs")
    _check_param(weights, (len(outs),), outs[0].device, "weights")
    backend = _backend_ops(outs[0].device)
    if backend is None:
        return reference.mixed_sum(outs, weights)
    return backend.mixed_sum(outs, weights)


def mixed_ln_sum(
    h: Tensor,
    outs: Sequence[Tensor],
    weights: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    sign: float = 1.0,
) -> Tensor:
    """residual + sign * sum_k weights[k] * (LayerNorm(h + outs[k]) * ln_weight[k] + ln_bias[k]).

    h, outs[k], residual: (..., D), one dtype and device; weights: (K,); ln_weight, ln_bias:
    (K, D); residual None means 0. Returns a tensor shaped like h. The backward saves only
    per-row statistics (2 x K x rows floats) besides the inputs.
    """
    outs = _check_list(outs, "outs")
    _check_like(h, outs[0], "h", "outs[0]")
    dim = h.shape[-1]
    _check_param(weights, (len(outs),), h.device, "weights")
    _check_param(ln_weight, (len(outs), dim), h.device, "ln_weight")
    _check_param(ln_bias, (len(outs), dim), h.device, "ln_bias")
    if residual is not None:
        _check_like(residual, h, "residual", "h")
    if not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    backend = _backend_ops(h.device)
    if backend is None:
        return reference.mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, eps, residual, sign)
    return backend.mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, float(eps), residual, float(sign))[0]


def rev_coupling_forward(
    x: Tensor, h: Tensor, outs: Sequence[Tensor], weights: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float = 1e-5
) -> Tensor:
    """Reversible coupling y = x + G(h), G the DARTS node sum_k w_k LN_k(h + outs[k]). Shapes as mixed_ln_sum."""
    return mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, eps, residual=x, sign=1.0)


def rev_coupling_inverse(
    y: Tensor, h: Tensor, outs: Sequence[Tensor], weights: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float = 1e-5
) -> Tensor:
    """Inverse coupling x = y - G(h), with G as in rev_coupling_forward. Shapes as mixed_ln_sum."""
    return mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, eps, residual=y, sign=-1.0)


def split_pool(xs: Sequence[Tensor], mode: str = "max") -> Tensor:
    """Elementwise max or mean of n tensors of one shape (..., D); returns that shape.

    For "max" the gradient goes to the first tensor that holds the maximum.
    """
    if mode not in ("max", "mean"):
        raise ValueError(f"mode: expected 'max' or 'mean', got {mode!r}")
    xs = _check_list(xs, "xs")
    if len(xs) == 1:
        return xs[0]
    backend = _backend_ops(xs[0].device)
    if backend is None:
        return reference.split_pool(xs, mode)
    return backend.split_pool(xs, mode)


def seeded_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """Dropout whose mask is a pure function of (seed, element index): x * keep / (1 - p).

    x: a float tensor of any shape; p: drop probability in [0, 1); seed: an int in
    [-2**63, 2**63). Returns a tensor shaped like x. The same (x, p, seed) always gives the
    same result on every backend and device, and nothing is saved for the backward (the
    gradient is this dropout of the incoming gradient, the mask rebuilt from the seed), so
    the caller owns the randomness: draw a new seed per call (``draw_seed``).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dtype not in _DATA_DTYPES:
        raise ValueError(f"x: expected a float64, float32, float16 or bfloat16 tensor, got {x.dtype}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a dropout probability in [0, 1), got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [-2**63, 2**63), got {seed!r}")
    backend = _backend_ops(x.device)
    if backend is None:
        return reference.seeded_dropout(x, float(p), seed)
    return backend.seeded_dropout(x, float(p), seed)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A seed for :func:`seeded_dropout` in [0, 2**63), drawn from the CPU generator
    (the default one unless ``generator`` is given), so torch.manual_seed and saving or
    restoring the CPU RNG state govern it, whatever the data's device."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator).item())

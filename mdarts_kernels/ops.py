"""The mdarts custom ops: fake kernels and autograd, for the cpp and triton backends.

The cpp ops (``torch.ops.mdarts.<name>``) get their schemas and CPU/CUDA kernels from the
compiled extension ``mdarts_kernels._C``. The triton ops (``torch.ops.mdarts.triton_<name>``)
are opaque ``torch.library.custom_op`` wrappers around the Triton launches, so that
``torch.compile(fullgraph=True)`` treats them as single nodes (this also works under the
Triton CPU interpreter, where tracing into a ``triton_op`` does not). Both share one fake
implementation and one autograd formula per op: the backward is itself a fused op.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from .reference import OP_NAMES, accumulation_dtype

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.mdarts.*)

    EXTENSION_ERROR: Optional[str] = None
except ImportError as error:  # the package can still run its reference and triton backends
    EXTENSION_ERROR = f"{type(error).__name__}: {error}"


def has_cuda_kernels() -> bool:
    """True when the extension loaded with its CUDA kernels compiled in."""
    return EXTENSION_ERROR is None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"mdarts::{name}", "CUDA") for name in OP_NAMES
    )


def _new_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# --- fake (meta) implementations, shared by both backends -------------------------------
# Their signatures follow the schemas of csrc/ops.cpp; the triton ops take theirs from them.


def _fake_mixed_sum(outs: list[Tensor], weights: Tensor) -> Tensor:
    torch._check(len(outs) >= 1, lambda: "outs: expected at least one tensor")
    return _new_like(outs[0])


def _fake_mixed_sum_backward(grad: Tensor, outs: list[Tensor], weights: Tensor) -> tuple[list[Tensor], Tensor]:
    return [_new_like(o) for o in outs], torch.empty_like(weights)


def _fake_mixed_ln_sum(
    h: Tensor,
    outs: list[Tensor],
    weights: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    residual: Optional[Tensor],
    sign: float,
) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(len(outs) >= 1, lambda: "outs: expected at least one tensor")
    rows = math.prod(h.shape[:-1])
    acc = accumulation_dtype(h.dtype)
    mean = h.new_empty((len(outs), rows), dtype=acc)
    rstd = h.new_empty((len(outs), rows), dtype=acc)
    return _new_like(h), mean, rstd


def _fake_mixed_ln_sum_backward(
    grad: Tensor,
    h: Tensor,
    outs: list[Tensor],
    weights: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mean: Tensor,
    rstd: Tensor,
    sign: float,
) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]:
    return (
        _new_like(h),
        [_new_like(o) for o in outs],
        torch.empty_like(weights),
        _new_like(ln_weight),
        _new_like(ln_bias),
    )


def _fake_split_pool(xs: list[Tensor], mode: str) -> Tensor:
    torch._check(len(xs) >= 1, lambda: "xs: expected at least one tensor")
    return _new_like(xs[0])


def _fake_split_pool_backward(grad: Tensor, xs: list[Tensor], mode: str) -> list[Tensor]:
    return [_new_like(x) for x in xs]


def _fake_seeded_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    return _new_like(x)


_FAKES = {
    "mixed_sum": _fake_mixed_sum,
    "mixed_sum_backward": _fake_mixed_sum_backward,
    "mixed_ln_sum": _fake_mixed_ln_sum,
    "mixed_ln_sum_backward": _fake_mixed_ln_sum_backward,
    "split_pool": _fake_split_pool,
    "split_pool_backward": _fake_split_pool_backward,
    "seeded_dropout": _fake_seeded_dropout,
}


# --- autograd, shared by both backends ----------------------------------------------------


def _register_autograd(ops: SimpleNamespace, qualname: str) -> None:
    """Attach autograd to the forward ops of one backend; ``ops`` holds its op handles."""

    def setup_mixed_sum(ctx, inputs, output):
        outs, weights = inputs
        ctx.num_outs = len(outs)
        ctx.weights_need_grad = weights.requires_grad
        # outs are only needed for the weights' gradient
        ctx.save_for_backward(weights, *(outs if ctx.weights_need_grad else ()))

    def backward_mixed_sum(ctx, grad):
        weights, *outs = ctx.saved_tensors
        if not ctx.weights_need_grad:
            w = weights.to(accumulation_dtype(grad.dtype))
            return [(grad * w[k]).to(grad.dtype) for k in range(ctx.num_outs)], None
        grad_outs, grad_weights = ops.mixed_sum_backward(grad.contiguous(), outs, weights)
        return grad_outs, grad_weights

    def setup_mixed_ln_sum(ctx, inputs, output):
        h, outs, weights, ln_weight, ln_bias, _eps, residual, sign = inputs
        _out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.sign = sign
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h, weights, ln_weight, ln_bias, mean, rstd, *outs)

    def backward_mixed_ln_sum(ctx, grad, _grad_mean, _grad_rstd):
        h, weights, ln_weight, ln_bias, mean, rstd, *outs = ctx.saved_tensors
        if grad is None:
            grad = torch.zeros_like(h)
        grad_h, grad_outs, grad_w, grad_lnw, grad_lnb = ops.mixed_ln_sum_backward(
            grad.contiguous(), h, outs, weights, ln_weight, ln_bias, mean, rstd, ctx.sign
        )
        grad_residual = grad if ctx.has_residual else None
        return grad_h, grad_outs, grad_w, grad_lnw, grad_lnb, None, grad_residual, None

    def setup_split_pool(ctx, inputs, output):
        xs, mode = inputs
        ctx.mode = mode
        ctx.num_xs = len(xs)
        # the mean's gradient needs no inputs; the max's recomputes its argmax from them
        ctx.save_for_backward(*(xs if mode == "max" else xs[:1]))

    def backward_split_pool(ctx, grad):
        xs = list(ctx.saved_tensors)
        if ctx.mode == "mean":
            xs = xs * ctx.num_xs
        return ops.split_pool_backward(grad.contiguous(), xs, ctx.mode), None

    def setup_seeded_dropout(ctx, inputs, output):
        _x, ctx.p, ctx.seed = inputs  # the mask is rebuilt from the seed: nothing is saved

    def backward_seeded_dropout(ctx, grad):
        return ops.seeded_dropout(grad.contiguous(), ctx.p, ctx.seed), None, None

    torch.library.register_autograd(f"{qualname}mixed_sum", backward_mixed_sum, setup_context=setup_mixed_sum)
    torch.library.register_autograd(f"{qualname}mixed_ln_sum", backward_mixed_ln_sum, setup_context=setup_mixed_ln_sum)
    torch.library.register_autograd(f"{qualname}split_pool", backward_split_pool, setup_context=setup_split_pool)
    torch.library.register_autograd(
        f"{qualname}seeded_dropout", backward_seeded_dropout, setup_context=setup_seeded_dropout
    )


def _register_fakes(qualname: str) -> None:
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{qualname}{name}", fake)


# --- the cpp backend: schemas and kernels from the extension ---------------------------

cpp = (
    SimpleNamespace(**{name: getattr(torch.ops.mdarts, name) for name in OP_NAMES}) if EXTENSION_ERROR is None else None
)
if cpp is not None:
    _register_fakes("mdarts::")
    _register_autograd(cpp, "mdarts::")


# --- the triton backend: opaque custom ops around the Triton launches ------------------


def _triton_kernels():
    from . import triton_kernels

    return triton_kernels


def _define_triton_op(name: str) -> torch.library.CustomOpDef:
    """The opaque custom op ``mdarts::triton_<name>`` around the launcher ``triton_kernels.<name>``.

    Its schema is inferred from the signature of the fake of ``name``, which is that of the cpp op.
    """

    def launch(*args):
        return getattr(_triton_kernels(), name)(*args)

    launch.__signature__ = inspect.signature(_FAKES[name])
    return torch.library.custom_op(f"mdarts::triton_{name}", launch, mutates_args=())


# held here: torch keeps custom op definitions only through weak references
_TRITON_OPS = {name: _define_triton_op(name) for name in OP_NAMES}

triton = SimpleNamespace(**{name: getattr(torch.ops.mdarts, f"triton_{name}") for name in OP_NAMES})
_register_fakes("mdarts::triton_")
_register_autograd(triton, "mdarts::triton_")

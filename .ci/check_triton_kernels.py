"""Compile every Triton kernel for an H100/H200 (sm_90) without a GPU, through its launcher, and
fail unless every kernel loads its tensor lists with vector instructions.

The launchers run on CPU tensors of typical shapes; each kernel launch is intercepted, its
arguments specialised as Triton does for a CUDA device (16-byte alignment of pointers and
integers included) and compiled ahead of time to PTX. A kernel given lists of K tensors must
hold at least K vector loads (``ld.global.v2``/``.v4``...): the compiler knows the listed
tensors' alignment. (A pointer read from a table in memory carries none, and every access
becomes a scalar load.) Uses Triton's binder and
``triton.compile`` (internal API of the installed Triton).

    python .ci/check_triton_kernels.py
"""

from __future__ import annotations

import os
import re
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the check compiles the kernels for a GPU")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import mdarts_kernels.triton_kernels as tk

TARGET = GPUTarget("cuda", 90, 32)
VECTOR_LOAD = re.compile(r"ld\.global(?:\.\w+)*\.v[248]")
ptx: dict[str, list[tuple[int, str]]] = {}  # kernel name: (list length K, PTX) of each variant


def compile_instead(kernel: JITFunction):
    """A replacement for ``kernel.run`` that compiles for TARGET and launches nothing."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)

    def run(*args, grid, warmup, **kwargs):
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__
        )
        k = next((len(arg) for arg in args if isinstance(arg, tuple)), 0)
        ptx.setdefault(kernel.__name__, []).append((k, compiled.asm["ptx"]))

    return run


def main() -> None:
    kernels = [
        value for value in vars(tk).values() if isinstance(value, JITFunction) and value.__name__.endswith("_kernel")
    ]
    for kernel in kernels:
        kernel.run = compile_instead(kernel)
    for dtype in (torch.float32, torch.bfloat16):
        for k in (2, 14):
            xs = [torch.randn(8, 24, 96).to(dtype) for _ in range(k)]
            h, weights = torch.randn(8, 24, 96).to(dtype), torch.randn(k)
            ln_weight, ln_bias = torch.randn(k, 96), torch.randn(k, 96)
            tk.mixed_sum(xs, weights)
            tk.mixed_sum_backward(h, xs, weights)
            y, mean, rstd = tk.mixed_ln_sum(h, xs, weights, ln_weight, ln_bias, 1e-5, h, -1.0)
            tk.mixed_ln_sum_backward(h, h, xs, weights, ln_weight, ln_bias, mean, rstd, -1.0)
            tk.split_pool(xs, "max")
            tk.split_pool(xs, "mean")
            tk.split_pool_backward(h, xs, "max")
        tk.seeded_dropout(xs[0], 0.1, 1234)
    missing = [kernel.__name__ for kernel in kernels if kernel.__name__ not in ptx]
    if missing:
        sys.exit(f"never launched: {', '.join(missing)}")
    scalar = sorted(
        {name for name, variants in ptx.items() for k, text in variants if len(VECTOR_LOAD.findall(text)) < k}
    )
    if scalar:
        sys.exit(
            f"tensor lists loaded without vector loads (alignment unknown to the compiler) in: {', '.join(scalar)}"
        )
    count = sum(len(p) for p in ptx.values())
    print(f"{count} Triton kernel variants compiled for sm_90 (triton {triton.__version__}); list loads vectorised")


if __name__ == "__main__":
    main()

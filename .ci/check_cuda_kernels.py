"""Fail unless the built extension registered a CUDA kernel for every mdarts op."""

import sys

import torch

import mdarts_kernels.ops as ops

if ops.EXTENSION_ERROR is not None:
    sys.exit(f"the extension did not load: {ops.EXTENSION_ERROR}")
missing = [
    name for name in ops.OP_NAMES if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mdarts::{name}", "CUDA")
]
if missing:
    sys.exit(f"no CUDA kernel registered for: {', '.join(missing)}")
print(f"CUDA kernels registered for all {len(ops.OP_NAMES)} ops (torch {torch.__version__}, CUDA {torch.version.cuda})")

"""Fused DARTS ops for PyTorch: mixed sums, LayerNorm-wrapped mixed sums, reversible
couplings, split pooling and seeded (counter-based) dropout, with reference, C++/CUDA and Triton backends.

See ``mdarts_kernels.api`` for the ops and ``mdarts_kernels.backend`` for backend choice;
``accumulation_dtype(dtype)`` is the dtype every op computes in for inputs of ``dtype``.
"""

from .api import (
    draw_seed,
    mixed_ln_sum,
    mixed_sum,
    rev_coupling_forward,
    rev_coupling_inverse,
    seeded_dropout,
    split_pool,
)
from .backend import Availability, available_backends, current_backend, use_backend
from .reference import accumulation_dtype

__all__ = [
    "Availability",
    "accumulation_dtype",
    "available_backends",
    "current_backend",
    "draw_seed",
    "mixed_ln_sum",
    "mixed_sum",
    "rev_coupling_forward",
    "rev_coupling_inverse",
    "seeded_dropout",
    "split_pool",
    "use_backend",
]

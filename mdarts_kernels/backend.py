"""Backend choice: which implementation of the fused ops runs.

Backends: "reference" (pure PyTorch, always works), "cpp" (the compiled extension's C++ CPU
kernels, and its CUDA kernels when it was built with them), "triton" (Triton kernels: on a
CUDA device, or on the CPU under ``TRITON_INTERPRET=1``). "auto" picks, for the tensors'
device, cpp when it has kernels there, else triton (never the slow CPU interpreter), else
reference.

The choice is held in a ``contextvars.ContextVar``, so threads and tasks each see their own.
Under ``torch.compile`` the choice is read once, at tracing (``assume_constant_result``:
Dynamo cannot trace ``ContextVar.get`` in every torch version), so a compiled function
keeps the backend it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

BACKENDS = ("reference", "cpp", "triton")
_CHOICES = ("auto",) + BACKENDS

_current = contextvars.ContextVar("mdarts_backend", default="auto")


@dataclass(frozen=True)
class Availability:
    """Whether a backend works on a device, and why (not)."""

    ok: bool
    reason: str


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, _CHOICES))}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fused ops inside the block with backend ``name`` ("auto", "reference", "cpp", "triton")."""
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


@torch.compiler.assume_constant_result
def current_backend() -> str:
    """The backend name in force here ("auto" unless inside ``use_backend``)."""
    return _current.get()


def _cpp_availability(device_type: str) -> Availability:
    from . import ops

    if ops.EXTENSION_ERROR is not None:
        return Availability(False, f"the compiled extension mdarts_kernels._C did not load: {ops.EXTENSION_ERROR}")
    if device_type == "cpu":
        return Availability(True, "C++ CPU kernels")
    if device_type == "cuda":
        if not ops.has_cuda_kernels():
            return Availability(
                False, "the extension was built without CUDA kernels (MDARTS_CUDA=0, a CPU build of torch, or no nvcc)"
            )
        if not torch.cuda.is_available():
            return Availability(False, "CUDA kernels are compiled in, but no CUDA device is available")
        return Availability(True, "CUDA kernels")
    return Availability(False, f"no C++ kernels for device type {device_type!r}")


def _triton_availability(device_type: str) -> Availability:
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "triton is not installed")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device is available")
        return Availability(True, "Triton kernels on CUDA")
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return Availability(True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow, for tests)")
        return Availability(False, "Triton runs on the CPU only under TRITON_INTERPRET=1")
    return Availability(False, f"no Triton kernels for device type {device_type!r}")


def backend_availability(name: str, device_type: str) -> Availability:
    """Whether backend ``name`` works for tensors on ``device_type`` ("cpu", "cuda", ...)."""
    _check_name(name)
    if name == "reference":
        return Availability(True, "pure PyTorch")
    if name == "cpp":
        return _cpp_availability(device_type)
    if name == "triton":
        return _triton_availability(device_type)
    raise ValueError("backend: 'auto' is a choice, not a backend")


def available_backends(device: Optional[torch.device | str] = None) -> dict[str, Availability]:
    """Each backend's availability on ``device`` (default: CUDA when present, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {name: backend_availability(name, device_type) for name in BACKENDS}


def resolve_backend(device: torch.device) -> str:
    """The backend that runs for tensors on ``device``, given the current choice.

    Raises RuntimeError when a backend was asked for explicitly and does not work there.
    """
    choice = current_backend()
    if choice != "auto":
        status = backend_availability(choice, device.type)
        if not status.ok:
            raise RuntimeError(f"backend {choice!r} cannot run on {device}: {status.reason}")
        return choice
    preference = ("cpp", "reference") if device.type == "cpu" else ("cpp", "triton", "reference")
    for name in preference:
        if backend_availability(name, device.type).ok:
            return name
    return "reference"

"""Measuring memory (docs/design.md 4): the resident set (now, peak, and a reset of the peak),
device memory in use, the peak of a step above its set-up, and the bytes autograd saves for
backward."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar, Union

import torch

T = TypeVar("T")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Reset the peak resident set size to the current one (Linux: /proc/self/clear_refs),
    so that earlier transients (the import of torch, set-up) do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Peak resident set size since the start or the last :func:`reset_peak_rss`."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_in_use(device: torch.device) -> int:
    """Bytes in use: CUDA allocated memory on a GPU, the resident set on the CPU (0 if unknown)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        return current_rss_bytes()
    except (OSError, RuntimeError):
        return 0


def peak_memory(device: torch.device) -> int:
    """Peak bytes so far: CUDA max allocated on a GPU, the peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def peak_above(fn: Callable[[], T], device: Union[torch.device, str] = "cpu") -> tuple[T, int]:
    """Run ``fn()`` and return ``(its result, peak bytes above the set-up)``: the most memory in
    use at any moment while ``fn`` ran, minus the memory in use just before it started (the
    set-up: weights, gradient buffers, optimizer state, inputs), in bytes, never below 0.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` (the peak statistics
    are reset first; the device is synchronised before and after). CPU: the peak resident set
    (VmHWM, reset first with :func:`reset_peak_rss` so that earlier transients do not count)
    minus the resident set before ``fn``; run it in a fresh process with glibc's
    ``MALLOC_MMAP_THRESHOLD_`` lowered so that the resident set follows the live tensors (an
    in-process RSS peak after other work is not reliable). Linux only on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - baseline)
    reset_peak_rss()
    baseline = current_rss_bytes()
    result = fn()
    return result, max(0, peak_rss_bytes() - baseline)


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs, each storage counted once;
    the storages of ``exclude`` (e.g. the parameters, or the inputs) are not counted."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    del result
    return sum(storages.values())

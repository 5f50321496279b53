"""Helpers shared by the benchmarks: device names, versions, timing, fresh processes, JSON lines.

Memory is measured with :mod:`mdarts.memory` (``peak_above``: the peak of a step above its set-up)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch


def backends_for(device: torch.device) -> list[str]:
    """The mdarts_kernels backends to time on ``device``: reference, cpp and (on CUDA) triton,
    those that run there; the Triton CPU interpreter is for tests, not speed."""
    import mdarts_kernels as mk

    names = ["reference", "cpp"] + (["triton"] if device.type == "cuda" else [])
    return [b for b in names if mk.available_backends(device)[b].ok]


def versions() -> dict:
    """Versions of the pieces that decide the figures."""
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median time in ms of each fn, timed round-robin so that noise hits all alike; ``clock``
    is the wall clock by default (time.process_time: CPU time of the process, which on a CPU
    shared with other processes leaves out the time spent waiting for a core)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = clock()
            fn()
            synchronize(device)
            times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def run_child(module: str, args: Iterable[str], mmap_threshold: Optional[int] = 65536) -> dict:
    """Run ``python -m module args`` (``module`` such as "benchmarks.memory") in a fresh process
    started in the repository root, and parse the last line it prints as JSON.

    ``mmap_threshold`` sets glibc's M_MMAP_THRESHOLD (bytes): blocks at least that large are
    mapped on their own and go back to the system when freed, so the resident set follows the
    live tensors; None leaves malloc as it is (for timing, where mapping costs system calls)."""
    args = list(args)
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(command, cwd=REPOSITORY_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {module} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def append_json_lines(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def write_markdown(path: Path, lines: list[str]) -> None:
    """Write ``lines`` as the markdown file ``path`` (its folder made, overwritten) and print them."""
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)

"""The processes of a run and the machine they run on: the process group torchrun describes
(:class:`Ranks`), seeding (:func:`seed_everything`), the device (:func:`resolve_device`,
:func:`device_name`), whether the CPU has fast bfloat16 (:func:`cpu_supports_bf16`) and the
code's version (:func:`code_version`).
"""

from __future__ import annotations

import os
import platform
import random
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one run (``torchrun``'s RANK, WORLD_SIZE and
    LOCAL_RANK; one process: rank 0 of 1). Rank 0 writes every file of the run; every process
    reads the run directory, so on several machines it lies on a shared file system.

    The gradients of a step are summed over the processes (:meth:`reduce`, or bucket by bucket
    during the backward by :class:`mdarts.reduction.BucketedReduce`) after each process
    has divided its summed loss by the step's token count over all of them (:meth:`sum`), so
    the processes get exactly the gradient of one process holding every batch, and their
    weights and architecture logits stay identical, by construction."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device: str) -> "Ranks":
        """Join the process group that torchrun's environment describes (NCCL for a CUDA
        ``device``, else gloo); one process when WORLD_SIZE is unset or 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """:func:`resolve_device` of ``name``; a CUDA device is the one of this process's local rank."""
        device = resolve_device(name)
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (float64; themselves in one process)."""
        if self.world_size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def reduce(self, tensors: list[Tensor]) -> None:
        """Sum ``tensors`` (gradients) over the processes, in place, in one flat message."""
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds in any process: one decision to stop for every process."""
        if self.world_size == 1:
            return flag
        return bool(self.sum([float(flag)])[0])

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def check_same(self, settings: dict[str, Any]) -> None:
        """ValueError, in every process, naming the settings whose values differ between the
        processes (they must all run the same command)."""
        if self.world_size == 1:
            return
        everyone: list[dict[str, Any]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(everyone, settings)
        differ = sorted({key for other in everyone for key in settings if other.get(key) != settings[key]})
        if differ:
            shown = "; ".join(f"{key}: {[other.get(key) for other in everyone]}" for key in differ)
            raise ValueError(f"the {self.world_size} processes were started with different settings ({shown})")


ONE_PROCESS = Ranks()
"""The ranks of a run in one process."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device). Call it before anything
    random is built: the model's initialisation depends on it."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str, argument: str = "--device") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given.
    ValueError naming ``argument`` for another name or for CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{argument}: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{argument}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{argument}: {name!r} requested but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{argument}: {name!r} requested but there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 at full speed, as oneDNN reports it (AVX-512 or AMX):
    without it, bf16 autocast on the CPU is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def device_name(device: torch.device) -> str:
    """A human-readable name of the device: the GPU model, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    vector = torch.backends.cpu.get_cpu_capability()  # AVX2, AVX512, ...: decides bf16 and kernel speed
    bf16 = "native bf16" if cpu_supports_bf16() else "no native bf16"
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {vector}, {bf16})"


def warn_if_slow_bf16(bf16: bool, device: torch.device) -> None:
    """Warn when bf16 autocast is asked for on a CPU that would emulate it (see :func:`cpu_supports_bf16`)."""
    if bf16 and device.type == "cpu" and not cpu_supports_bf16():
        warnings.warn(
            f"--bf16: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no fast bfloat16, so autocast "
            "emulates it and a training step runs several times slower than in float32 (`python -m "
            "benchmarks.train_step`: 5x to 11x on an AVX2 CPU); leave --bf16 off on this machine",
            stacklevel=3,
        )


CODE_DIRS = ("mdarts", "mdarts_kernels", "csrc")  # what decides a run's numbers


def code_version() -> Optional[str]:
    """The git commit of the package's checkout (``+modified`` when its code differs from that
    commit), or None when the package is not a git checkout: recorded with a result, it tells
    which code produced it."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # an installed copy (which may sit inside another checkout)
        return None

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        modified = git("diff", "--quiet", "HEAD", "--", *CODE_DIRS).returncode != 0
    except OSError:  # no git
        return None
    return head.stdout.strip() + ("+modified" if modified else "")

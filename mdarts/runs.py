"""The run layer shared by training (:mod:`mdarts.train`) and search (:mod:`mdarts.search`).

* seeding (:func:`seed_everything`), device choice (:func:`resolve_device`), whether the CPU
  has fast bfloat16 (:func:`cpu_supports_bf16`) and the code's version (:func:`code_version`);
* the learning-rate schedule (:func:`inverse_sqrt_lr`);
* one atomic write (:func:`write_atomic`), used for every file mdarts writes;
* JSON-lines logs with one schema (:class:`JsonLog`: every record has ``"event"`` and ``"step"``);
* a run directory (:class:`RunDirectory`): claiming it (refuse, overwrite or resume) and the
  one resume policy (settings not marked resumable must match, see
  :meth:`mdarts.config.Settings.changed_on_resume`);
* a clock that sums a run's time over resumes (:class:`RunClock`);
* SIGINT and SIGTERM turned into a stop after the current step (:class:`StopSignals`);
* work shared out between processes that run the same command (:func:`exclusive`);
* the check that a resume or an evaluation uses the data its run was made from
  (:func:`check_same_data`);
* the validation loss of a model on a set of batches (:func:`evaluate_loss`);
* several processes (:class:`Ranks`): the process group torchrun describes, gradients and
  sums reduced over it, one decision to stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .loss import label_smoothed_loss

PathLike = Union[str, "os.PathLike[str]"]
Content = Union[bytes, str, Callable[[IO[bytes]], None]]


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


def inverse_sqrt_lr(step: int, peak: float, warmup_steps: int) -> float:
    """Learning rate of update ``step`` (1-based): ``peak * min(step / warmup, sqrt(warmup / step))``."""
    step = max(step, 1)
    return peak * min(step / warmup_steps, math.sqrt(warmup_steps / step))


def write_atomic(path: PathLike, content: Content) -> Path:
    """Write ``content`` (bytes, text, or a function writing to a binary file) to ``path``
    atomically: into a temporary file beside it, flushed to disk, then renamed over it. A crash
    or an exception (raised by the function, say a check of what it wrote: ``out.name`` is the
    temporary file's path) leaves any previous
    file intact and no temporary behind. The file gets the usual mode (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        with open(tmp_name, "wb") as out:
            if callable(content):
                content(out)
            else:
                out.write(content.encode() if isinstance(content, str) else content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class JsonLog:
    """A JSON-lines log: one record a line, each with ``"event"`` (what happened) and ``"step"``.
    With ``writes`` False (a process of a run other than rank 0) it reads but never writes."""

    def __init__(self, path: PathLike, writes: bool = True) -> None:
        self.path = Path(path)
        self.writes = writes

    def append(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        """Append ``{"event": event, "step": step, **fields}``; returns the record."""
        record = {"event": event, "step": step, **fields}
        if self.writes:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        return record

    def read(self, event: Optional[str] = None) -> list[dict[str, Any]]:
        """The records (only those of ``event`` when given); empty when there is no log."""
        if not self.path.is_file():
            return []
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return records if event is None else [r for r in records if r["event"] == event]

    def size(self) -> int:
        """Bytes logged so far (a checkpoint records it; :meth:`cut` goes back to it)."""
        return self.path.stat().st_size if self.path.is_file() else 0

    def cut(self, size: int) -> None:
        """Keep the first ``size`` bytes (what was logged when a checkpoint recorded :meth:`size`),
        atomically: a resume drops what its run logged after that checkpoint."""
        if self.writes and self.size() > size:
            with self.path.open("rb") as handle:
                write_atomic(self.path, handle.read(size))

    def truncate(self, last_step: int) -> None:
        """Drop the records of steps after ``last_step`` (written after the checkpoint a resume
        starts from) and those marked ``"partial": true`` (a summary cut short by the stop,
        which the resumed run continues), atomically."""
        if self.writes and self.path.is_file():
            kept = [r for r in self.read() if r["step"] <= last_step and not r.get("partial")]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


class RunDirectory:
    """A run's directory: the files a run of this ``kind`` ("training", "search") writes and the
    one checkpoint a resume starts from, as :attr:`KINDS` lists them.

    A directory holding a run of another kind (any file of :attr:`KINDS` other than this
    kind's) is refused whatever the options: resuming or overwriting it would mix two runs.
    """

    KINDS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
        "training": (
            "checkpoint_last.pt",
            ("log.jsonl", "curves.png", "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_avg.pt"),
            ("checkpoint_step*.pt",),
        ),
        "search": (
            "search_checkpoint.pt",
            ("search_checkpoint.pt", "genotype.json", "alpha_history.jsonl", "alpha_heatmap.png", "search_log.jsonl"),
            (),
        ),
    }
    """Every kind of mdarts run: its resumable checkpoint, the files it writes and the glob
    patterns of further files (numbered checkpoints). One table, so that each kind can refuse a
    directory holding another kind's run without importing the other's module."""

    def __init__(self, path: PathLike, kind: str) -> None:
        self.path = Path(path)
        self.kind = kind
        checkpoint, self.files, self.patterns = self.KINDS[kind]
        self.checkpoint = self.path / checkpoint

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def existing(self) -> list[Path]:
        """The run files present now."""
        return self._present(self.files, self.patterns)

    def foreign(self) -> dict[str, list[Path]]:
        """The files of runs of other kinds (:attr:`KINDS`) present now, by kind; a name this
        kind writes too is not counted."""
        own = set(self.existing())
        found = {
            kind: [p for p in self._present(*names) if p not in own]
            for kind, (_, *names) in self.KINDS.items()
            if kind != self.kind
        }
        return {kind: paths for kind, paths in found.items() if paths}

    def _present(self, files: Iterable[str], patterns: Iterable[str]) -> list[Path]:
        if not self.path.is_dir():
            return []
        found = [self.path / name for name in files if (self.path / name).exists()]
        return found + sorted(p for pattern in patterns for p in self.path.glob(pattern))

    @staticmethod
    def _names(paths: list[Path], shown: int = 4) -> str:
        return ", ".join(p.name for p in paths[:shown]) + (", ..." if len(paths) > shown else "")

    def check(self, resume: bool, overwrite: bool) -> None:
        """Check, changing nothing, that the directory can be claimed: one holding a run is
        refused (FileExistsError) unless ``resume`` (its checkpoint must exist:
        FileNotFoundError) or ``overwrite``; one holding a run of another kind is refused
        (FileExistsError) in every case; a path that is a file: NotADirectoryError."""
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"--out {self.path}: exists and is not a directory")
        for kind, paths in self.foreign().items():
            raise FileExistsError(
                f"--out {self.path} holds a {kind} run ({self._names(paths)}), not a {self.kind} run; choose another "
                f"directory (--overwrite deletes only a {self.kind} run's files)"
            )
        if resume:
            if not self.checkpoint.is_file():
                raise FileNotFoundError(
                    f"nothing to resume: {self.checkpoint} does not exist (no run to continue in {self.path})"
                )
            return
        present = self.existing()
        if present and not overwrite:
            raise FileExistsError(
                f"{self.path} already holds another {self.kind} run ({self._names(present)}); resume it (--resume), "
                "start afresh with --overwrite (deletes it) or choose another directory"
            )

    def claim(self, resume: bool, overwrite: bool) -> None:
        """:meth:`check`, then create the directory; with ``overwrite`` (and not ``resume``)
        delete the old run's files (only those); in every case delete the temporary files that a
        process killed while writing one of them left behind (see :meth:`stale_temporaries`).
        Call it after every setting has been checked, so that a refused setting deletes nothing."""
        self.check(resume, overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.stale_temporaries():
            stale.unlink(missing_ok=True)
        if not resume:
            for old in self.existing():
                old.unlink()

    def stale_temporaries(self) -> list[Path]:
        """The temporary files of :func:`write_atomic` (``.NAME.XXXX.tmp``) for this kind's run
        files, left by a process killed (SIGKILL, power cut) in the middle of a write."""
        if not self.path.is_dir():
            return []
        names = (*self.files, *self.patterns)
        return sorted({p for name in names for p in self.path.glob(f".{name}.*.tmp")})


class RunClock:
    """Seconds a run has spent, summed over its resumed parts."""

    def __init__(self, before: float = 0.0) -> None:
        self.before = before
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started


SIGNAL_NAMES = ("SIGINT", "SIGTERM")
"""What a run stopped by a signal reports as its reason (see :class:`StopSignals`)."""


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM ask the run to stop: the first sets
    :attr:`requested` to the signal's name, and the loop finishes its step, writes a checkpoint
    and returns; a second raises KeyboardInterrupt at once (every file is written atomically, so
    nothing is left half-written). Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        print(
            f"\nmdarts: {self.requested} received: finishing the current step and writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )


@contextlib.contextmanager
def exclusive(path: PathLike) -> Iterator[bool]:
    """Hold the lock file ``path`` while the body runs: yields True when this process holds it,
    False when another process does. The operating system releases the lock when its holder
    exits, killed or not, so a lock never outlives its process. The file itself stays (removing
    it would let two processes lock two different files of one name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def check_same_data(saved: Optional[dict], current: dict, path: PathLike, action: str = "resume from") -> None:
    """ValueError naming ``path`` and what differs when ``current`` (a
    :meth:`~mdarts.prepare.PreparedData.identity`) is not what the run was made from (``saved``;
    checkpoints older than this record have none and are not checked)."""
    if not saved:
        return
    names = {"pair": "translation direction", "tokenizer_sha256": "tokenizer", "train_sha256": "training data"}
    differ = [
        f"{names[key]} ({saved[key][:12]} in the checkpoint, {current[key][:12]} now)"
        for key in names
        if key in saved and saved[key] != current.get(key)
    ]
    if differ:
        raise ValueError(
            f"cannot {action} {path}: it was made from other data: {'; '.join(differ)}; give the --pair, --data-dir "
            "and --vocab-size it was made with"
        )


def spent_budget(steps: int, max_steps: Optional[int], clock: RunClock, max_minutes: Optional[float]) -> Optional[str]:
    """Which budget is spent: "max_steps" once ``steps`` reach ``max_steps``, "max_minutes" once
    ``clock`` passes ``max_minutes``, else None (a budget of None never ends)."""
    if max_steps is not None and steps >= max_steps:
        return "max_steps"
    if max_minutes is not None and clock.seconds() >= 60.0 * max_minutes:
        return "max_minutes"
    return None


def check_resume(saved: Any, current: Any, path: PathLike) -> None:
    """ValueError naming ``path`` and each setting of ``current`` (a settings dataclass) that
    differs from ``saved`` and may not change on a resume."""
    changed = current.changed_on_resume(saved)
    if changed:
        raise ValueError(f"cannot resume from {path} with different settings: {', '.join(changed)}")


def evaluate_loss(
    model: nn.Module, batches: Iterable, pad_id: int, smoothing: float, device: torch.device, bf16: bool = False
) -> dict[str, float]:
    """Token-weighted mean label-smoothed loss and NLL (nats/token), perplexity exp(nll) and the
    token count of ``batches`` (of :class:`~mdarts.batching.Batch`), in eval mode without
    gradients, under bf16 autocast if asked; the model's mode is restored."""
    was_training = model.training
    model.eval()
    loss_sum = nll_sum = 0.0
    tokens = 0
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for batch in batches:
                batch = batch.to(device)
                loss, nll, count = label_smoothed_loss(model(batch.src, batch.tgt_in), batch.tgt_out, pad_id, smoothing)
                loss_sum += float(loss)
                nll_sum += float(nll)
                tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate_loss: the validation batches hold no target tokens")
    return {"loss": loss_sum / tokens, "nll": nll_sum / tokens, "ppl": math.exp(nll_sum / tokens), "tokens": tokens}

"""The run loop that training (:class:`mdarts.train.Trainer`) and search
(:class:`mdarts.search.Searcher`) share (docs/design.md 2): the device and process group,
seeding before anything random is built, batches shared out over the processes
(:class:`BatchStream`), the random numbers of each batch (:func:`batch_randomness`), budgets
and the one decision to stop (:meth:`RunLoop.stop_reason`),
SIGINT and SIGTERM (:class:`StopSignals`), the checks of an exact resume
(:func:`check_resume`, :func:`check_same_data`), the log rewound to the checkpoint, progress,
and one result type (:class:`RunResult`). A run supplies its step, its evaluation and its
checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import torch
from torch import nn

from .batching import Batch, TokenBatches
from .config import RunSettings
from .files import JsonLog, PathLike, RunDirectory
from .processes import ONE_PROCESS, Ranks, seed_everything, warn_if_slow_bf16
from .progress import Progress


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
    nothing is left half-written). Outside the main thread it does nothing. It says on stderr
    that the run is stopping while :attr:`announces` (set it False in all but rank 0)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self.announces = True
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
        if not self.announces:
            return
        print(
            f"\nmdarts: {self.requested} received: finishing the current step and writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )


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


@contextlib.contextmanager
def batch_randomness(seed: int, step: int, index: int, device: torch.device) -> Iterator[None]:
    """While active, the random numbers drawn (the seeds of the dropout masks, from the CPU RNG;
    on CUDA also the Philox state of attention dropout) are a function of (``seed``, update
    ``step``, ``index``: the batch's place among the step's batches, :meth:`BatchStream.index`)
    alone: the CPU RNG, and the CUDA one of ``device``, are seeded from their hash inside
    ``torch.random.fork_rng``, so the run's own random stream is left as it was. A batch thus
    gets the same masks whichever process takes it and at whichever place of that process's
    share (docs/design.md 2.3). Seeding costs microseconds, once per batch."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    number = int.from_bytes(digest, "big") >> 1  # 63 bits
    cuda = device.type == "cuda"
    index_of_device = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index_of_device] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(number)
        if cuda:
            with torch.cuda.device(index_of_device):
                torch.cuda.manual_seed(number)
        yield


class BatchStream:
    """Endless batches over a set of sentence pairs, epoch after epoch, resumable, shared out
    among the processes of a run: each step takes the next ``ranks.world_size * per_process``
    batches of the epoch, this process those at its rank (rank, rank + world_size, ...); an
    epoch's last batches that do not fill a step are left out, and the next epoch starts as
    soon as the step that ends one has taken its batches. The processes thus see disjoint
    parts of every epoch.

    Batch order is a function of (seed, epoch) (see :class:`~mdarts.batching.TokenBatches`),
    so :meth:`state` (epoch, batches of it taken by all processes) is all a resumed run needs,
    with any number of processes."""

    def __init__(
        self,
        src_ids: Sequence[Sequence[int]],
        tgt_ids: Sequence[Sequence[int]],
        max_tokens: int,
        seed: int,
        *,
        max_positions: int,
        pad_id: int,
        name: str,
        ranks: Ranks = ONE_PROCESS,
        per_process: int = 1,
    ) -> None:
        self.name, self.ranks, self.per_process = name, ranks, per_process
        self.batches = TokenBatches(
            src_ids, tgt_ids, max_tokens, seed=seed, shuffle=True, max_positions=max_positions, pad_id=pad_id
        )
        self.per_step = ranks.world_size * per_process
        _check_some(self.batches, name, max_tokens, max_positions)
        if len(self.batches) < self.per_step:
            raise ValueError(
                f"--max-tokens: the {name} data makes {len(self.batches)} batch(es), fewer than the {self.per_step} "
                f"of a step ({ranks.world_size} processes x {per_process}); every pair longer than "
                f"max_tokens={max_tokens} or max_positions={max_positions} is left out"
            )
        self.epoch, self.position = 0, 0

    def take(self) -> list[Batch]:
        """This process's ``per_process`` batches of the next step (CPU tensors)."""
        start = self.position + self.ranks.rank
        mine = [self.batches[start + j * self.ranks.world_size] for j in range(self.per_process)]
        self.position += self.per_step
        if self.position + self.per_step > len(self.batches):
            self.load_state({"epoch": self.epoch + 1, "position": 0})
        return mine

    def index(self, j: int) -> int:
        """The place among the step's batches of this process's ``j``-th batch of the step (as
        :meth:`take` hands them out): the same batch has the same place however the step is
        shared out, e.g. 2 processes of 1 batch or 1 process of 2."""
        return self.ranks.rank + j * self.ranks.world_size

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        """Continue at batch ``position`` of epoch ``epoch``."""
        self.epoch, self.position = state["epoch"], state["position"]
        self.batches.set_epoch(self.epoch)


def _check_some(batches: TokenBatches, name: str, max_tokens: int, max_positions: int) -> None:
    if len(batches) == 0:
        raise ValueError(f"--max-tokens: no {name} pair fits max_tokens={max_tokens} and max_positions={max_positions}")


@dataclass
class RunResult:
    """What a run (training or search) produced: the steps done in all, why it stopped (a
    budget: "max_steps", "max_epochs", "max_minutes", "patience", "stable"; or a signal,
    "SIGINT" or "SIGTERM", then only the checkpoint is written and a resume continues), its
    directory, the peak memory (bytes; CUDA max allocated or CPU peak resident set), its last
    validation loss (None without one), tokens per second, and what the run adds (``details``:
    a training's epochs, best loss and checkpoints; a search's genotype)."""

    steps: int
    stopped_by: str
    out_dir: Path
    peak_memory_bytes: int
    val_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    details: dict[str, Any] = field(default_factory=dict)


class RunLoop:
    """A run in its directory: what training and search share. Built with the run directory
    (checked at once: a directory holding another run is refused unless ``resume`` or
    ``overwrite``), the settings (a :class:`~mdarts.config.RunSettings`: budget, seed, device)
    and whether to show progress. A run derived from it builds its model with :meth:`build`,
    claims the directory with :meth:`claim` once every setting has been checked, and supplies

    * ``steps`` (steps done), :meth:`budget_reason` (a spent budget, or None),
    * :meth:`take_step` (one step with its logging, evaluation and checkpoints),
    * :meth:`save` (the checkpoint a resume starts from; it records :meth:`log_sizes`, which a
      resume cuts the logs back to with :meth:`rewind`),
    * :meth:`finish` (the end of a run that was not stopped by a signal) and :meth:`stopped`
      (the result of one that was).

    ``kind`` is the run directory's kind and ``label`` the progress bar's; a run whose
    ``reseed_after_build`` is set seeds again once its model is built, so that its random
    stream (dropout, batch order) does not depend on how many numbers the initialisation drew."""

    kind: ClassVar[str]
    label: ClassVar[str]
    reseed_after_build: ClassVar[bool] = False

    def __init__(self, out_dir: PathLike, settings: RunSettings, *, resume: bool, overwrite: bool, progress) -> None:
        self.run_dir = RunDirectory(out_dir, self.kind)
        self.run_dir.check(resume, overwrite)
        self.settings = settings
        self.ranks = Ranks.from_environment(settings.device)
        self.device = self.ranks.device(settings.device)
        warn_if_slow_bf16(settings.bf16, self.device)
        self.show_progress = progress
        self.clock = RunClock()
        self.signals = StopSignals()
        self.logs: dict[str, JsonLog] = {}

    @property
    def steps(self) -> int:
        raise NotImplementedError

    def build(self, make: Callable[[], nn.Module]) -> nn.Module:
        """``make()`` on the run's device, seeded before it is called (the seed decides the
        initialisation), and again after if ``reseed_after_build``."""
        seed_everything(self.settings.seed)
        model = make().to(self.device)
        if self.reseed_after_build:
            seed_everything(self.settings.seed)
        return model

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Claim the run directory (rank 0 takes its lock, held until :meth:`run` ends; with
        ``overwrite``, the old run's files go), once every setting has been checked; the other
        processes wait for it, and every process raises when rank 0 could not claim it."""
        error: Optional[Exception] = None
        if self.ranks.main:
            try:
                self.run_dir.claim(resume, overwrite)
            except Exception as caught:  # raised below, once every process knows
                error = caught
        if self.ranks.any(error is not None):
            if error is not None:
                raise error
            raise FileExistsError(
                f"--out {self.run_dir.path}: rank 0 could not claim the run directory (its error says why)"
            )

    def open_log(self, name: str, file: str) -> JsonLog:
        """The JSON-lines log ``file`` of the run directory (written by rank 0), known as ``name``."""
        self.logs[name] = JsonLog(self.run_dir / file, writes=self.ranks.main)
        return self.logs[name]

    def log_sizes(self) -> dict[str, int]:
        """The bytes of every log, recorded in a checkpoint."""
        return {name: log.size() for name, log in self.logs.items()}

    def rewind(self, sizes: dict[str, int]) -> None:
        """A resume: cut every log back to what it held when the checkpoint was written."""
        for name, log in self.logs.items():
            log.cut(sizes[name])

    def budget_reason(self) -> Optional[str]:
        raise NotImplementedError

    def stop_reason(self, signals: bool = True) -> Optional[str]:
        """Why the run stops now, decided for all processes at once: a signal to any of them
        (unless ``signals`` is False), a spent budget (:meth:`budget_reason`) in any, or None."""
        reason = self.budget_reason()
        signal_name = self.signals.requested if signals else None
        signalled, stopping = self.ranks.sum([float(signal_name is not None), float(reason is not None)])
        if signalled:
            return signal_name or "SIGTERM"  # another process was signalled
        return reason or ("another process" if stopping else None)

    def take_step(self, bar: Progress) -> None:
        raise NotImplementedError

    def save(self) -> None:
        raise NotImplementedError

    def finish(self, stopped_by: str, bar: Progress) -> RunResult:
        raise NotImplementedError

    def stopped(self, stopped_by: str) -> RunResult:
        raise NotImplementedError

    def run(self) -> RunResult:
        """Steps until a budget is spent or a signal asks to stop, then :meth:`finish`; after a
        signal (SIGINT, SIGTERM: the step in progress ends first), only :meth:`save`. The run
        directory's lock goes when it returns or raises."""
        self.clock = RunClock(self.clock.seconds())
        shown = self.show_progress if self.ranks.main else False
        bar = Progress(self.settings.max_steps, self.label, self.device, initial=self.steps, enabled=shown)
        signals = StopSignals()
        signals.announces = self.ranks.main  # of several processes, rank 0 says it is stopping
        try:
            with signals as self.signals:
                try:
                    while (stopped_by := self.stop_reason()) is None:
                        self.take_step(bar)
                finally:
                    bar.close()
            if stopped_by in SIGNAL_NAMES:
                self.save()
                return self.stopped(stopped_by)
            return self.finish(stopped_by, bar)
        finally:
            self.run_dir.release()

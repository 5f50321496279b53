"""Files of a run: one atomic write for every file mdarts writes (:func:`write_atomic`),
JSON-lines logs with one schema (:class:`JsonLog`), a run directory claimed by one run of one
kind (:class:`RunDirectory`) and written by one process at a time (:class:`RunLock`), and locks
that share work out between processes (:func:`exclusive`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
Content = Union[bytes, str, Callable[[IO[bytes]], None]]


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
        self.lock = RunLock(self.path)

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
        """Check, changing nothing, that the directory can be claimed: one another process is
        writing is refused (RunDirectoryBusy); one holding a run is refused (FileExistsError)
        unless ``resume`` (its checkpoint must exist: FileNotFoundError) or ``overwrite``; one
        holding a run of another kind is refused (FileExistsError) in every case; a path that
        is a file: NotADirectoryError."""
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"--out {self.path}: exists and is not a directory")
        if not self.lock.held:  # a directory another process is writing is refused as such, first
            self.lock.check_free()
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
            resumable = "resume it (--resume), " if self.checkpoint.is_file() else "it saved no checkpoint to resume; "
            raise FileExistsError(
                f"{self.path} already holds another {self.kind} run ({self._names(present)}); {resumable}"
                "start afresh with --overwrite (deletes it) or choose another directory"
            )

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Take the directory for this process: :meth:`check`, create the directory, take its
        :class:`RunLock` (held until :meth:`release`; RunDirectoryBusy while another process
        holds it), :meth:`check` again (another process may have written a run meanwhile), then
        delete the temporary files that a process killed while writing left behind (see
        :meth:`stale_temporaries`) and, with ``overwrite`` (and not ``resume``), the old run's
        files (only those; never the lock). Call it after every setting has been checked, so
        that a refused setting deletes nothing."""
        self.check(resume, overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self.check(resume, overwrite)
            for stale in self.stale_temporaries():
                stale.unlink(missing_ok=True)
            if not resume:
                for old in self.existing():
                    old.unlink()
        except BaseException:
            self.lock.release()
            raise

    def release(self) -> None:
        """Let the directory go (:meth:`RunLock.release`): the run has ended."""
        self.lock.release()

    def stale_temporaries(self) -> list[Path]:
        """The temporary files of :func:`write_atomic` (``.NAME.XXXX.tmp``) for this kind's run
        files, left by a process killed (SIGKILL, power cut) in the middle of a write."""
        if not self.path.is_dir():
            return []
        names = (*self.files, *self.patterns)
        return sorted({p for name in names for p in self.path.glob(f".{name}.*.tmp")})


class RunDirectoryBusy(FileExistsError):
    """A run directory whose :class:`RunLock` another live process holds."""


class RunLock:
    """The one writer of a run directory: the file :attr:`NAME` in it, locked (``flock``) by the
    process that writes the run (rank 0 of its processes) for the run's life, and naming that
    process (its pid, host and start) so that a process refused can say who holds it.

    The operating system drops the lock when its holder exits, killed or not. The holder removes
    the file when it lets go (:meth:`release`), so a file found unlocked is what a killed holder
    left: it is taken over, with one line on stderr naming the process that held it. A process
    that locked a file another has just removed locks the new one (the file's identity is
    checked), so two processes never hold two files of one name. The lock file is none of the
    run's files: a run directory holding only it is empty, and ``--overwrite`` leaves it."""

    NAME = "run.lock"

    def __init__(self, directory: PathLike, option: str = "--out") -> None:
        self.path = Path(directory) / self.NAME
        self.option = option  # how the user named the directory, for the refusal
        self._file: Optional[IO[str]] = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._file is not None

    def check_free(self) -> None:
        """RunDirectoryBusy (as :meth:`acquire` raises it) when another process holds the lock;
        changes nothing (a shared lock taken and dropped at once, no file created)."""
        try:
            handle = open(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(handle) from None
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _busy(self, handle: IO[str]) -> "RunDirectoryBusy":
        holder = self._holder(handle) or "a process that has just taken it"
        return RunDirectoryBusy(
            f"{self.option} {self.path.parent}: another process is writing this run ({holder}); wait for it to "
            "end, stop it, or choose another directory"
        )

    def acquire(self) -> None:
        """Take the lock (the directory must exist); RunDirectoryBusy naming the directory and
        the holder when another process (or another object of this one) holds it."""
        if self.held:
            return
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = self._busy(handle)
                handle.close()
                raise error from None
            if self._same_file(handle):
                break
            handle.close()  # its holder removed it as we opened it: lock the one now there
        previous = self._holder(handle)
        if previous:
            print(
                f"mdarts: {self.path.parent}: taking over the lock of {previous}, which ended without letting it go",
                file=sys.stderr,
            )
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Remove the lock file, then unlock it (closing it); nothing when not held."""
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)
        self._file.close()
        self._file = None

    def _same_file(self, handle: IO[str]) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(handle: IO[str]) -> str:
        """Who the lock file names: "pid N on host H since T" ("" for an empty file)."""
        handle.seek(0)
        text = handle.read().strip()
        if not text:
            return ""
        try:
            holder = json.loads(text)
            return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"
        except (ValueError, TypeError, KeyError):
            return f"a process it names as {text[:80]!r}"


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

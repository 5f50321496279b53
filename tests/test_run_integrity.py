"""Runs that nothing can corrupt: a run directory has one writer, a refused command changes
nothing, and a damaged checkpoint is never loaded.

* ``--overwrite`` with a setting that a later check refuses (no validation pair fits
  ``--max-tokens``) leaves every file of the old run as it was (1);
* a run directory is written by one process: a second is refused with exit status 2 and a
  line naming the holder, two commands started together give one run, and the lock of a
  killed process is taken over with a line saying whose it was (2);
* a checkpoint whose bytes were overwritten (its zip records' CRC-32 no longer match) or that
  holds non-finite weights is refused with one line naming the file; a resume from a damaged
  ``checkpoint_last.pt`` names the newest whole checkpoint (3);
* a second SIGINT during a checkpoint write leaves the previous checkpoint whole, with no
  traceback (4).

Tiny runs on generic files written from the suite's Multi30k En-De, on one thread.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT

from mdarts.checkpoint import DamagedCheckpoint, load_checkpoint, load_model, save_checkpoint
from mdarts.cli import main
from mdarts.files import RunDirectory, RunLock
from mdarts.prepare import FileCorpus, prepare_data

pytestmark = pytest.mark.usefixtures("one_thread")

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SHORT_PAIRS = [("A dog.", "Ein Hund."), ("Two men.", "Zwei Männer."), ("A cat.", "Eine Katze.")] * 4
"""Training pairs short enough for ``--max-tokens 8``, which no validation pair fits."""


def write_gzip(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus_args(multi30k_corpus, tmp_path_factory) -> list[str]:
    """Command-line data options: 200 training pairs of the suite's En-De and a few very short
    ones, 20 validation pairs, as gzip files; a 200-piece tokenizer, trained here once (so that
    processes started together do not train it together); the CPU."""
    folder = tmp_path_factory.mktemp("corpus")
    files = {}
    for split, count in (("train", 200), ("val", 20)):
        corpus = multi30k_corpus[split].corpus
        extra = SHORT_PAIRS if split == "train" else []
        src = write_gzip(folder / f"{split}.src.gz", corpus.src[:count] + [s for s, _ in extra])
        tgt = write_gzip(folder / f"{split}.tgt.gz", corpus.tgt[:count] + [t for _, t in extra])
        files[split] = (src, tgt)
    prepare_data(files=FileCorpus(files), vocab_size=200, tokenizer_cache=folder / "spm")
    args = []
    for split, option in (("train", "train"), ("val", "valid")):
        args += [f"--{option}-src", str(files[split][0]), f"--{option}-tgt", str(files[split][1])]
    return [*args, "--vocab-size", "200", "--tokenizer-cache", str(folder / "spm"), "--device", "cpu"]


def train_argv(out: Path, corpus_args: list[str], steps: int, *more: str) -> list[str]:
    """A tiny ``mdarts train``: validated and checkpointed every step, the last 3 steps kept."""
    return [
        "train",
        *("--arch", "transformer", "--preset", "tiny", "--out", str(out), "--max-steps", str(steps)),
        *("--warmup-steps", "2", "--valid-interval", "1", "--keep-last", "3", "--max-tokens", "512"),
        *corpus_args,
        *more,
    ]


def search_argv(out: Path, corpus_args: list[str], steps: int, *more: str) -> list[str]:
    """A tiny ``mdarts search``: evaluated every step."""
    return [
        "search",
        *("--out", str(out), "--max-steps", str(steps), "--eval-interval", "1", "--max-tokens", "512"),
        *corpus_args,
        *more,
    ]


@pytest.fixture(scope="module")
def finished_run(corpus_args, tmp_path_factory) -> Path:
    """A finished tiny training of 4 steps (checkpoint_step2.pt to checkpoint_step4.pt kept)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_argv(out, corpus_args, 4)) == 0
    return out


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``folder`` (hidden ones too): its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def one_line_error(capsys) -> str:
    """The one error line on stderr, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def steps_logged(log: Path, event: str) -> list[int]:
    return [record["step"] for record in map(json.loads, log.read_text().splitlines()) if record["event"] == event]


# ----------------------------------------------------------------------------- 1. check before deleting


@pytest.mark.parametrize("command", ["train", "search"])
def test_overwrite_refused_by_a_later_check_leaves_every_file(finished_run, corpus_args, tmp_path, capsys, command):
    """The training data has pairs that fit --max-tokens 8, the validation data none: refused
    before the old run is touched (it used to be deleted, then the first validation failed)."""
    out = tmp_path / "run"
    if command == "train":
        shutil.copytree(finished_run, out)
    else:
        assert main(search_argv(out, corpus_args, 1)) == 0
    before = snapshot(out)
    argv = (train_argv if command == "train" else search_argv)(out, corpus_args, 2, "--overwrite", "--max-tokens", "8")
    with pytest.warns(UserWarning, match="max_tokens=8"):
        assert main(argv) == 2
    assert "validation pair(s) fits max_tokens=8" in one_line_error(capsys)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 2. one writer


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run lock of ``folder`` until its stdin closes."""
    code = f"from mdarts.files import RunLock\nlock = RunLock({str(folder)!r})\nlock.acquire()\n"
    code += "print('held', flush=True)\ninput()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=CHILD_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline().strip() == b"held"
    return holder


def test_a_run_directory_held_by_another_process_is_refused_and_left_alone(finished_run, corpus_args, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    writing = out / ".checkpoint_last.pt.k2j4.tmp"  # as the holder writes a checkpoint
    writing.write_bytes(b"half a checkpoint")
    holder = hold_lock(out)
    try:
        before = snapshot(out)
        lock_text = json.loads((out / RunLock.NAME).read_text())
        assert lock_text["pid"] == holder.pid and lock_text["host"] == socket.gethostname()
        for more in (["--overwrite"], ["--resume", "--max-steps", "6"]):
            assert main([*train_argv(out, corpus_args, 4), *more]) == 2
            line = one_line_error(capsys)
            assert f"--out {out}: another process is writing this run (pid {holder.pid} on host " in line
            assert snapshot(out) == before  # no file deleted (the lock, the .tmp being written) nor written
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock file: taken over, saying whose it was
    assert main([*train_argv(out, corpus_args, 5), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of pid {holder.pid} on host {socket.gethostname()}" in err
    assert not writing.exists() and not (out / RunLock.NAME).exists()  # stale .tmp removed once locked; lock let go
    assert steps_logged(out / "log.jsonl", "valid") == [1, 2, 3, 4, 5]


def test_two_searches_started_together_make_one_run(corpus_args, tmp_path):
    """Two ``mdarts search --out DIR`` at once: one runs, the other is refused (by the lock, or
    because the directory then holds a run), and the log holds one run's steps, once each."""
    out = tmp_path / "c2"
    argv = [sys.executable, "-m", "mdarts", *search_argv(out, corpus_args, 3)]
    children = [
        subprocess.Popen(argv, cwd=REPO_ROOT, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    errors = [child.communicate(timeout=300)[1].decode() for child in children]
    assert sorted(child.returncode for child in children) == [0, 2], errors
    refused = errors[[child.returncode for child in children].index(2)]
    assert f"--out {out}: another process is writing this run" in refused or "already holds" in refused
    assert "Traceback" not in refused
    log = out / "search_log.jsonl"
    assert steps_logged(log, "start") == [0] and steps_logged(log, "step") == [1, 2, 3]


def test_the_lock_file_is_no_run_file():
    run = RunDirectory("unused", "training")
    assert run.lock.path.name == RunLock.NAME
    assert RunLock.NAME not in run.files and not any(Path(RunLock.NAME).match(p) for p in run.patterns)


def test_a_directory_holding_only_a_stale_lock_is_claimed(tmp_path, capsys):
    (tmp_path / RunLock.NAME).write_text(json.dumps({"pid": 99999999, "host": "elsewhere", "since": "then"}) + "\n")
    run = RunDirectory(tmp_path, "training")
    run.check(resume=False, overwrite=False)  # the lock file does not make the directory look occupied
    run.claim(resume=False, overwrite=False)
    assert "taking over the lock of pid 99999999 on host elsewhere since then" in capsys.readouterr().err
    assert json.loads((tmp_path / RunLock.NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(FileExistsError, match=f"pid {os.getpid()} on host"):  # one holder, even in one process
        RunDirectory(tmp_path, "training").claim(resume=False, overwrite=True)
    run.release()
    assert not (tmp_path / RunLock.NAME).exists()


# ----------------------------------------------------------------------------- 3. damaged checkpoints


def damage(path: Path, size: int = 400_000) -> str:
    """Overwrite up to ``size`` bytes in the middle of the largest tensor record of the
    checkpoint at ``path`` with other bytes (every zip header left intact); the record's name."""
    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset)
        name_length, extra_length = struct.unpack("<HH", handle.read(30)[26:30])
        start = record.header_offset + 30 + name_length + extra_length
        size = min(size, record.file_size // 2)
        handle.seek(start + (record.file_size - size) // 2)
        original = handle.read(size)
        handle.seek(-size, os.SEEK_CUR)
        handle.write(bytes((b + 1) % 256 for b in original))  # every byte changed, again if damaged again
    return record.filename


def test_a_checkpoint_with_overwritten_bytes_is_refused_by_every_command(finished_run, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    shutil.copy(finished_run / "checkpoint_last.pt", bad)
    record = damage(bad)
    torch.load(bad, map_location="cpu", weights_only=True)  # torch alone loads the other bytes as weights
    message = f"{bad}: damaged (its record {record} does not match the CRC-32 stored when it was written)"
    for load in (load_checkpoint, load_model):
        with pytest.raises(DamagedCheckpoint) as caught:
            load(bad)
        assert str(caught.value).startswith(message)
    source = tmp_path / "source.txt"
    source.write_text("A man rides a bike.\n")
    assert main(["translate", "--checkpoint", str(bad), "--input", str(source), "--device", "cpu"]) == 2
    assert one_line_error(capsys).startswith(f"mdarts translate: error: {message}")


def test_resume_from_a_damaged_checkpoint_names_the_newest_whole_one(finished_run, corpus_args, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    last, step4 = out / "checkpoint_last.pt", out / "checkpoint_step4.pt"
    damage(last)
    damage(step4)
    best_step = load_checkpoint(out / "checkpoint_best.pt")["step"]
    newest, step = ("checkpoint_step3.pt", 3) if best_step < 4 else ("checkpoint_best.pt", 4)
    before = snapshot(out)
    resume = [*train_argv(out, corpus_args, 6), "--resume"]
    assert main(resume) == 2
    line = one_line_error(capsys)
    assert f"{last}: damaged (" in line
    assert (
        f"the newest whole checkpoint is {newest} (step {step}): to continue from it, copy it over "
        f"checkpoint_last.pt and remove the damaged checkpoint_step4.pt (cp {out / newest} {last} && rm {step4}) "
        "and resume again"
    ) in line
    assert snapshot(out) == before
    shutil.copy(out / newest, last)  # as the message says
    step4.unlink()
    assert main(resume) == 0
    assert steps_logged(out / "log.jsonl", "valid") == [1, 2, 3, 4, 5, 6]  # cut back to the step, then on
    load_model(out / "checkpoint_avg.pt")

    damage(out / "checkpoint_step5.pt")  # checkpoint_last.pt is whole, but the run would average this one
    assert main([*train_argv(out, corpus_args, 7), "--resume"]) == 2
    line = one_line_error(capsys)
    assert f"{out / 'checkpoint_step5.pt'}: damaged (" in line and "the run would average it at its end" in line

    for path in (last, *out.glob("checkpoint_step*.pt"), out / "checkpoint_best.pt"):
        damage(path)
    assert main(resume) == 2
    assert f"no other checkpoint in {out} is whole: start afresh with --overwrite" in one_line_error(capsys)


def test_a_damaged_search_checkpoint_is_refused(corpus_args, tmp_path, capsys):
    out = tmp_path / "search"
    assert main(search_argv(out, corpus_args, 1)) == 0
    damage(out / "search_checkpoint.pt")
    assert main(["derive", str(out), "--select", "argmax"]) == 2
    assert f"{out / 'search_checkpoint.pt'}: damaged (" in one_line_error(capsys)
    assert main([*search_argv(out, corpus_args, 2), "--resume"]) == 2
    assert "no other checkpoint" in one_line_error(capsys)


def test_a_choice_from_a_search_another_process_writes_is_refused(corpus_args, tmp_path, capsys):
    """``derive --select`` writes into the search's directory, so it takes the run's lock: beside
    the search still writing it (here, a process holding its lock) it writes nothing."""
    out = tmp_path / "search"
    assert main(search_argv(out, corpus_args, 1)) == 0
    holder = hold_lock(out)
    try:
        before = snapshot(out)
        assert main(["derive", str(out), "--select", "argmax"]) == 2
        assert f"RUN {out}: another process is writing this run (pid {holder.pid} on host " in one_line_error(capsys)
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["derive", str(out), "--select", "argmax"]) == 0  # the killed holder's lock is taken over
    assert (out / "genotype-argmax.json").is_file() and not (out / RunLock.NAME).exists()


def test_non_finite_weights_are_named(finished_run, tmp_path, capsys):
    payload = load_checkpoint(finished_run / "checkpoint_best.pt")
    key = list(payload["model"])[3]
    payload["model"][key] = payload["model"][key].clone()
    payload["model"][key].view(-1)[1] = float("nan")
    nan = tmp_path / "nan.pt"
    save_checkpoint(nan, payload)
    with pytest.raises(ValueError, match=rf"^{nan}: non-finite weights: model {key} holds 1 NaN or infinite value"):
        load_model(nan)
    source = tmp_path / "source.txt"
    source.write_text("A man rides a bike.\n")
    assert main(["translate", "--checkpoint", str(nan), "--input", str(source), "--device", "cpu"]) == 2
    assert f"{nan}: non-finite weights: model {key}" in one_line_error(capsys)


# ----------------------------------------------------------------------------- 4. a second signal


def test_a_second_sigint_during_a_checkpoint_write_keeps_the_previous_one(
    finished_run, corpus_args, tmp_path, capsys, monkeypatch
):
    """Ctrl-C, then Ctrl-C again while the checkpoint is written: the write is abandoned (its
    temporary file removed), the previous checkpoint stays whole, and no traceback is printed."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = (out / "checkpoint_last.pt").read_bytes()
    save = torch.save

    def interrupted_save(obj, handle, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the first: the run is asked to stop
        os.kill(os.getpid(), signal.SIGINT)  # the second, in the middle of the write
        save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    assert main([*train_argv(out, corpus_args, 6), "--resume"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted; every file written so far is whole" in err
    assert (out / "checkpoint_last.pt").read_bytes() == before
    assert not list(out.glob(".*.tmp")) and not (out / RunLock.NAME).exists()
    monkeypatch.setattr(torch, "save", save)
    load_model(out / "checkpoint_last.pt")

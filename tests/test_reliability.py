"""Reliability: what a run does when it is stopped, resumed, given other data or bad input.

* a resume checks the data it is given against the checkpoint's (1), and ``evaluate`` takes the
  direction from the checkpoint (2);
* a refused setting deletes nothing, and left-out pairs are never silent (3);
* SIGTERM, SIGINT and SIGKILL of a real ``python -m mdarts`` process, then a resume, give the
  weights and logs of a run that was never stopped (4), as does the same command run twice (5),
  and a resumed run logs what an uninterrupted one logs (6);
* a checkpoint cannot run code (7); user errors are one line and exit status 2, not a traceback
  (8, 9).

Tiny models on the suite's Multi30k En-De (the ``multi30k_corpus`` fixture), or generic files
written from it for the command line; every test runs on one thread, in a few seconds.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, TINY, head, search_config, short_training

import mdarts.runloop as runs_module
from mdarts.batching import TokenBatches, warn_dropped
from mdarts.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from mdarts.cli import main
from mdarts.config import SearchSettings, TrainConfig
from mdarts.data import load_pair
from mdarts.files import RunDirectory, exclusive
from mdarts.genotype import Genotype
from mdarts.model import TransformerBaseline
from mdarts.prepare import FileCorpus, PreparedData, prepare_data
from mdarts.search import Searcher
from mdarts.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = TINY.replace(encoder_layers=1, decoder_layers=1, max_positions=128)
SEARCH_CONFIG = search_config()
WALL_CLOCK = ("tokens_per_s", "elapsed_s", "peak_memory_bytes")
"""Log fields that measure time or memory and differ between two runs of one command."""
RUN_EVENTS = ("start", "resume", "end")
"""Search log records of a process's start and end: a resumed run has one more of each."""
TRAIN_STEPS = 30  # the command-line training run of the signal tests
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- data and helpers


@pytest.fixture(scope="module")
def data(multi30k_corpus) -> PreparedData:
    """300 training and 40 validation pairs of the suite's Multi30k En-De, its tokenizer."""
    splits = {"train": head(multi30k_corpus["train"], 300), "val": head(multi30k_corpus["val"], 40)}
    return PreparedData(multi30k_corpus.tokenizer, splits, "en", "de")


def write_gzip(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus_args(multi30k_corpus, tmp_path_factory) -> list[str]:
    """Command-line data options: 200 training and 20 validation pairs of the suite's En-De as
    generic gzip files, a 200-piece tokenizer cached for the module, the CPU."""
    folder = tmp_path_factory.mktemp("corpus")
    args = []
    for split, option, count in (("train", "train", 200), ("val", "valid", 20)):
        corpus = multi30k_corpus[split].corpus
        for side, lines in (("src", corpus.src), ("tgt", corpus.tgt)):
            args += [f"--{option}-{side}", str(write_gzip(folder / f"{split}.{side}.gz", lines[:count]))]
    return [*args, "--vocab-size", "200", "--tokenizer-cache", str(folder / "spm"), "--device", "cpu"]


def train_argv(out: Path, corpus_args: list[str], steps: int = TRAIN_STEPS, *more: str) -> list[str]:
    """A tiny ``mdarts train`` (the tiny preset's Transformer, 2 + 2 layers, d 96) with dropout,
    validation every 5 updates, a training line every 3 (so that stops fall inside a window)."""
    return [
        "train",
        "--arch",
        "transformer",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--warmup-steps",
        "5",
        "--lr",
        "2e-3",
        "--valid-interval",
        "5",
        "--log-interval",
        "3",
        "--keep-last",
        "2",
        "--max-tokens",
        "256",
        *corpus_args,
        *more,
    ]


def comparable(records: list[dict]) -> list[dict]:
    """Log records without the wall-clock fields and the start / resume / end events."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records if r["event"] not in RUN_EVENTS]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_weights(a: Path, b: Path, kind: str = "train") -> None:
    """The model tensors of checkpoints ``a`` and ``b`` are equal, bit for bit."""
    first, second = load_checkpoint(a, kind), load_checkpoint(b, kind)
    if kind == "search":
        first, second = first["searcher"], second["searcher"]
    assert first["model"].keys() == second["model"].keys()
    for key, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][key]), f"{key} differs between {a} and {b}"


def assert_same_training_run(run: Path, reference: Path) -> None:
    assert_same_weights(run / "checkpoint_last.pt", reference / "checkpoint_last.pt")
    assert comparable(read_jsonl(run / "log.jsonl")) == comparable(read_jsonl(reference / "log.jsonl"))


def tiny_model(data: PreparedData, config=MODEL) -> TransformerBaseline:
    torch.manual_seed(0)
    return TransformerBaseline(config, data.tokenizer.vocab_size)


def train_config(**changes) -> TrainConfig:
    return short_training(
        **{"warmup_steps": 5, "max_steps": 4, "valid_interval": 2, "keep_last": 0, "seed": 1, **changes}
    )


def search_settings(**changes) -> SearchSettings:
    values = dict(max_steps=2, max_tokens=600, warmup_steps=10, eval_interval=2, checkpoint_interval=2, device="cpu")
    return SearchSettings(**{**values, **changes})


def swapped(data: PreparedData, **changes) -> PreparedData:
    """``data`` relabelled or with other splits (the same tokenizer)."""
    values = dict(tokenizer=data.tokenizer, splits=dict(data.splits), src_lang=data.src_lang, tgt_lang=data.tgt_lang)
    return PreparedData(**{**values, **changes})


class StopAt:
    """A stand-in for :class:`mdarts.runloop.StopSignals` that "receives" SIGINT once ``when()`` is
    true, and calls ``each()`` at every check (once per step): a signal at an exact step."""

    def __init__(self, when=lambda: False, each=lambda: None) -> None:
        self.when, self.each = when, each

    def __call__(self) -> "StopAt":  # used in place of the class: StopSignals()
        return self

    def __enter__(self) -> "StopAt":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    @property
    def requested(self):
        self.each()
        return "SIGINT" if self.when() else None


# ----------------------------------------------------------------------------- 1. a resume checks the data


def test_training_resume_refuses_other_data_or_direction(data, tmp_path):
    Trainer(lambda: tiny_model(data), data, train_config(max_steps=2), tmp_path, progress=False).run()
    path = tmp_path / "checkpoint_last.pt"
    assert load_checkpoint(path, "train")["data"] == data.identity()
    fewer = swapped(data, splits={"train": head(data["train"], 200), "val": data["val"]})
    with pytest.raises(ValueError, match="training data") as info:
        Trainer(lambda: tiny_model(data), fewer, train_config(), tmp_path, resume=True, progress=False)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="translation direction") as info:
        Trainer(
            lambda: tiny_model(data), swapped(data, src_lang="de", tgt_lang="en"), train_config(), tmp_path, resume=True
        )
    assert "en-de" in str(info.value) and "de-en" in str(info.value)
    Trainer(
        lambda: tiny_model(data), data, train_config(), tmp_path, resume=True, progress=False
    ).run()  # the same data: fine


def test_search_resume_refuses_other_data_or_direction(data, tmp_path):
    Searcher(SEARCH_CONFIG, data, search_settings(), tmp_path, progress=False).run()
    assert load_checkpoint(tmp_path / "search_checkpoint.pt", "search")["data"] == data.identity()
    fewer = swapped(data, splits={"train": head(data["train"], 200), "val": data["val"]})
    with pytest.raises(ValueError, match="training data"):
        Searcher(SEARCH_CONFIG, fewer, search_settings(max_steps=4), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="translation direction"):
        Searcher(SEARCH_CONFIG, swapped(data, src_lang="de", tgt_lang="en"), search_settings(), tmp_path, resume=True)


# ----------------------------------------------------------------------------- 2. evaluate takes the checkpoint's pair


@pytest.fixture(scope="module")
def en_de_checkpoint(data, tmp_path_factory) -> Path:
    """checkpoint_last.pt of a 3-step En-De training of the tiny model."""
    out = tmp_path_factory.mktemp("en-de")
    Trainer(lambda: tiny_model(data), data, train_config(max_steps=3, valid_interval=3), out, progress=False).run()
    return out / "checkpoint_last.pt"


def test_evaluate_takes_the_pair_from_the_checkpoint(en_de_checkpoint, multi30k_dir, capsys):
    argv = ["evaluate", "--checkpoint", str(en_de_checkpoint), "--split", "test_2016_flickr", "--limit", "3"]
    argv += ["--beam", "1", "--data-dir", str(multi30k_dir), "--device", "cpu"]
    assert main(argv) == 0
    assert "en-de test_2016_flickr: 3 sentences" in capsys.readouterr().out
    assert main([*argv, "--pair", "fr-en"]) == 2
    err = capsys.readouterr().err
    assert "translates en-de" in err and "--pair fr-en" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- 3. nothing deleted, nothing silent


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_overwrite_with_a_refused_setting_leaves_the_old_run(data, corpus_args, tmp_path, capsys):
    search_dir, train_dir = tmp_path / "search", tmp_path / "train"
    Searcher(SEARCH_CONFIG, data, search_settings(max_steps=1), search_dir, progress=False).run()
    Trainer(lambda: tiny_model(data), data, train_config(max_steps=2), train_dir, progress=False).run()
    before = {folder: snapshot(folder) for folder in (search_dir, train_dir)}
    search = ["search", "--out", str(search_dir), "--max-steps", "2", "--overwrite", "--max-tokens", "5", *corpus_args]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(search) == 2
    assert not [w for w in caught if "max_tokens=5" in str(w.message)]  # the refusal alone says it, in one line
    assert "max_tokens=5" in capsys.readouterr().err
    assert main(train_argv(train_dir, corpus_args, 2, "--overwrite", "--max-tokens", "5")) == 2
    assert "--max-tokens" in capsys.readouterr().err
    assert {folder: snapshot(folder) for folder in (search_dir, train_dir)} == before


def test_pairs_longer_than_max_positions_are_reported_with_their_lines(data, tmp_path):
    train = data["train"]
    longest = MODEL.replace(max_positions=24)
    too_long = [i + 1 for i, (s, t) in enumerate(zip(train.src_ids, train.tgt_ids)) if max(len(s), len(t)) + 1 > 24]
    assert 5 < len(too_long) < len(train)
    with pytest.warns(UserWarning) as record:
        trainer = Trainer(lambda: tiny_model(data, longest), data, train_config(), tmp_path, progress=False)
    messages = [str(w.message) for w in record if "max_positions=24" in str(w.message)]
    assert len(messages) == 2  # training and validation split
    shown = ", ".join(map(str, too_long[:5]))
    assert messages[0] == (
        f"training: left out {len(too_long)} of 300 train pair(s) whose source or target is longer than "
        f"max_positions=24 positions (subwords + EOS): lines {shown}, ..."
    )
    assert "val pair(s)" in messages[1]
    assert [i + 1 for i in trainer.train_batches.dropped] == too_long
    assert len(trainer.train_batches.kept) == 300 - len(too_long)


def test_search_reports_pairs_longer_than_max_positions(data, tmp_path):
    """Needs the Searcher to call warn_dropped and count kept pairs in its start record."""
    config = SEARCH_CONFIG.replace(max_positions=24)
    with pytest.warns(UserWarning, match=r"search: left out \d+ of 300 train pair\(s\)"):
        searcher = Searcher(config, data, search_settings(max_steps=1), tmp_path, progress=False)
    start = searcher.log.read("start")[0]
    fitting = sum(
        max(len(s), len(t)) + 1 <= 24 for s, t in zip(data["train"].src_ids, data["train"].tgt_ids, strict=True)
    )
    assert start["theta_pairs"] + start["alpha_pairs"] == fitting


def test_warn_dropped_counts_and_names_lines():
    split = type("Split", (), {})()
    split.src_ids = [[1] * n for n in (3, 40, 5, 50, 2, 60, 70, 80, 90, 99)]
    split.tgt_ids = [[1] * 3] * 10
    split.lines = [2, 4, 5, 7, 8, 10, 11, 12, 13, 15]
    with pytest.warns(UserWarning) as record:
        kept = warn_dropped({"train": split}, 32, "search")
    assert kept == {"train": 3}
    assert str(record[0].message).endswith(
        "left out 7 of 10 train pair(s) whose source or target is longer "
        "than max_positions=32 positions (subwords + EOS): lines 4, 7, 10, 11, 12, ..."
    )
    assert TokenBatches(split.src_ids, split.tgt_ids, 4096, max_positions=32).dropped == [1, 3, 5, 6, 7, 8, 9]


def test_pairs_with_an_empty_side_are_left_out_of_training_splits(multi30k_corpus, tmp_path):
    corpus = multi30k_corpus["train"].corpus
    src, tgt = corpus.src[:30], corpus.tgt[:30]
    src[2], tgt[6], src[11], tgt[11] = "", "   ", "", ""  # lines 3, 7 and 12
    src[9] = " ".join([corpus.src[0]] * 12)  # line 10: too long for max_positions 64
    files = {}
    for split in ("train", "val", "test"):
        files[split] = tuple(
            write_gzip(tmp_path / f"{split}.{side}.gz", lines) for side, lines in (("s", src), ("t", tgt))
        )
    with pytest.warns(UserWarning) as record:
        prepared = prepare_data(
            files=FileCorpus(files), splits=("train", "val", "test"), tokenizer=multi30k_corpus.tokenizer
        )
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        f"{split} split (src-tgt): left out 3 of 30 pair(s) with an empty source or target: lines 3, 7, 12"
        for split in ("train", "val")
    ]
    train = prepared["train"]
    assert len(train) == len(train.corpus.src) == 27 and all(train.src_ids) and all(train.tgt_ids)
    assert train.corpus.src[2] == src[3] and train.line_number(2) == 4
    assert len(prepared["test"]) == 30  # a test split is scored whole
    with pytest.warns(UserWarning, match=r"left out 1 of 27 train pair\(s\) .*: line 10$"):
        Trainer(
            lambda: tiny_model(prepared, MODEL.replace(max_positions=64)), prepared, train_config(), tmp_path / "run"
        )


# ----------------------------------------------------------------------------- 4. real signals


@pytest.fixture(scope="module")
def reference_run(corpus_args, tmp_path_factory) -> Path:
    """The command-line training run of the signal tests, never interrupted, on one thread as
    the child processes it is compared with (another thread count sums in another order)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_argv(out, corpus_args)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def start_child(argv: list[str], folder: Path) -> tuple[subprocess.Popen, Path]:
    """``python -m mdarts ARGV`` on one thread, stdout and stderr to files in ``folder``."""
    err = folder / "stderr.txt"
    with open(folder / "stdout.txt", "wb") as out, open(err, "wb") as error:
        child = subprocess.Popen(
            [sys.executable, "-m", "mdarts", *argv], cwd=REPO_ROOT, env=CHILD_ENV, stdout=out, stderr=error
        )
    return child, err


def wait_for_step(child: subprocess.Popen, log: Path, step: int, also: Path = None, timeout: float = 90.0) -> int:
    """Wait until ``log`` records a step >= ``step`` (and the file ``also`` exists); the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            pytest.fail(f"the run ended (status {child.returncode}) before step {step}")
        seen = last_step(log)
        if seen >= step and (also is None or also.is_file()):
            return seen
        time.sleep(0.02)
    child.kill()
    pytest.fail(f"no step {step} in {log} after {timeout} s")


def last_step(log: Path) -> int:
    """The last step ``log`` records (0 for none yet; a line being written is skipped)."""
    try:
        return max((r["step"] for r in read_jsonl(log)), default=0) if log.is_file() else 0
    except ValueError:
        return 0


def resume_command(stderr: str) -> list[str]:
    """The words after ``mdarts`` of the resume command a stopped run printed."""
    words = shlex.split(stderr.strip().splitlines()[-1])
    assert words[0] == "mdarts" and "--resume" in words
    return words[1:]


def main_interrupted(argv: list[str], log: Path, step: int) -> int:
    """``main(argv)``, sent SIGINT (a real signal, to this process) once ``log`` reaches ``step``
    (never after ``main`` has returned)."""
    done = threading.Event()

    def interrupt() -> None:
        while not done.is_set() and last_step(log) < step:
            time.sleep(0.01)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt)
    watcher.start()
    try:
        return main(argv)
    finally:
        done.set()
        watcher.join()


def test_sigterm_and_sigint_stop_with_a_checkpoint_and_resume_exactly(reference_run, corpus_args, tmp_path, capsys):
    out = tmp_path / "run"
    child, err = start_child(train_argv(out, corpus_args), tmp_path)
    try:
        wait_for_step(child, out / "log.jsonl", 6)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM == 143
    finally:
        child.kill()
    stderr = err.read_text()
    step = load_checkpoint(out / "checkpoint_last.pt", "train")["step"]
    assert 6 <= step < TRAIN_STEPS
    assert f"mdarts train: stopped by SIGTERM after step {step}; checkpoint written. Resume with:" in stderr
    argv = resume_command(stderr)
    assert argv == [*train_argv(out, corpus_args), "--resume"]

    # resumed, then stopped by a real SIGINT (sent to this process, whose run turns it into a stop);
    # skipped in the rare case that the SIGTERM landed too late to leave room for it
    if step + 4 < TRAIN_STEPS - 6:
        assert main_interrupted(argv, out / "log.jsonl", step + 4) == 128 + signal.SIGINT == 130
        stopped = load_checkpoint(out / "checkpoint_last.pt", "train")["step"]
        assert step < stopped < TRAIN_STEPS
        assert f"stopped by SIGINT after step {stopped}" in capsys.readouterr().err

    assert main(argv) == 0
    assert_same_training_run(out, reference_run)


def test_sigkill_after_a_checkpoint_then_resume_is_exact(reference_run, corpus_args, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    target = random.Random(seed).randint(6, TRAIN_STEPS - 6)
    out = tmp_path / "run"
    child, _ = start_child(train_argv(out, corpus_args), tmp_path)
    try:
        wait_for_step(child, out / "log.jsonl", target, also=out / "checkpoint_last.pt")
        time.sleep(random.Random(seed).uniform(0.0, 0.2))  # anywhere in a step
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        child.kill()
    assert load_checkpoint(out / "checkpoint_last.pt", "train")["step"] < TRAIN_STEPS, f"seed {seed}"
    assert main([*train_argv(out, corpus_args), "--resume"]) == 0, f"seed {seed}"
    assert_same_training_run(out, reference_run)


# ----------------------------------------------------------------------------- 5. same command, same run


def test_the_same_training_command_gives_the_same_run(reference_run, corpus_args, tmp_path):
    assert main(train_argv(tmp_path / "again", corpus_args)) == 0
    assert_same_training_run(tmp_path / "again", reference_run)


def test_the_same_search_gives_the_same_run(data, tmp_path):
    for name in ("one", "two"):
        settings = search_settings(max_steps=4, eval_interval=2)
        Searcher(SEARCH_CONFIG, data, settings, tmp_path / name, progress=False).run()
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_weights(one / "search_checkpoint.pt", two / "search_checkpoint.pt", "search")
    assert comparable(read_jsonl(one / "search_log.jsonl")) == comparable(read_jsonl(two / "search_log.jsonl"))
    assert (one / "alpha_history.jsonl").read_text() == (two / "alpha_history.jsonl").read_text()


# ----------------------------------------------------------------------------- 6. logs after a resume


def test_training_stopped_inside_a_log_window_logs_the_same_lines(data, tmp_path):
    config = train_config(max_steps=10, log_interval=2, valid_interval=3)
    Trainer(lambda: tiny_model(data), data, config, tmp_path / "straight", progress=False).run()
    Trainer(lambda: tiny_model(data), data, config.replace(max_steps=5), tmp_path / "parted", progress=False).run()
    assert [r["step"] for r in read_jsonl(tmp_path / "parted" / "log.jsonl") if r["event"] == "train"] == [2, 4, 5]
    Trainer(lambda: tiny_model(data), data, config, tmp_path / "parted", resume=True, progress=False).run()
    train_lines = [
        [r for r in comparable(read_jsonl(tmp_path / name / "log.jsonl")) if r["event"] == "train"]
        for name in ("straight", "parted")
    ]
    assert [r["step"] for r in train_lines[0]] == [2, 4, 6, 8, 10]
    assert train_lines[1] == train_lines[0]  # tokens, losses, gradient norms: all of steps 5 and 6 at step 6
    assert_same_weights(tmp_path / "straight" / "checkpoint_last.pt", tmp_path / "parted" / "checkpoint_last.pt")


def test_training_stopped_by_a_signal_logs_what_an_uninterrupted_run_logs(data, tmp_path, monkeypatch):
    config = train_config(max_steps=10, log_interval=2, valid_interval=3)
    Trainer(lambda: tiny_model(data), data, config, tmp_path / "straight", progress=False).run()
    parted = Trainer(lambda: tiny_model(data), data, config, tmp_path / "parted", progress=False)
    monkeypatch.setattr(runs_module, "StopSignals", StopAt(when=lambda: parted.steps >= 5))
    assert parted.run().stopped_by == "SIGINT" and parted.steps == 5
    monkeypatch.undo()
    Trainer(lambda: tiny_model(data), data, config, tmp_path / "parted", resume=True, progress=False).run()
    assert_same_training_run(tmp_path / "parted", tmp_path / "straight")


def test_search_eval_train_loss_is_the_same_after_a_resume(data, tmp_path, monkeypatch):
    """A search killed (the directory copied as it is) at step 5, its checkpoint of step 4; and one
    stopped by SIGINT at step 5: resumed, both log what the run that went on logs."""
    settings = search_settings(max_steps=9, eval_interval=3, checkpoint_interval=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    searcher = Searcher(SEARCH_CONFIG, data, settings, straight, progress=False)
    copy = lambda: searcher.steps == 5 and not killed.exists() and shutil.copytree(straight, killed)
    monkeypatch.setattr(runs_module, "StopSignals", StopAt(each=copy))
    searcher.run()
    assert load_checkpoint(killed / "search_checkpoint.pt", "search")["searcher"]["steps"] == 4

    stopped = Searcher(SEARCH_CONFIG, data, settings, tmp_path / "stopped", progress=False)
    monkeypatch.setattr(runs_module, "StopSignals", StopAt(when=lambda: stopped.steps >= 5))
    assert stopped.run().stopped_by == "SIGINT"
    monkeypatch.undo()

    reference = comparable(read_jsonl(straight / "search_log.jsonl"))
    assert [r["step"] for r in reference if r["event"] == "eval"] == [3, 6, 9]
    for run in (killed, tmp_path / "stopped"):
        Searcher(SEARCH_CONFIG, data, settings, run, resume=True, progress=False).run()
        log = comparable(read_jsonl(run / "search_log.jsonl"))
        assert [r["train_loss"] for r in log if r["event"] == "eval"] == [
            r["train_loss"] for r in reference if r["event"] == "eval"
        ]
        assert log == reference
        assert_same_weights(run / "search_checkpoint.pt", straight / "search_checkpoint.pt", "search")


def test_search_killed_after_its_last_checkpoint_resumes_exactly(data, tmp_path, monkeypatch):
    """A search killed after the checkpoint of its last step, during the final evaluation (the
    directory copied as it is then), or after it has finished: its resume must not log that
    evaluation twice (found by benchmarks/faults.py)."""
    settings = search_settings(max_steps=4, eval_interval=3, checkpoint_interval=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    evaluate = Searcher._evaluate

    def copy_then_evaluate(self, final=False):
        if final and not killed.exists():
            size = self.history.size()
            self.history.append("alpha", self.steps, **self.model.arch_weights())  # killed after this line
            shutil.copytree(straight, killed)
            self.history.cut(size)
        return evaluate(self, final)

    monkeypatch.setattr(Searcher, "_evaluate", copy_then_evaluate)
    Searcher(SEARCH_CONFIG, data, settings, straight, progress=False).run()
    monkeypatch.undo()
    finished = tmp_path / "finished"
    shutil.copytree(straight, finished)
    for run in (killed, finished):
        Searcher(SEARCH_CONFIG, data, settings, run, resume=True, progress=False).run()
        for name in ("search_log.jsonl", "alpha_history.jsonl"):
            assert comparable(read_jsonl(run / name)) == comparable(read_jsonl(straight / name)), (run.name, name)
        assert_same_weights(run / "search_checkpoint.pt", straight / "search_checkpoint.pt", "search")


# ----------------------------------------------------------------------------- 7. unsafe loading


class Planted:
    """Unpickled, it would create the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_checkpoint_holding_code_is_refused_and_not_run(tmp_path, writer):
    marker, path = tmp_path / "marker", tmp_path / "checkpoint.pt"
    payload = {"format": FORMAT, "kind": "train", "model": {"w": torch.zeros(2)}, "extra": Planted(marker)}
    with open(path, "wb") as handle:
        torch.save(payload, handle) if writer == "torch.save" else pickle.dump(payload, handle)
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        load_checkpoint(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 8. errors, not tracebacks


def one_line_error(capsys) -> str:
    """The one error line on stderr (``mdarts COMMAND: error: ...``), after any progress lines."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err and err.endswith(errors[0] + "\n"), err
    return errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_train_on_cuda_without_a_gpu_is_an_error(corpus_args, tmp_path, capsys):
    assert main(train_argv(tmp_path / "run", corpus_args, 2, "--device", "cuda")) == 2
    assert "--device: 'cuda' requested but CUDA is not available" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_translate_with_stdin_closed_is_an_error(en_de_checkpoint):
    command = f"exec {shlex.quote(sys.executable)} -m mdarts translate --checkpoint {en_de_checkpoint} --device cpu <&-"
    done = subprocess.run(["sh", "-c", command], cwd=REPO_ROOT, env=CHILD_ENV, capture_output=True, timeout=120)
    err = done.stderr.decode().strip()
    assert done.returncode == 2 and done.stdout == b""
    assert err == "mdarts translate: error: --input: stdin is closed; give --input FILE or pipe the text in"


def test_translate_refuses_bytes_that_are_not_utf8(en_de_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"A man.\nUn caf\xe9.\n")))
    assert main(["translate", "--checkpoint", str(en_de_checkpoint), "--device", "cpu"]) == 2
    assert "stdin: not UTF-8 text (byte 0xe9 at offset 13)" in one_line_error(capsys)


def test_translate_gives_an_empty_line_for_an_empty_line(en_de_checkpoint, monkeypatch, capsys):
    argv = ["translate", "--checkpoint", str(en_de_checkpoint), "--beam", "1", "--device", "cpu"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n")))
    assert main(argv) == 0
    assert capsys.readouterr().out == "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"A dog runs.\n\nTwo men.\n")))
    assert main(argv) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""


# ----------------------------------------------------------------------------- 9. clear messages


def test_a_file_given_as_data_dir_is_named_as_not_a_directory(en_de_checkpoint, tmp_path, capsys):
    file = tmp_path / "data.txt"
    file.write_text("not a folder\n")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        load_pair("en-de", "val", file)
    argv = ["evaluate", "--checkpoint", str(en_de_checkpoint), "--data-dir", str(file), "--limit", "1"]
    assert main([*argv, "--device", "cpu"]) == 2
    assert f"--data-dir {file}: is a file, not a directory" in one_line_error(capsys)


def test_train_out_that_is_a_file_is_an_error(corpus_args, tmp_path, capsys):
    file = tmp_path / "run"
    file.write_text("something\n")
    assert main(train_argv(file, corpus_args, 2)) == 2
    assert f"--out {file}: exists and is not a directory" in one_line_error(capsys)
    assert file.read_text() == "something\n"


def test_genotype_candidates_given_as_a_string_are_named():
    genotype = Genotype([["ffn"]], [["ffn"]], ("ffn", "attention"), ("ffn", "cross_attention")).to_dict()
    with pytest.raises(ValueError, match=r"encoder_candidates: expected a non-empty list of op names, got 'ffn'"):
        Genotype.from_dict({**genotype, "encoder_candidates": "ffn"})
    with pytest.raises(ValueError, match=r"genotype.decoder_candidates: expected a non-empty list of op names"):
        Genotype([["ffn"]], [["ffn"]], ("ffn",), "ffn").validate()


def test_a_run_of_another_kind_is_refused_whatever_the_options(data, corpus_args, tmp_path, capsys):
    search_dir, train_dir = tmp_path / "search", tmp_path / "train"
    Searcher(SEARCH_CONFIG, data, search_settings(max_steps=1), search_dir, progress=False).run()
    before = snapshot(search_dir)
    for options in ((), ("--overwrite",), ("--resume",)):
        assert main(train_argv(search_dir, corpus_args, 2, *options)) == 2
        message = one_line_error(capsys)
        assert f"--out {search_dir} holds a search run (search_checkpoint.pt, genotype.json" in message
        assert "not a training run" in message
    assert snapshot(search_dir) == before
    Trainer(lambda: tiny_model(data), data, train_config(max_steps=2), train_dir, progress=False).run()
    with pytest.raises(FileExistsError, match="holds a training run .*not a search run"):
        Searcher(SEARCH_CONFIG, data, search_settings(), train_dir, overwrite=True, progress=False)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_files_get_the_usual_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "checkpoint.pt", {"kind": "train", "model": {}})
    finally:
        os.umask(previous)
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_temporary_files_of_a_killed_write_are_removed_when_the_run_is_claimed(data, tmp_path):
    run = RunDirectory(tmp_path, "training")
    (tmp_path / "checkpoint_last.pt").write_bytes(b"")
    stale = [tmp_path / ".checkpoint_last.pt.k2j4.tmp", tmp_path / ".checkpoint_step5.pt.x81a.tmp"]
    other = tmp_path / ".notes.txt.k2j4.tmp"  # not a file of this run: left alone
    for path in (*stale, other):
        path.write_bytes(b"half a checkpoint")
    assert run.stale_temporaries() == sorted(stale)
    run.check(resume=True, overwrite=False)  # a check changes nothing
    assert all(path.exists() for path in stale)
    run.claim(resume=True, overwrite=False)
    assert not any(path.exists() for path in stale) and other.exists()
    assert (tmp_path / "checkpoint_last.pt").exists()

    search_dir = tmp_path / "search"
    Searcher(SEARCH_CONFIG, data, search_settings(max_steps=1), search_dir, progress=False).run()
    (search_dir / ".search_checkpoint.pt.zz9.tmp").write_bytes(b"half a checkpoint")
    Searcher(SEARCH_CONFIG, data, search_settings(max_steps=2), search_dir, resume=True, progress=False).run()
    assert not (search_dir / ".search_checkpoint.pt.zz9.tmp").exists()


def test_a_lock_is_held_by_one_process_and_freed_when_its_holder_is_killed(tmp_path):
    lock = tmp_path / "locks" / "run.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from mdarts.files import exclusive\nwith exclusive({str(lock)!r}) as mine:\n"
            "    print(mine, flush=True)\n    input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "True"
        with exclusive(lock) as mine:
            assert not mine
    finally:
        holder.kill()
        holder.wait()
    with exclusive(lock) as mine:  # the killed holder's lock went with it
        assert mine
        with exclusive(lock) as again:  # one holder at a time, even within a process
            assert not again

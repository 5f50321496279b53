"""Honest messages: a data file that cannot be read is named in one line; a run stopped before
its first checkpoint says that nothing was saved (and a fresh start in its directory does not
advise a resume); a model trained on generic files is evaluated on generic files; of several
processes only rank 0 prints the resume command."""

from __future__ import annotations

import errno
import gzip
from pathlib import Path

import pytest

from mdarts.cli import main
from mdarts.train import Trainer

TRAIN_STEP = Trainer._train_step

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = ["A dog runs in the snow.", "Two men play football.", "A woman reads a book."] * 20


def one_error_line(capsys, command: str) -> str:
    """The one line of error output of a command that failed with status 2."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mdarts {command}: error: "), err
    return err[0]


# ----------------------------------------------------------------------------- data files


def damaged_gzip(path: Path) -> Path:
    """gzip data whose deflate stream is damaged in the middle (zlib rejects it)."""
    data = bytearray(gzip.compress("\n".join(LINES).encode()))
    for i in range(20, 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def truncated_gzip(path: Path) -> Path:
    data = gzip.compress("\n".join(LINES).encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def latin1(path: Path) -> Path:
    path.write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (damaged_gzip, "corrupt gzip data"),
        (truncated_gzip, "corrupt gzip data"),
        (latin1, "line 2 is not valid UTF-8"),
        (lambda path: path, "no such file"),
        (lambda path: path.mkdir() or path, "is a directory"),
    ],
    ids=["damaged-gzip", "truncated-gzip", "not-utf8", "missing", "directory"],
)
def test_a_data_file_that_cannot_be_read_is_named_in_one_line(tmp_path, capsys, make, expected):
    path = make(tmp_path / "input.txt")
    assert main(["translate", "--checkpoint", str(tmp_path / "none.pt"), "--input", str(path)]) == 2
    line = one_error_line(capsys, "translate")
    assert str(path) in line and expected in line


def test_an_unreadable_data_file_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    import mdarts.data

    path = tmp_path / "train.src"
    path.write_text("\n".join(LINES))

    def refuse(file, mode="r"):  # as open() does for a file without read permission (root may read any)
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(mdarts.data, "open", refuse, raising=False)
    argv = ["train", "--arch", "transformer", "--out", str(tmp_path / "run"), "--max-steps", "1"]
    argv += ["--train-src", str(path), "--train-tgt", str(path), "--device", "cpu"]
    assert main(argv) == 2
    assert one_error_line(capsys, "train") == f"mdarts train: error: {path}: cannot be read (Permission denied)"
    assert not (tmp_path / "run").exists()


def test_a_damaged_training_file_is_named_in_one_line(tmp_path, capsys):
    good = tmp_path / "train.tgt"
    good.write_text("\n".join(LINES))
    bad = damaged_gzip(tmp_path / "train.src.gz")
    argv = ["train", "--arch", "transformer", "--out", str(tmp_path / "run"), "--max-steps", "1"]
    assert main([*argv, "--train-src", str(bad), "--train-tgt", str(good), "--device", "cpu"]) == 2
    line = one_error_line(capsys, "train")
    assert f"{bad}: corrupt gzip data" in line


def test_an_unreadable_tokenizer_file_is_named(tmp_path, monkeypatch):
    from mdarts.tokenizer import Tokenizer

    path = tmp_path / "spm.model"
    path.write_bytes(b"x")

    def refuse(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ValueError, match=f"^{path}: cannot be read \\(Permission denied\\)$"):
        Tokenizer.load(path)


# ----------------------------------------------------------------------------- a run stopped early


@pytest.fixture(scope="module")
def corpus_args(multi30k_corpus, tmp_path_factory) -> list[str]:
    """Data options: 200 training, 20 validation and 20 test pairs of the suite's En-De as generic
    files, a 200-piece tokenizer cached for the module, the CPU."""
    folder = tmp_path_factory.mktemp("corpus")
    args = []
    for split, option, count in (("train", "train", 200), ("val", "valid", 20)):
        corpus = multi30k_corpus[split].corpus
        for side, lines in (("src", corpus.src[:count]), ("tgt", corpus.tgt[:count])):
            path = folder / f"{split}.{side}.gz"
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
            args += [f"--{option}-{side}", str(path)]
    return [*args, "--vocab-size", "200", "--tokenizer-cache", str(folder / "spm"), "--device", "cpu"]


def train_argv(out: Path, corpus_args: list[str], steps: int) -> list[str]:
    """A tiny ``mdarts train``: a training line every update, a checkpoint every 2."""
    common = ["train", "--arch", "transformer", "--preset", "tiny", "--out", str(out), "--max-steps", str(steps)]
    return [*common, "--log-interval", "1", "--valid-interval", "2", "--warmup-steps", "2", *corpus_args]


def interrupt_at(monkeypatch, update: int) -> None:
    """Training raises KeyboardInterrupt (a second Ctrl-C) when it starts update ``update``."""

    def train_step(self, batches):
        if self.step_count + 1 == update:
            raise KeyboardInterrupt
        return TRAIN_STEP(self, batches)

    monkeypatch.setattr(Trainer, "_train_step", train_step)


def printed_command(err: str) -> list[str]:
    """The words after ``mdarts`` of the command on the last line of ``err``."""
    import shlex

    words = shlex.split(err.strip().splitlines()[-1])
    assert words[0] == "mdarts", err
    return words[1:]


def test_a_run_stopped_before_its_first_checkpoint_says_nothing_was_saved(corpus_args, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = train_argv(out, corpus_args, steps=4)
    interrupt_at(monkeypatch, 2)  # update 1 is logged, the first checkpoint would follow update 2
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; nothing was saved (no checkpoint yet); start again with:" in err and "resume" not in err
    again = printed_command(err)
    assert again == [*argv, "--overwrite"]  # its log.jsonl is in --out
    assert (out / "log.jsonl").is_file() and not (out / "checkpoint_last.pt").exists()

    # neither way in advises a resume that cannot be
    assert main([*argv, "--resume"]) == 2
    assert "nothing to resume" in one_error_line(capsys, "train")
    assert main(argv) == 2
    line = one_error_line(capsys, "train")
    assert "resume it" not in line and "saved no checkpoint" in line and "--overwrite" in line

    # the command printed starts the run again; stopped after its first checkpoint, it says resume
    interrupt_at(monkeypatch, 3)
    assert main(again) == 130
    err = capsys.readouterr().err
    assert "interrupted; every file written so far is whole. Resume with:" in err
    assert printed_command(err) == [*argv, "--resume"]
    interrupt_at(monkeypatch, 0)
    assert main([*argv, "--resume"]) == 0


def test_only_rank_zero_says_how_to_go_on_after_an_interrupt(tmp_path, capsys, monkeypatch):
    import mdarts.cli as cli

    def _run_train(args):
        """Train.

        Interrupted at once."""
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_train", _run_train)
    argv = ["train", "--arch", "transformer", "--out", str(tmp_path / "run")]
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 130
    assert printed_command(capsys.readouterr().err) == argv  # nothing in --out: the same command


def signalled_worker(rank: int, port: int, argv: list[str], out: str) -> None:
    """Each of two processes runs ``mdarts argv`` and gets SIGTERM after update 2 (its handler
    called, as the signal would); its exit status and error output are saved."""
    import contextlib
    import io
    import json
    import signal

    from test_distributed import join, leave

    join(rank, port)

    def take_step(self, bar):
        TAKE_STEP(self, bar)
        if self.step_count == 2:
            self.signals._handle(signal.SIGTERM, None)

    Trainer.take_step = take_step
    error = io.StringIO()
    try:
        with contextlib.redirect_stderr(error):
            status = main(argv)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"status": status, "stderr": error.getvalue()}))
    finally:
        leave()


TAKE_STEP = Trainer.take_step


def test_of_two_processes_stopped_by_a_signal_only_rank_zero_prints_the_resume_command(corpus_args, tmp_path):
    import json

    from test_distributed import start

    argv = train_argv(tmp_path / "run", corpus_args, steps=6)
    start(signalled_worker, argv, str(tmp_path))
    first, second = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert first["status"] == second["status"] == 143
    assert "SIGTERM received" in first["stderr"]
    assert "stopped by SIGTERM after step 2; checkpoint written. Resume with:" in first["stderr"]
    assert printed_command(first["stderr"]) == [*argv, "--resume"]
    assert "SIGTERM" not in second["stderr"] and "resume" not in second["stderr"].lower()


# ----------------------------------------------------------------------------- evaluate on files


@pytest.fixture(scope="module")
def files_checkpoint(corpus_args, tmp_path_factory) -> Path:
    """checkpoint_last.pt of a 2-update training on generic files (it records the pair src-tgt)."""
    out = tmp_path_factory.mktemp("files") / "run"
    assert main(train_argv(out, corpus_args, steps=2)) == 0
    return out / "checkpoint_last.pt"


def test_a_model_trained_on_files_is_evaluated_on_files(files_checkpoint, corpus_args, tmp_path, capsys):
    src, tgt = (corpus_args[corpus_args.index(f"--valid-{side}") + 1] for side in ("src", "tgt"))
    hypotheses = tmp_path / "hyps.txt"
    argv = ["evaluate", "--checkpoint", str(files_checkpoint), "--beam", "1", "--limit", "3", "--device", "cpu"]
    assert main([*argv, "--test-src", src, "--test-tgt", tgt, "--hypotheses", str(hypotheses)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"src-tgt {src}: 3 sentences, beam 1"
    assert out[1].startswith("BLEU (sacreBLEU, detokenised, cased) = ") and "tok:13a" in out[1]
    assert len(hypotheses.read_text().splitlines()) == 3

    # a Multi30k split is refused in one line that names the options to use
    assert main(argv) == 2
    line = one_error_line(capsys, "evaluate")
    assert "translates src-tgt" in line and "--test-src and --test-tgt" in line
    assert main([*argv, "--test-src", src]) == 2
    assert "--test-src and --test-tgt go together" in one_error_line(capsys, "evaluate")
    assert main([*argv, "--test-src", src, "--test-tgt", tgt, "--split", "val"]) == 2
    assert "either --split" in one_error_line(capsys, "evaluate")

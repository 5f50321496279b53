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

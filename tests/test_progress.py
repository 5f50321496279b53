"""Progress: a bar on a terminal, plain lines in a log, nothing when disabled."""

from __future__ import annotations

import re

import torch

from mdarts.progress import Progress


def test_a_log_gets_progress_lines_with_the_time_left(capsys):
    progress = Progress(10, "train", torch.device("cpu"), initial=4, line_seconds=0.0)  # stderr is captured: a log
    for step in range(3):
        progress.update(tokens=100, loss=5.0 - step, lr=1e-3, arch="[ffn]")
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(
        r"train 7/10 \(70%\): loss 3\.000, tok/s [0-9,]+, mem [0-9,]+MiB, lr 1\.00e-03, arch \[ffn\], "
        r"\d+m\d\ds elapsed, about \d+m\d\ds left",
        lines[-1],
    ), lines[-1]


def test_lines_come_at_most_once_an_interval_and_never_when_disabled(capsys):
    quiet = Progress(None, "search", torch.device("cpu"), enabled=False, line_seconds=0.0)
    throttled = Progress(None, "search", torch.device("cpu"), line_seconds=3600.0)
    for progress in (quiet, throttled):
        progress.update(tokens=10, loss=1.0)
        progress.close()
    assert capsys.readouterr().err == ""
    unknown_total = Progress(None, "search", torch.device("cpu"), line_seconds=0.0)
    unknown_total.update(tokens=10, loss=1.0)
    assert re.fullmatch(r"search 1: loss 1\.000, .* elapsed\n", capsys.readouterr().err)

"""Progress of long loops: loss, tokens/s, learning rate and memory in use, as a bar on a
terminal and as a plain line every minute in a log (stderr redirected to a file, a batch job)."""

from __future__ import annotations

import sys
import time
from typing import Optional

import torch
from tqdm import tqdm

from .memory import memory_in_use

LINE_SECONDS = 60.0
"""How often a log (stderr not a terminal) gets a progress line."""


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


class Progress:
    """Progress over ``total`` steps (None: unknown) from step ``initial``: loss, tokens/s, lr,
    memory and whatever else ``update`` is given.

    On a terminal a tqdm bar on stderr; where stderr is not a terminal (``nohup ... > log``) a
    line on stderr every ``line_seconds``, with the time elapsed and, given ``total``, the time
    left at the rate so far. ``enabled`` True forces the bar, False shows nothing (the default,
    None, picks by stderr)."""

    def __init__(
        self,
        total: Optional[int],
        desc: str,
        device: torch.device,
        initial: int = 0,
        enabled: Optional[bool] = None,
        line_seconds: float = LINE_SECONDS,
    ) -> None:
        terminal = sys.stderr.isatty()
        self.lines = enabled is None and not terminal
        self.device, self.desc, self.total, self.initial, self.step = device, desc, total, initial, initial
        self.bar = tqdm(
            total=total,
            desc=desc,
            initial=initial,
            disable=not (enabled or (enabled is None and terminal)),
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self.started = time.perf_counter()
        self.line_seconds, self.last_line = line_seconds, self.started
        self.tokens = 0

    def update(self, tokens: int, loss: float, lr: Optional[float] = None, **extra: str) -> None:
        """One step done: ``tokens`` processed at training ``loss``."""
        self.tokens += tokens
        self.step += 1
        postfix = {
            "loss": f"{loss:.3f}",
            "tok/s": f"{self.tokens_per_second():,.0f}",
            "mem": f"{memory_in_use(self.device) / 2**20:,.0f}MiB",
        }
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        postfix.update(extra)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        now = time.perf_counter()
        if self.lines and now - self.last_line >= self.line_seconds:
            self.last_line = now
            print(self._line(postfix, now - self.started), file=sys.stderr, flush=True)

    def _line(self, postfix: dict[str, str], elapsed: float) -> str:
        where = f"{self.step}" if self.total is None else f"{self.step}/{self.total} ({self.step / self.total:.0%})"
        fields = ", ".join(f"{name} {value}" for name, value in postfix.items())
        left = ""
        if self.total is not None and self.step < self.total:
            left = f", about {_duration(elapsed / (self.step - self.initial) * (self.total - self.step))} left"
        return f"{self.desc} {where}: {fields}, {_duration(elapsed)} elapsed{left}"

    def tokens_per_second(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.started)

    def close(self) -> None:
        self.bar.close()

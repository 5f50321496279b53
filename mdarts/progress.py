"""A progress bar for long loops: loss, tokens/s, learning rate and memory in use."""

from __future__ import annotations

import sys
import time
from typing import Optional

import torch
from tqdm import tqdm

from .memory import memory_in_use


class Progress:
    """A tqdm bar over ``total`` steps whose postfix shows loss, tokens/s, lr and memory.

    Writes to stderr; disabled when ``enabled`` is False (or stderr is not a terminal and
    ``enabled`` is None, so logs stay readable)."""

    def __init__(
        self, total: Optional[int], desc: str, device: torch.device, initial: int = 0, enabled: Optional[bool] = None
    ) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.device = device
        self.bar = tqdm(
            total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True, file=sys.stderr
        )
        self.started = time.perf_counter()
        self.tokens = 0

    def update(self, tokens: int, loss: float, lr: Optional[float] = None, **extra: str) -> None:
        """One step done: ``tokens`` processed at training ``loss``."""
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.started)
        postfix = {
            "loss": f"{loss:.3f}",
            "tok/s": f"{rate:,.0f}",
            "mem": f"{memory_in_use(self.device) / 2**20:,.0f}MiB",
        }
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        postfix.update(extra)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def tokens_per_second(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.started)

    def close(self) -> None:
        self.bar.close()

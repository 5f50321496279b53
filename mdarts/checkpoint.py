"""Checkpoints: written atomically (temporary file, then rename), read with clear errors,
and the random-number state needed for an exact resume."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT = "mdarts-checkpoint-1"


def save_checkpoint(path: os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save ``payload`` (plus the format tag) to ``path`` atomically: a crash while
    writing leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save({"format": FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: os.PathLike, kind: Optional[str] = None) -> dict[str, Any]:
    """The payload saved at ``path``; ``kind`` ("train", "search"...) must match if given.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not an
    mdarts checkpoint, is corrupt or truncated, or is of another kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for damaged files
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {type(error).__name__}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not an mdarts checkpoint (expected format {FORMAT!r})")
    if kind is not None and payload.get("kind") != kind:
        raise ValueError(f"checkpoint {path} is a {payload.get('kind')!r} checkpoint, expected a {kind!r} one")
    return payload


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch CPU and CUDA random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

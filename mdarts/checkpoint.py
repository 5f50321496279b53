"""Checkpoints: written atomically, read with clear errors, the random-number state needed
for an exact resume, the model spec a checkpoint rebuilds its model from
(:func:`model_spec`, :func:`build_model_from_spec`, :func:`load_model`) and checkpoint
averaging."""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .config import ModelConfig
from .files import write_atomic
from .genotype import Genotype
from .model import DerivedNet
from .sizing import BASELINES
from .tokenizer import Tokenizer

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "mdarts-checkpoint-1"
TRAIN_KIND = "train"
"""``kind`` of the checkpoints the trainer writes (full training state)."""
AVERAGE_KIND = "average"
"""``kind`` of ``checkpoint_avg.pt`` (model, spec and tokenizer only)."""
MODEL_KINDS = (*BASELINES, "derived")
AVERAGE_FILE = "checkpoint_avg.pt"
STEP_FILE_PATTERN = re.compile(r"^checkpoint_step(\d+)\.pt$")
ZIP_MAGIC = b"PK\x03\x04"  # how a zip archive, thus every torch.save file, starts


def save_checkpoint(path: os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save ``payload`` (plus the format tag) to ``path`` atomically: a crash while
    writing leaves the previous file intact."""
    write_atomic(path, lambda out: torch.save({"format": FORMAT, **payload}, out))


class DamagedCheckpoint(ValueError):
    """A checkpoint whose bytes are not those written (see :func:`verify_checkpoint`): the one
    line ``"<file>: damaged (<reason>); <advice>"``."""

    def __init__(self, path: PathLike, reason: str, advice: str = "load another checkpoint or write it again") -> None:
        super().__init__(f"{path}: damaged ({reason}); {advice}")
        self.path, self.reason = Path(path), reason


def verify_checkpoint(path: PathLike) -> None:
    """DamagedCheckpoint unless ``path`` holds the bytes that were written: torch.save writes a
    zip archive that stores a CRC-32 of every record (the pickle, each tensor's data), which is
    checked here (:meth:`zipfile.ZipFile.testzip` reads it all once, cheap beside loading it).
    torch.load checks none of it: bytes overwritten inside a tensor load as other weights. So
    this also verifies checkpoints written before mdarts checked them. A zip archive cut short
    is damaged too; a file that does not even start as one is left to torch.load, which tells
    what it is (another format, an unsafe pickle) or that it cannot read it."""
    with open(path, "rb") as handle:
        if handle.read(4) != ZIP_MAGIC:
            return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except OSError:
        raise
    except Exception as error:  # BadZipFile, EOFError, ...: the archive's structure is broken
        raise DamagedCheckpoint(path, f"not a whole zip archive as torch.save writes: {error}") from None
    if bad is not None:
        raise DamagedCheckpoint(path, f"its record {bad} does not match the CRC-32 stored when it was written")


def load_checkpoint(path: os.PathLike, kind: Optional[str] = None) -> dict[str, Any]:
    """The payload saved at ``path``; ``kind`` ("train", "search"...) must match if given.

    Verified first (:func:`verify_checkpoint`), then loaded with ``weights_only=True``:
    tensors, numbers, strings, bytes and containers only, so a checkpoint from elsewhere cannot
    run code. Raises FileNotFoundError for a missing file, DamagedCheckpoint (a ValueError) for
    a damaged one, and ValueError for a file that is not an mdarts checkpoint, holds other
    objects, is of another kind, or holds non-finite weights (naming the first such tensor)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {path} holds objects other than tensors and plain data; refused: {error}"
        ) from None
    except Exception as error:  # torch raises several types for files it cannot read
        raise ValueError(f"checkpoint {path} is unreadable: {type(error).__name__}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not an mdarts checkpoint (expected format {FORMAT!r})")
    if kind is not None and payload.get("kind") != kind:
        raise ValueError(f"checkpoint {path} is a {payload.get('kind')!r} checkpoint, expected a {kind!r} one")
    check_finite(payload, path)
    return payload


def check_finite(payload: dict[str, Any], path: PathLike) -> None:
    """ValueError naming ``path`` and the first weight tensor (of the payload's ``model``, or
    of a search's ``searcher.model``) holding NaN or infinity: a run that diverged before the
    checkpoint was written."""
    searcher = payload.get("searcher")
    states = {
        "model": payload.get("model"),
        "searcher.model": searcher.get("model") if isinstance(searcher, dict) else None,
    }
    for prefix, state in states.items():
        for key, value in state.items() if isinstance(state, dict) else ():
            if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(
                    f"{path}: non-finite weights: {prefix} {key} holds {bad} NaN or infinite value(s) of "
                    f"{value.numel()} (the run diverged before this checkpoint); load an earlier checkpoint"
                )


def load_resumable(path: PathLike, kind: str, older: Sequence[Path]) -> dict[str, Any]:
    """:func:`load_checkpoint` of the checkpoint a resume starts from; when it is damaged, the
    DamagedCheckpoint says which of the run's ``older`` checkpoints (full training states too)
    is whole, the newest by step, and how to continue from it (copy it over ``path``, remove the
    damaged ones, which the run would read again), or that none is."""
    path = Path(path)
    try:
        return load_checkpoint(path, kind)
    except DamagedCheckpoint as error:
        whole, damaged = [], []
        for candidate in older:
            try:
                whole.append((load_checkpoint(candidate, kind)["step"], candidate))
            except DamagedCheckpoint:
                damaged.append(candidate)
            except (ValueError, KeyError, OSError):
                continue
        if not whole:
            raise DamagedCheckpoint(
                path, error.reason, f"no other checkpoint in {path.parent} is whole: start afresh with --overwrite"
            ) from None
        step, newest = max(whole, key=lambda found: found[0])
        remove = f" && rm {' '.join(str(p) for p in damaged)}" if damaged else ""
        also = f" and remove the damaged {', '.join(p.name for p in damaged)}" if damaged else ""
        advice = (
            f"the newest whole checkpoint is {newest.name} (step {step}): to continue from it, copy it over "
            f"{path.name}{also} (cp {newest} {path}{remove}) and resume again"
        )
        raise DamagedCheckpoint(path, error.reason, advice) from None


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch CPU and CUDA random states, as plain data and tensors."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- models and their specs


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The spec :func:`build_model_from_spec` rebuilds ``model`` from (an untrained copy):
    ``{"kind": "transformer" | "evolved" | "derived", "config": ModelConfig dict, "genotype": dict or
    None, "vocab_size": int}``."""
    for kind, cls in BASELINES.items():
        if type(model) is cls:
            return {"kind": kind, "config": model.config.to_dict(), "genotype": None, "vocab_size": model.vocab_size}
    if isinstance(model, DerivedNet):
        return {
            "kind": "derived",
            "config": model.config.to_dict(),
            "genotype": model.genotype.to_dict(),
            "vocab_size": model.vocab_size,
        }
    raise ValueError(
        f"model_spec: expected a TransformerBaseline, EvolvedTransformer or DerivedNet, got {type(model).__name__}"
    )


def build_model_from_spec(spec: dict[str, Any], source: str = "model spec") -> nn.Module:
    """A freshly initialised model of the kind, sizes and architecture ``spec`` names (see
    :func:`model_spec`); ValueError naming ``source`` and the bad field otherwise."""
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: expected a dict, got {type(spec).__name__}")
    missing = [key for key in ("kind", "config", "vocab_size") if key not in spec]
    if missing:
        raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
    if spec["kind"] not in MODEL_KINDS:
        raise ValueError(f"{source}: kind must be one of {', '.join(MODEL_KINDS)}, got {spec['kind']!r}")
    try:
        config = ModelConfig.from_dict(spec["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: bad config: {error}") from None
    if spec["kind"] in BASELINES:
        return BASELINES[spec["kind"]](config, spec["vocab_size"])
    if not spec.get("genotype"):
        raise ValueError(f"{source}: a derived model needs its genotype")
    genotype = Genotype.from_dict(spec["genotype"], source=f"{source} genotype")
    return DerivedNet(genotype, config, spec["vocab_size"], memory_mode=config.memory_mode)


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Raise ValueError naming ``source`` when ``state`` does not fit ``model``: the missing
    and unexpected keys, or the keys whose shapes differ (with both shapes)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing key(s) {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_listing(unexpected)}")
    wrong = [
        f"{key} {tuple(state[key].shape)} (model has {tuple(value.shape)})"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    if wrong:
        problems.append(f"shape mismatch: {_listing(wrong)}")
    if problems:
        raise ValueError(f"{source}: the weights do not fit the model ({type(model).__name__}): " + "; ".join(problems))


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns: the model (eval mode), its tokenizer, its spec (see
    :func:`model_spec`) and what it was trained on (``{"pair", "tokenizer_sha256",
    "train_sha256"}``, see :meth:`mdarts.prepare.PreparedData.identity`; None for a checkpoint
    written before mdarts recorded it)."""

    model: nn.Module
    tokenizer: Tokenizer
    spec: dict[str, Any]
    data: Optional[dict[str, str]]


def load_model(checkpoint_path: PathLike, device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """The trained model (in eval mode, on ``device``), its tokenizer, spec and data record,
    from a training or averaged checkpoint.

    Raises FileNotFoundError for a missing file and ValueError naming the file for a
    corrupt, truncated or foreign checkpoint, a bad spec, a tokenizer whose vocabulary
    differs from the model's, or weights that do not fit the model (which keys, and why).
    """
    path = Path(checkpoint_path)
    payload = load_checkpoint(path)
    if payload.get("kind") not in (TRAIN_KIND, AVERAGE_KIND):
        raise ValueError(
            f"checkpoint {path} is a {payload.get('kind')!r} checkpoint, expected a training "
            f"({TRAIN_KIND!r}) or averaged ({AVERAGE_KIND!r}) one"
        )
    missing = [key for key in ("spec", "model", "tokenizer") if key not in payload]
    if missing:
        raise ValueError(f"checkpoint {path}: missing {', '.join(missing)}")
    spec = payload["spec"]
    model = build_model_from_spec(spec, source=f"checkpoint {path}")
    try:
        tokenizer = Tokenizer(payload["tokenizer"])
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {path}: the stored SentencePiece model is unreadable ({error})") from None
    if tokenizer.vocab_size != spec["vocab_size"]:
        raise ValueError(
            f"checkpoint {path}: the tokenizer has {tokenizer.vocab_size} ids but the model {spec['vocab_size']}"
        )
    check_state_dict(model, payload["model"], f"checkpoint {path}")
    model.load_state_dict(payload["model"])
    return LoadedModel(model.to(device).eval(), tokenizer, spec, payload.get("data"))


# ----------------------------------------------------------------------------- averaging


def average_checkpoints(paths: Sequence[PathLike]) -> dict[str, Tensor]:
    """Parameter-wise mean of the ``model`` state dicts of ``paths`` (accumulated in float64,
    returned in each tensor's own dtype; non-float tensors are taken from the last file).

    Raises ValueError when ``paths`` is empty or the state dicts disagree in keys or shapes
    (naming the file)."""
    if not paths:
        raise ValueError("average_checkpoints: no checkpoints given")
    states = []
    for path in paths:
        payload = load_checkpoint(path)
        if "model" not in payload:
            raise ValueError(f"checkpoint {path}: holds no model weights")
        states.append(payload["model"])
    first = states[0]
    for path, state in zip(paths[1:], states[1:]):
        if state.keys() != first.keys():
            differ = sorted(set(state) ^ set(first))
            raise ValueError(f"checkpoint {path}: its keys differ from {paths[0]}'s ({_listing(differ)})")
        wrong = [key for key in first if state[key].shape != first[key].shape]
        if wrong:
            raise ValueError(f"checkpoint {path}: shapes differ from {paths[0]}'s at {_listing(wrong)}")
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            total = sum(state[key].double() for state in states)
            averaged[key] = (total / len(states)).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged


def step_checkpoints(out_dir: PathLike) -> list[Path]:
    """The ``checkpoint_step{N}.pt`` files of a run, in step order."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := STEP_FILE_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def write_average_checkpoint(out_dir: PathLike, last: Optional[int] = None) -> Path:
    """Average the last ``last`` (default all) ``checkpoint_step{N}.pt`` of a run into
    ``checkpoint_avg.pt`` (atomically; model, spec and tokenizer of the newest); its path."""
    out_dir = Path(out_dir)
    paths = step_checkpoints(out_dir)
    if last is not None:
        paths = paths[-last:]
    if not paths:
        raise FileNotFoundError(f"{out_dir}: no checkpoint_step*.pt files to average")
    newest = load_checkpoint(paths[-1], TRAIN_KIND)
    target = out_dir / AVERAGE_FILE
    save_checkpoint(
        target,
        {
            "kind": AVERAGE_KIND,
            "model": average_checkpoints(paths),
            "spec": newest["spec"],
            "tokenizer": newest["tokenizer"],
            "data": newest.get("data"),
            "averaged": [p.name for p in paths],
            "step": newest["step"],
        },
    )
    return target

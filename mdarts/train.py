"""Training of a derived network or the Transformer baseline (issue 5, item 4).

Label-smoothed cross-entropy, Adam(0.9, 0.98) with an inverse-sqrt warm-up schedule,
gradient-norm clipping, optional bf16 autocast, validation loss (and BLEU through a
callback) at an interval, early stopping, checkpoints written atomically and an exact
resume: a run stopped at a checkpoint and resumed logs the same losses and ends with the
same parameters as one that was never interrupted.

A run directory holds:

* ``log.jsonl``: one JSON object a line, ``{"kind": "train", ...}`` every ``log_interval``
  steps and ``{"kind": "valid", ...}`` at every validation;
* ``checkpoint_last.pt`` (written at every validation and at the end),
  ``checkpoint_best.pt`` (lowest validation loss), ``checkpoint_step{N}.pt`` (the last
  ``keep_last`` validations, for averaging) and ``checkpoint_avg.pt`` (their average);
* ``curves.png``: training and validation loss against the step.

Every checkpoint carries the model spec and the SentencePiece model, so
:func:`load_model` needs nothing else.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .batching import TokenBatches
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import DictFields, SearchConfig
from .genotype import Genotype
from .loss import label_smoothed_loss
from .memory import peak_memory
from .model import DerivedNet, TransformerBaseline
from .prepare import EncodedSplit
from .progress import Progress
from .tokenizer import Tokenizer

PathLike = Union[str, "os.PathLike[str]"]

CHECKPOINT_KIND = "train"
"""``kind`` of the checkpoints the trainer writes (full training state)."""
AVERAGE_KIND = "average"
"""``kind`` of ``checkpoint_avg.pt`` (model, spec and tokenizer only)."""
MODEL_KINDS = ("transformer", "derived")
LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"
LAST_NAME = "checkpoint_last.pt"
BEST_NAME = "checkpoint_best.pt"
AVERAGE_NAME = "checkpoint_avg.pt"
_STEP_PATTERN = re.compile(r"^checkpoint_step(\d+)\.pt$")
RUN_FILES = (LOG_NAME, CURVES_NAME, LAST_NAME, BEST_NAME, AVERAGE_NAME)
# settings that change the trajectory: a resumed run must use the values it started with
_TRAJECTORY_FIELDS = (
    "lr", "warmup_steps", "betas", "weight_decay", "label_smoothing", "clip_norm", "max_tokens", "bf16", "seed",
)


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig(DictFields):
    """Settings of a training run.

    lr: peak learning rate, reached after ``warmup_steps`` updates; the rate at update
        ``t`` (1-based) is ``lr * min(t / warmup_steps, sqrt(warmup_steps / t))``.
    betas, weight_decay: Adam's; label_smoothing: of the cross-entropy (0.1);
    clip_norm: largest global gradient L2 norm (0 = no clipping);
    max_tokens: batch size limit, ``batch_size * max(S, T)`` positions (see batching);
    max_steps / max_epochs / max_minutes: stop after this many updates / passes / minutes
        of training (None = no limit; at least one must be set; the minutes count the
        training loop, validations included, summed over resumes); valid_interval: updates between validations
        (each also writes checkpoints); log_interval: updates between training log lines;
    patience: stop after this many validations in a row without a lower validation loss
        (0 = never stop early); keep_last: ``checkpoint_step{N}.pt`` files kept for
        averaging (0 = none);
    bf16: run forward and backward under ``torch.autocast`` in bfloat16;
    seed: of dropout and batch shuffling; device: "auto" (CUDA when available), "cpu",
        "cuda", "cuda:1"...
    """

    lr: float = 5e-4
    warmup_steps: int = 4000
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_tokens: int = 4096
    max_steps: Optional[int] = None
    max_epochs: Optional[int] = None
    max_minutes: Optional[float] = None
    valid_interval: int = 1000
    log_interval: int = 100
    patience: int = 0
    keep_last: int = 5
    bf16: bool = False
    seed: int = 1
    device: str = "auto"

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            fail("lr", "a positive finite number")
        for name in ("warmup_steps", "max_tokens", "valid_interval", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "a positive integer")
        for name in ("max_steps", "max_epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                fail(name, "a positive integer or None")
        if self.max_minutes is not None and not (
            isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0 and math.isfinite(self.max_minutes)
        ):
            fail("max_minutes", "a positive finite number or None")
        if self.max_steps is None and self.max_epochs is None and self.max_minutes is None:
            raise ValueError(
                "TrainConfig.max_steps / max_epochs / max_minutes: set at least one, or training never ends"
            )
        for name in ("patience", "keep_last", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "a non-negative integer")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            fail("betas", "two numbers in [0, 1)")
        if not self.weight_decay >= 0.0:
            fail("weight_decay", "a non-negative number")
        if not 0.0 <= self.label_smoothing < 1.0:
            fail("label_smoothing", "a value in [0, 1)")
        if not self.clip_norm >= 0.0:
            fail("clip_norm", "a non-negative number (0 = no clipping)")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                fail("device", '"auto" or a torch device such as "cpu" or "cuda:0"')
        object.__setattr__(self, "betas", tuple(self.betas))

    def torch_device(self) -> torch.device:
        """The device to train on ("auto": CUDA when available, else the CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def learning_rate(self, step: int) -> float:
        """Learning rate of update ``step`` (1-based): linear warm-up, then inverse square root."""
        return self.lr * min(step / self.warmup_steps, math.sqrt(self.warmup_steps / step))


# ---------------------------------------------------------------------------- models and specs


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The spec :func:`build_model_from_spec` rebuilds ``model`` from (an untrained copy):
    ``{"kind": "transformer" | "derived", "config": SearchConfig dict, "genotype": dict or
    None, "vocab_size": int}``."""
    if isinstance(model, TransformerBaseline):
        return {"kind": "transformer", "config": model.config.to_dict(), "genotype": None, "vocab_size": model.vocab_size}
    if isinstance(model, DerivedNet):
        return {
            "kind": "derived", "config": model.config.to_dict(), "genotype": model.genotype.to_dict(),
            "vocab_size": model.vocab_size,
        }
    raise ValueError(f"model_spec: expected a TransformerBaseline or DerivedNet, got {type(model).__name__}")


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
        config = SearchConfig.from_dict(spec["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: bad config: {error}") from None
    if spec["kind"] == "transformer":
        return TransformerBaseline(config, spec["vocab_size"])
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
        for key, value in expected.items() if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    if wrong:
        problems.append(f"shape mismatch: {_listing(wrong)}")
    if problems:
        raise ValueError(f"{source}: the weights do not fit the model ({type(model).__name__}): " + "; ".join(problems))


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_model(checkpoint_path: PathLike, device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """The trained model (in eval mode, on ``device``), its tokenizer and its spec, from a
    training or averaged checkpoint.

    Raises FileNotFoundError for a missing file and ValueError naming the file for a
    corrupt, truncated or foreign checkpoint, a bad spec, a tokenizer whose vocabulary
    differs from the model's, or weights that do not fit the model (which keys, and why).
    """
    path = Path(checkpoint_path)
    payload = load_checkpoint(path)
    if payload.get("kind") not in (CHECKPOINT_KIND, AVERAGE_KIND):
        raise ValueError(
            f"checkpoint {path} is a {payload.get('kind')!r} checkpoint, expected a training "
            f"({CHECKPOINT_KIND!r}) or averaged ({AVERAGE_KIND!r}) one"
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
    return model.to(device).eval(), tokenizer, spec


# ---------------------------------------------------------------------------- averaging


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
    found = [(int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := _STEP_PATTERN.match(p.name))]
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
    newest = load_checkpoint(paths[-1], CHECKPOINT_KIND)
    target = out_dir / AVERAGE_NAME
    save_checkpoint(target, {
        "kind": AVERAGE_KIND, "model": average_checkpoints(paths), "spec": newest["spec"],
        "tokenizer": newest["tokenizer"], "averaged": [p.name for p in paths], "step": newest["step"],
    })
    return target


# ---------------------------------------------------------------------------- logs and curves


def read_log(out_dir: PathLike) -> list[dict[str, Any]]:
    """The entries of a run's ``log.jsonl`` (empty when there is none)."""
    path = Path(out_dir) / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(out_dir: PathLike) -> Path:
    """Write ``curves.png``: training and validation loss (and validation BLEU, on a second
    axis, when logged) against the update step, from ``log.jsonl``; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_log(out_dir)
    train = [e for e in entries if e["kind"] == "train"]
    valid = [e for e in entries if e["kind"] == "valid"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss", lw=1)
    axis.plot([e["step"] for e in valid], [e["loss"] for e in valid], "o-", label="valid loss", ms=3)
    axis.set_xlabel("update step")
    axis.set_ylabel("label-smoothed cross-entropy (nats/token)")
    handles, labels = axis.get_legend_handles_labels()
    bleu = [e for e in valid if e.get("bleu") is not None]
    if bleu:
        right = axis.twinx()
        right.plot([e["step"] for e in bleu], [e["bleu"] for e in bleu], "s--", color="tab:green", label="valid BLEU", ms=3)
        right.set_ylabel("BLEU")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    axis.legend(handles, labels, loc="upper right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    target = Path(out_dir) / CURVES_NAME
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name + ".", suffix=".tmp", delete=False)
    with handle:
        figure.savefig(handle, format="png", dpi=110)
    os.replace(handle.name, target)
    plt.close(figure)
    return target


# ---------------------------------------------------------------------------- evaluation


def validation_loss(
    model: nn.Module, batches: TokenBatches, pad_id: int, smoothing: float, device: torch.device, bf16: bool = False
) -> dict[str, float]:
    """Token-weighted mean label-smoothed loss and NLL (nats/token), perplexity exp(nll) and
    the token count of ``batches``, in eval mode without gradients (the model's mode is
    restored)."""
    was_training = model.training
    model.eval()
    loss_sum = nll_sum = 0.0
    tokens = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in batches:
            batch = batch.to(device)
            loss, nll, count = label_smoothed_loss(model(batch.src, batch.tgt_in), batch.tgt_out, pad_id, smoothing)
            loss_sum += float(loss)
            nll_sum += float(nll)
            tokens += count
    model.train(was_training)
    if tokens == 0:
        raise ValueError("validation_loss: the validation batches hold no target tokens")
    return {"loss": loss_sum / tokens, "nll": nll_sum / tokens, "ppl": math.exp(nll_sum / tokens), "tokens": tokens}


# ---------------------------------------------------------------------------- the trainer


class Trainer:
    """Trains ``model`` on ``train_split``, validating on ``valid_split``, into ``out_dir``.

    Args:
        model: a :class:`TransformerBaseline` or :class:`DerivedNet` (freshly initialised;
            with ``resume`` its weights are replaced by the checkpoint's).
        train_split, valid_split: encoded splits (ids without BOS/EOS).
        config: the training settings.
        out_dir: the run directory (created when missing).
        pad_id: padding id of the targets (ignored by the loss).
        model_spec: what :func:`build_model_from_spec` rebuilds the model from (see
            :func:`model_spec`); checked against ``model``.
        tokenizer_bytes: the serialized SentencePiece model, stored in every checkpoint.
        validate_bleu: optional ``model -> BLEU`` called at each validation (in eval mode,
            without gradients); its value is logged but does not choose the best checkpoint.
        resume: continue the run in ``out_dir`` from ``checkpoint_last.pt``; the settings
            that shape the trajectory (lr, schedule, batches, seed...) must be the same,
            max_steps / max_epochs / intervals / patience may change.
        overwrite: start afresh in a directory that holds a run, deleting its files.
        progress: show the progress bar (None: when stderr is a terminal).

    Raises FileExistsError when a fresh run (neither ``resume`` nor ``overwrite``) meets a
    directory that holds a run, FileNotFoundError when ``resume`` finds no
    ``checkpoint_last.pt``, and ValueError for a corrupt checkpoint, other trajectory
    settings or another model.

    Exactness of a resume: the training log lines match only when ``log_interval``
    divides the step the run stopped at (a partial window is logged at the end).
    """

    def __init__(
        self,
        model: nn.Module,
        train_split: EncodedSplit,
        valid_split: EncodedSplit,
        config: TrainConfig,
        out_dir: PathLike,
        pad_id: int,
        model_spec: dict[str, Any],
        tokenizer_bytes: bytes,
        validate_bleu: Optional[Callable[[nn.Module], float]] = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: Optional[bool] = None,
    ) -> None:
        if resume and overwrite:
            raise ValueError("Trainer: resume and overwrite exclude each other")
        self.out_dir = Path(out_dir)
        self.config = config
        self.device = config.torch_device()
        self.pad_id = pad_id
        self.spec = model_spec
        self.tokenizer_bytes = tokenizer_bytes
        self.validate_bleu = validate_bleu
        self.show_progress = progress
        with torch.device("meta"):
            check_state_dict(build_model_from_spec(model_spec), model.state_dict(), "Trainer model_spec")
        self.model = model.to(self.device)
        max_positions = model.config.max_positions
        self.train_batches = TokenBatches(
            train_split.src_ids, train_split.tgt_ids, config.max_tokens, seed=config.seed, shuffle=True,
            max_positions=max_positions, pad_id=pad_id,
        )
        if len(self.train_batches) == 0:
            raise ValueError(
                f"Trainer: no training pair fits max_tokens={config.max_tokens} and max_positions={max_positions}"
            )
        self.valid_batches = TokenBatches(
            valid_split.src_ids, valid_split.tgt_ids, config.max_tokens, shuffle=False,
            max_positions=max_positions, pad_id=pad_id,
        )
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        # training state: updates done, epoch, batches of that epoch done, early stopping
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.best_loss = math.inf
        self.bad_validations = 0
        self.validated_step = -1  # checkpoints are written right after a validation
        self.train_seconds = 0.0  # time spent in run(), summed over resumes (for max_minutes)
        self._clock: Optional[tuple[float, float]] = None  # (perf_counter at run(), train_seconds then)
        if resume:
            self._resume()
        else:
            self._claim_directory(overwrite)
            set_seed(config.seed)

    # -------------------------------------------------------------------- set-up

    def _claim_directory(self, overwrite: bool) -> None:
        """Create ``out_dir``; refuse (or, with ``overwrite``, clear) one holding a run."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = [self.out_dir / name for name in RUN_FILES if (self.out_dir / name).exists()]
        existing += step_checkpoints(self.out_dir)
        if not existing:
            return
        if not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds a training run ({', '.join(p.name for p in existing[:4])}"
                f"{', ...' if len(existing) > 4 else ''}); resume it (resume=True / --resume) or start "
                "afresh with overwrite=True / --overwrite, which deletes it"
            )
        for path in existing:
            path.unlink()

    def _resume(self) -> None:
        """Load the training state of ``checkpoint_last.pt`` and cut the log back to it."""
        path = self.out_dir / LAST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} does not exist (no run to continue in {self.out_dir})")
        state = load_checkpoint(path, CHECKPOINT_KIND)
        if state["spec"] != self.spec:
            raise ValueError(f"cannot resume from {path}: it trained another model (spec {state['spec']} vs {self.spec})")
        saved = TrainConfig.from_dict(state["train_config"])
        changed = [
            f"{name} {getattr(saved, name)!r} -> {getattr(self.config, name)!r}"
            for name in _TRAJECTORY_FIELDS if getattr(saved, name) != getattr(self.config, name)
        ]
        if changed:
            raise ValueError(f"cannot resume from {path} with different settings: {', '.join(changed)}")
        check_state_dict(self.model, state["model"], f"checkpoint {path}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best_loss, self.bad_validations = state["best_loss"], state["bad_validations"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.validated_step = self.step
        set_rng_state(state["rng"])
        log = self.out_dir / LOG_NAME
        kept = [e for e in read_log(self.out_dir) if e["step"] <= self.step]
        _write_text_atomic(log, "".join(json.dumps(e) + "\n" for e in kept))

    # -------------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        """Train until max_steps, max_epochs or early stopping; validate and checkpoint every
        ``valid_interval`` updates and at the end; write ``curves.png`` and, with
        ``keep_last`` > 1, ``checkpoint_avg.pt``. Returns a summary: steps, epochs,
        stopped_by ("max_steps", "max_epochs", "max_minutes" or "patience"), best / last validation loss,
        wall_s, tokens_per_s, peak_memory_bytes, parameters and the checkpoint paths."""
        config = self.config
        started = time.perf_counter()
        self._clock = (started, self.train_seconds)
        progress = Progress(config.max_steps, "train", self.device, initial=self.step, enabled=self.show_progress)
        window = _Window()
        stopped_by = self._stop_reason()
        self.model.train()
        try:
            while stopped_by is None:
                self.train_batches.set_epoch(self.epoch)
                for batch in itertools.islice(self.train_batches, self.position, None):
                    loss, nll, tokens, grad_norm = self._train_step(batch)
                    self.position += 1
                    lr = config.learning_rate(self.step)
                    window.add(loss, nll, tokens, grad_norm)
                    progress.update(tokens, loss / tokens, lr, epoch=str(self.epoch))
                    if self.step % config.log_interval == 0:
                        self._log({"kind": "train", "step": self.step, "epoch": self.epoch, "lr": lr, **window.flush(),
                                   "tokens_per_s": progress.tokens_per_second()})
                    if self.step % config.valid_interval == 0:
                        self._validate_and_save()
                    stopped_by = self._stop_reason()
                    if stopped_by is not None:
                        break
                else:
                    self.epoch += 1
                    self.position = 0
                    stopped_by = self._stop_reason()
        finally:
            progress.close()
        if window.steps:
            self._log({"kind": "train", "step": self.step, "epoch": self.epoch, "lr": config.learning_rate(self.step),
                       **window.flush(), "tokens_per_s": progress.tokens_per_second()})
        if self.validated_step != self.step:
            self._validate_and_save()
        average = write_average_checkpoint(self.out_dir, config.keep_last) if config.keep_last > 1 else None
        plot_curves(self.out_dir)
        return {
            "steps": self.step,
            "epochs": self.epoch,
            "stopped_by": stopped_by,
            "best_valid_loss": self.best_loss,
            "last_valid": [e for e in read_log(self.out_dir) if e["kind"] == "valid"][-1],
            "wall_s": time.perf_counter() - started,
            "tokens_per_s": progress.tokens_per_second(),
            "peak_memory_bytes": peak_memory(self.device),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "checkpoint_last": str(self.out_dir / LAST_NAME),
            "checkpoint_best": str(self.out_dir / BEST_NAME),
            "checkpoint_avg": None if average is None else str(average),
        }

    def _stop_reason(self) -> Optional[str]:
        config = self.config
        if config.max_steps is not None and self.step >= config.max_steps:
            return "max_steps"
        if config.max_epochs is not None and self.epoch >= config.max_epochs:
            return "max_epochs"
        if config.max_minutes is not None and self._elapsed_seconds() >= 60.0 * config.max_minutes:
            return "max_minutes"
        if config.patience and self.bad_validations >= config.patience:
            return "patience"
        return None

    def _elapsed_seconds(self) -> float:
        """Training time so far: earlier runs of this directory plus the current run()."""
        if self._clock is None:
            return self.train_seconds
        started, before = self._clock
        return before + time.perf_counter() - started

    def _train_step(self, batch) -> tuple[float, float, int, float]:
        """One update on ``batch``: (summed loss, summed NLL, target tokens, gradient norm
        before clipping)."""
        config = self.config
        self.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate(self.step)
        batch = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits = self.model(batch.src, batch.tgt_in)
        loss, nll, tokens = label_smoothed_loss(logits, batch.tgt_out, self.pad_id, config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        (loss / tokens).backward()
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if config.clip_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, config.clip_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
        self.optimizer.step()
        return float(loss.detach()), float(nll.detach()), tokens, grad_norm

    def _validate_and_save(self) -> dict[str, Any]:
        """Validation loss (and BLEU), log line, early-stopping bookkeeping, checkpoints."""
        result = validation_loss(
            self.model, self.valid_batches, self.pad_id, self.config.label_smoothing, self.device, self.config.bf16
        )
        entry: dict[str, Any] = {"kind": "valid", "step": self.step, "epoch": self.epoch, **result}
        if self.validate_bleu is not None:
            self.model.eval()
            with torch.no_grad():
                entry["bleu"] = float(self.validate_bleu(self.model))
            self.model.train()
        improved = result["loss"] < self.best_loss
        if improved:
            self.best_loss, self.bad_validations = result["loss"], 0
        else:
            self.bad_validations += 1
        entry.update(best_loss=self.best_loss, bad_validations=self.bad_validations)
        self.validated_step = self.step
        self._log(entry)
        payload = self._payload()
        save_checkpoint(self.out_dir / LAST_NAME, payload)
        if improved:
            save_checkpoint(self.out_dir / BEST_NAME, payload)
        if self.config.keep_last:
            save_checkpoint(self.out_dir / f"checkpoint_step{self.step}.pt", payload)
            for old in step_checkpoints(self.out_dir)[: -self.config.keep_last]:
                old.unlink()
        plot_curves(self.out_dir)
        return entry

    def _payload(self) -> dict[str, Any]:
        """Everything an exact resume and :func:`load_model` need."""
        return {
            "kind": CHECKPOINT_KIND,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "rng": rng_state(),
            "best_loss": self.best_loss,
            "bad_validations": self.bad_validations,
            "train_seconds": self._elapsed_seconds(),
            "train_config": self.config.to_dict(),
            "spec": self.spec,
            "tokenizer": self.tokenizer_bytes,
        }

    def _log(self, entry: dict[str, Any]) -> None:
        with open(self.out_dir / LOG_NAME, "a") as handle:
            handle.write(json.dumps(entry) + "\n")


class _Window:
    """Sums over the updates since the last training log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = self.nll = self.grad_norm = 0.0
        self.tokens = self.steps = 0

    def add(self, loss: float, nll: float, tokens: int, grad_norm: float) -> None:
        self.loss += loss
        self.nll += nll
        self.tokens += tokens
        self.grad_norm += grad_norm
        self.steps += 1

    def flush(self) -> dict[str, float]:
        """Token-weighted mean loss and NLL, perplexity, mean gradient norm, tokens; then reset."""
        summary = {
            "loss": self.loss / self.tokens, "nll": self.nll / self.tokens, "ppl": math.exp(self.nll / self.tokens),
            "grad_norm": self.grad_norm / self.steps, "tokens": self.tokens,
        }
        self.reset()
        return summary


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_text_atomic(path: Path, text: str) -> None:
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False)
    with handle:
        handle.write(text)
    os.replace(handle.name, path)

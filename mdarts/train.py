"""Training of a derived network or a baseline: the engine behind ``mdarts train``.

Label-smoothed cross-entropy, Adam with an inverse-sqrt warm-up schedule, gradient-norm
clipping, optional bf16 autocast, validation loss (and BLEU through a callback) at an
interval, early stopping, checkpoints written atomically and an exact resume: a run stopped
at a checkpoint and resumed logs the same losses and ends with the same parameters as one
that was never interrupted. The run machinery (seeding, device, schedule, logs, run
directory, resume policy) is :mod:`mdarts.runs`; the settings are
:class:`~mdarts.config.TrainConfig`.

A run directory holds:

* ``log.jsonl``: one JSON object a line, ``{"event": "train", ...}`` every ``log_interval``
  steps and ``{"event": "valid", ...}`` at every validation;
* ``checkpoint_last.pt`` (written at every validation and at the end),
  ``checkpoint_best.pt`` (lowest validation loss), ``checkpoint_step{N}.pt`` (the last
  ``keep_last`` validations, for averaging) and ``checkpoint_avg.pt`` (their average);
* ``curves.png``: training and validation loss against the step.

Every checkpoint carries the model spec and the SentencePiece model, so
:func:`~mdarts.checkpoint.load_model` needs nothing else.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .batching import TokenBatches, warn_dropped
from .checkpoint import (
    TRAIN_KIND,
    check_state_dict,
    load_checkpoint,
    model_spec,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
    write_average_checkpoint,
)
from .config import TrainConfig
from .loss import sequence_loss
from .memory import peak_memory
from .prepare import PreparedData
from .progress import Progress
from .reduction import BucketedReduce
from .runs import (
    SIGNAL_NAMES,
    JsonLog,
    PathLike,
    Ranks,
    RunClock,
    RunDirectory,
    StopSignals,
    check_resume,
    check_same_data,
    evaluate_loss,
    seed_everything,
    spent_budget,
    warn_if_slow_bf16,
    write_atomic,
)

__all__ = ["Trainer", "TrainConfig", "plot_curves", "read_log", "LOG_FILE", "LAST_FILE", "BEST_FILE", "CURVES_FILE"]

LOG_FILE, CURVES_FILE, LAST_FILE, BEST_FILE, _ = RUN_FILES = RunDirectory.KINDS["training"][1]


def read_log(out_dir: PathLike) -> list[dict[str, Any]]:
    """The records of a training run's ``log.jsonl`` (empty when there is none)."""
    return JsonLog(Path(out_dir) / LOG_FILE).read()


def plot_curves(out_dir: PathLike) -> Path:
    """Write ``curves.png``: training and validation loss (and validation BLEU, on a second
    axis, when logged) against the update step, from ``log.jsonl``; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_log(out_dir)
    train = [e for e in entries if e["event"] == "train"]
    valid = [e for e in entries if e["event"] == "valid"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss", lw=1)
    axis.plot([e["step"] for e in valid], [e["loss"] for e in valid], "o-", label="valid loss", ms=3)
    axis.set_xlabel("update step")
    axis.set_ylabel("label-smoothed cross-entropy (nats/token)")
    handles, labels = axis.get_legend_handles_labels()
    bleu = [e for e in valid if e.get("bleu") is not None]
    if bleu:
        right = axis.twinx()
        right.plot(
            [e["step"] for e in bleu], [e["bleu"] for e in bleu], "s--", color="tab:green", label="valid BLEU", ms=3
        )
        right.set_ylabel("BLEU")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    axis.legend(handles, labels, loc="upper right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    return write_atomic(Path(out_dir) / CURVES_FILE, image.getvalue())


class Trainer:
    """Trains ``model`` on ``data["train"]``, validating on ``data["val"]``, into ``out_dir``.

    Args:
        model: a freshly initialised model that :func:`~mdarts.checkpoint.model_spec` knows
            (build it after :func:`~mdarts.runs.seed_everything`, so that the seed decides its
            initialisation); with ``resume`` its weights are replaced by the checkpoint's.
            Its spec, padding id and longest sequence are read from it.
        data: the tokenizer (stored in every checkpoint) and the encoded splits.
        config: the training settings.
        out_dir: the run directory (created when missing).
        validate_bleu: optional ``model -> BLEU`` called at each validation (in eval mode,
            without gradients); its value is logged but does not choose the best checkpoint.
        resume: continue the run in ``out_dir`` from ``checkpoint_last.pt``; settings that
            shape the trajectory must be the same (budgets, intervals and patience may change).
        overwrite: start afresh in a directory that holds a run, deleting its files (only
            once everything else has been checked).
        progress: show the progress bar (None: when stderr is a terminal).

    Raises FileExistsError when a fresh run meets a directory that holds a run,
    FileNotFoundError when ``resume`` finds no ``checkpoint_last.pt``, and ValueError for a
    corrupt checkpoint, other trajectory settings or another model.
    """

    def __init__(
        self,
        model: nn.Module,
        data: PreparedData,
        config: TrainConfig,
        out_dir: PathLike,
        *,
        validate_bleu: Optional[Callable[[nn.Module], float]] = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: Optional[bool] = None,
    ) -> None:
        self.run_dir = RunDirectory(out_dir, "training")
        self.run_dir.check(resume, overwrite)
        self.config = config
        self.ranks = Ranks.from_environment(config.device)
        self.device = self.ranks.device(config.device)
        warn_if_slow_bf16(config.bf16, self.device)
        self.spec = model_spec(model)
        self.pad_id = model.config.pad_id
        self.tokenizer_bytes = data.tokenizer.to_bytes()
        self.data_identity = data.identity()
        self.validate_bleu = validate_bleu
        self.show_progress = progress
        self.model = model.to(self.device)
        limits = dict(max_positions=model.config.max_positions, pad_id=self.pad_id)
        warn_dropped(data, limits["max_positions"], "training")  # pairs too long for the model: left out
        self.train_batches = TokenBatches(
            *_ids(data, "train"), config.max_tokens, seed=config.seed, shuffle=True, **limits
        )
        if len(self.train_batches) == 0:
            raise ValueError(
                f"--max-tokens: no training pair fits max_tokens={config.max_tokens} "
                f"and max_positions={limits['max_positions']}"
            )
        self.batches_per_step = self.ranks.world_size * config.update_freq
        if len(self.train_batches) < self.batches_per_step:
            raise ValueError(
                f"--max-tokens: the training data makes {len(self.train_batches)} batch(es), fewer than the "
                f"{self.batches_per_step} of a step ({self.ranks.world_size} processes x --update-freq "
                f"{config.update_freq})"
            )
        self.ranks.check_same({**config.to_dict(), "device": None, "model": self.spec, "data": self.data_identity})
        self.valid_batches = TokenBatches(*_ids(data, "val"), config.max_tokens, shuffle=False, **limits)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.reduce = BucketedReduce(list(self.model.parameters()), self.ranks)
        self.log = JsonLog(self.run_dir / LOG_FILE, writes=self.ranks.main)
        # training state: updates done, epoch, batches of that epoch done, early stopping
        self.step = self.epoch = self.position = 0
        self.best_loss = math.inf
        self.bad_validations = 0
        self.validated_step = -1  # checkpoints are written right after a validation
        self.window = _Window()
        self.clock = RunClock()
        self.signals = StopSignals()
        if resume:
            self._resume()
        else:
            if self.ranks.main:
                self.run_dir.claim(resume=False, overwrite=overwrite)
            seed_everything(config.seed)
        self.ranks.barrier()  # the others read the run directory once rank 0 has claimed it

    def _resume(self) -> None:
        """Load the training state of ``checkpoint_last.pt`` and cut the log back to it."""
        path = self.run_dir.checkpoint
        state = load_checkpoint(path, TRAIN_KIND)
        check_same_data(state.get("data"), self.data_identity, path)
        if state["spec"] != self.spec:
            raise ValueError(
                f"cannot resume from {path}: it trained another model (spec {state['spec']} vs {self.spec})"
            )
        check_resume(TrainConfig.from_dict(state["train_config"]), self.config, path)
        check_state_dict(self.model, state["model"], f"checkpoint {path}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best_loss, self.bad_validations = state["best_loss"], state["bad_validations"]
        self.window = _Window(**state.get("window", {}))
        self.clock = RunClock(state.get("train_seconds", 0.0))
        self.validated_step = self.step
        set_rng_state(state["rng"])
        if self.ranks.main:
            self.run_dir.claim(resume=True, overwrite=False)  # removes what a killed write left
        self.log.truncate(self.step)

    def run(self) -> dict[str, Any]:
        """Train until a budget ends or early stopping; validate and checkpoint every
        ``valid_interval`` updates and at the end; write ``curves.png`` and, with
        ``keep_last`` > 1, ``checkpoint_avg.pt``. Returns a summary: steps, epochs,
        stopped_by ("max_steps", "max_epochs", "max_minutes", "patience", or "SIGINT" /
        "SIGTERM": then only ``checkpoint_last.pt`` is written, at once, and the rest is left
        to the resumed run), best / last validation loss, wall_s, tokens_per_s,
        peak_memory_bytes, parameters and the checkpoint paths."""
        self.clock = RunClock(self.clock.seconds())
        started = time.perf_counter()
        shown = self.show_progress if self.ranks.main else False
        progress = Progress(self.config.max_steps, "train", self.device, initial=self.step, enabled=shown)
        self.model.train()
        stopped_by = self._stop_reason()
        with StopSignals() as self.signals:
            try:
                while stopped_by is None:
                    stopped_by = self._train_epoch(progress)
            finally:
                progress.close()
            if stopped_by in SIGNAL_NAMES:
                if self.ranks.main:
                    save_checkpoint(self.run_dir / LAST_FILE, self._payload())
                return {"steps": self.step, "epochs": self.epoch, "stopped_by": stopped_by}
        if self.validated_step != self.step:
            self._validate_and_save()  # the checkpoint keeps the open window, which a resume continues
        if self.window.steps:
            self._log_window(progress, partial=True)
        if not self.ranks.main:
            return {"steps": self.step, "epochs": self.epoch, "stopped_by": stopped_by}
        average = (
            write_average_checkpoint(self.run_dir.path, self.config.keep_last) if self.config.keep_last > 1 else None
        )
        plot_curves(self.run_dir.path)
        return {
            "steps": self.step,
            "epochs": self.epoch,
            "stopped_by": stopped_by,
            "best_valid_loss": self.best_loss,
            "last_valid": self.log.read("valid")[-1],
            "wall_s": time.perf_counter() - started,
            "tokens_per_s": progress.tokens_per_second(),
            "peak_memory_bytes": peak_memory(self.device),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "checkpoint_last": str(self.run_dir / LAST_FILE),
            "checkpoint_best": str(self.run_dir / BEST_FILE),
            "checkpoint_avg": None if average is None else str(average),
        }

    def _train_epoch(self, progress: Progress) -> Optional[str]:
        """Train from the current position to the end of the epoch, or until a budget ends or
        early stopping; returns why training stops (None: go on with the next epoch)."""
        config, world = self.config, self.ranks.world_size
        self.train_batches.set_epoch(self.epoch)
        while self.position + self.batches_per_step <= len(self.train_batches):  # each process its batches
            mine = range(self.position + self.ranks.rank, self.position + self.batches_per_step, world)
            loss, nll, tokens, grad_norm = self._train_step([self.train_batches[i] for i in mine])
            self.position += self.batches_per_step
            self.window.add(loss, nll, tokens, grad_norm)
            progress.update(tokens, loss / tokens, config.learning_rate(self.step), epoch=str(self.epoch))
            if self.step % config.log_interval == 0:
                self._log_window(progress)
            if self.step % config.valid_interval == 0:
                self._validate_and_save()
            stopped_by = self._stop_reason()
            if stopped_by is not None:
                return stopped_by
        self.epoch += 1
        self.position = 0
        return self._stop_reason()

    def _stop_reason(self) -> Optional[str]:
        """Why training stops now (None: it goes on), decided for all processes at once: a
        signal to any of them, or a reason seen by any (rank 0 keeps the early-stopping count)."""
        config = self.config
        reason = spent_budget(self.step, config.max_steps, self.clock, config.max_minutes)
        if reason is None and config.max_epochs is not None and self.epoch >= config.max_epochs:
            reason = "max_epochs"
        if reason is None and config.patience and self.bad_validations >= config.patience:
            reason = "patience"
        signalled, stopping = self.ranks.sum([float(bool(self.signals.requested)), float(reason is not None)])
        if signalled:
            return self.signals.requested or "SIGTERM"  # another process was signalled
        return reason or ("another process" if stopping else None)

    def _train_step(self, batches: list) -> tuple[float, float, int, float]:
        """One update on ``batches`` (this process's share of the step, update_freq batches):
        (summed loss, summed NLL, target tokens, all over the processes, and the gradient norm
        before clipping)."""
        config = self.config
        self.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate(self.step)
        (all_tokens,) = self.ranks.sum([float(sum(int(b.tgt_out.ne(self.pad_id).sum()) for b in batches))])
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = nll_sum = 0.0
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            loss, nll, _ = sequence_loss(
                self.model,
                batch.src,
                batch.tgt_in,
                batch.tgt_out,
                config.label_smoothing,
                config.loss_chunk_rows,
                config.bf16,
            )
            loss_sum, nll_sum = loss_sum + float(loss.detach()), nll_sum + float(nll.detach())
            if i == len(batches) - 1:  # the gradients are summed over the processes once, in the last backward
                self.reduce.start()
            (loss / all_tokens).backward()  # over the step's tokens in all processes: the whole step's gradient
        self.reduce.finish()
        loss_sum, nll_sum = self.ranks.sum([loss_sum, nll_sum])
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if config.clip_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, config.clip_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
        self.optimizer.step()
        return loss_sum, nll_sum, int(all_tokens), grad_norm

    def _log_window(self, progress: Progress, partial: bool = False) -> None:
        """Log the training summary of the updates since the last line (``partial``: a window
        cut short by the end of the run)."""
        extra = {"partial": True} if partial else {}
        self.log.append(
            "train",
            self.step,
            epoch=self.epoch,
            lr=self.config.learning_rate(self.step),
            **self.window.flush(),
            tokens_per_s=progress.tokens_per_second(),
            **extra,
        )

    def _validate_and_save(self) -> None:
        """Validation loss (and BLEU), log line, early-stopping bookkeeping, checkpoints: on
        rank 0 only (the others go on to the next step, which waits for it)."""
        self.validated_step = self.step
        if not self.ranks.main:
            return
        config = self.config
        result = evaluate_loss(
            self.model, self.valid_batches, self.pad_id, config.label_smoothing, self.device, config.bf16
        )
        if self.validate_bleu is not None:
            self.model.eval()
            with torch.no_grad():
                result["bleu"] = float(self.validate_bleu(self.model))
            self.model.train()
        improved = result["loss"] < self.best_loss
        if improved:
            self.best_loss, self.bad_validations = result["loss"], 0
        else:
            self.bad_validations += 1
        self.log.append(
            "valid",
            self.step,
            epoch=self.epoch,
            **result,
            best_loss=self.best_loss,
            bad_validations=self.bad_validations,
        )
        payload = self._payload()
        save_checkpoint(self.run_dir / LAST_FILE, payload)
        if improved:
            save_checkpoint(self.run_dir / BEST_FILE, payload)
        if config.keep_last:
            save_checkpoint(self.run_dir / f"checkpoint_step{self.step}.pt", payload)
            for old in step_checkpoints(self.run_dir.path)[: -config.keep_last]:
                old.unlink()
        plot_curves(self.run_dir.path)

    def _payload(self) -> dict[str, Any]:
        """Everything an exact resume and :func:`~mdarts.checkpoint.load_model` need."""
        return {
            "kind": TRAIN_KIND,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "rng": rng_state(),
            "best_loss": self.best_loss,
            "bad_validations": self.bad_validations,
            "window": self.window.state(),
            "train_seconds": self.clock.seconds(),
            "train_config": self.config.to_dict(),
            "spec": self.spec,
            "tokenizer": self.tokenizer_bytes,
            "data": self.data_identity,
        }


def _ids(data: PreparedData, split: str) -> tuple[list[list[int]], list[list[int]]]:
    encoded = data[split]
    return encoded.src_ids, encoded.tgt_ids


class _Window:
    """Sums over the updates since the last training log line (kept in checkpoints, so a
    resumed run logs the same lines as one that never stopped)."""

    def __init__(
        self, loss: float = 0.0, nll: float = 0.0, grad_norm: float = 0.0, tokens: int = 0, steps: int = 0
    ) -> None:
        self.loss, self.nll, self.grad_norm, self.tokens, self.steps = loss, nll, grad_norm, tokens, steps

    def state(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "nll": self.nll,
            "grad_norm": self.grad_norm,
            "tokens": self.tokens,
            "steps": self.steps,
        }

    def add(self, loss: float, nll: float, tokens: int, grad_norm: float) -> None:
        self.loss += loss
        self.nll += nll
        self.tokens += tokens
        self.grad_norm += grad_norm
        self.steps += 1

    def flush(self) -> dict[str, float]:
        """Token-weighted mean loss and NLL, perplexity, mean gradient norm, tokens; then reset."""
        summary = {
            "loss": self.loss / self.tokens,
            "nll": self.nll / self.tokens,
            "ppl": math.exp(self.nll / self.tokens),
            "grad_norm": self.grad_norm / self.steps,
            "tokens": self.tokens,
        }
        self.__init__()
        return summary

"""Training of a derived network or a baseline: the engine behind ``mdarts train``.

Label-smoothed cross-entropy, Adam with an inverse-sqrt warm-up schedule, gradient-norm
clipping, optional bf16 autocast, validation loss (and BLEU through a callback) at an
interval, early stopping, checkpoints written atomically and an exact resume: a run stopped
at a checkpoint and resumed logs the same losses and ends with the same parameters as one
that was never interrupted. The run machinery (seeding, device, schedule, logs, run
directory, resume policy) is :mod:`mdarts.runloop`; the settings are
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

import contextlib
import io
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .batching import TokenBatches, validation_batches, warn_dropped
from .checkpoint import (
    TRAIN_KIND,
    DamagedCheckpoint,
    check_state_dict,
    load_resumable,
    model_spec,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
    verify_checkpoint,
    write_average_checkpoint,
)
from .config import TrainConfig
from .files import JsonLog, PathLike, RunDirectory, write_atomic
from .loss import evaluate_loss, sequence_loss
from .memory import peak_memory
from .prepare import PreparedData
from .progress import Progress
from .reduction import BucketedReduce
from .runloop import (
    BatchStream,
    RunClock,
    RunLoop,
    RunResult,
    batch_randomness,
    check_resume,
    check_same_data,
    spent_budget,
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


class Trainer(RunLoop):
    """Trains the model ``build()`` makes on ``data["train"]``, validating on ``data["val"]``,
    into ``out_dir``.

    Args:
        build: makes a freshly initialised model that :func:`~mdarts.checkpoint.model_spec`
            knows, e.g. ``lambda: DerivedNet(genotype, config, vocab)``; it is called once the
            run is seeded with ``settings.seed`` (so that the seed decides the initialisation),
            and the run seeds again after it. With ``resume`` the weights are replaced by the
            checkpoint's. Its spec, padding id and longest sequence are read from it.
        data: the tokenizer (stored in every checkpoint) and the encoded splits.
        settings: the training settings (``self.settings``; ``self.model.config`` is the model's).
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

    kind, label = "training", "train"
    reseed_after_build = True

    def __init__(
        self,
        build: Callable[[], nn.Module],
        data: PreparedData,
        settings: TrainConfig,
        out_dir: PathLike,
        *,
        validate_bleu: Optional[Callable[[nn.Module], float]] = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: Optional[bool] = None,
    ) -> None:
        if isinstance(build, nn.Module) or not callable(build):
            raise TypeError("Trainer: give a function that builds the model (the run seeds it first), not a model")
        super().__init__(out_dir, settings, resume=resume, overwrite=overwrite, progress=progress)
        self.tokenizer_bytes = data.tokenizer.to_bytes()
        self.data_identity = data.identity()
        self.validate_bleu = validate_bleu
        self.model = self.build(build)
        self.spec = model_spec(self.model)
        self.pad_id = self.model.config.pad_id
        limits = dict(max_positions=self.model.config.max_positions, pad_id=self.pad_id)
        warn_dropped(data, limits["max_positions"], "training")  # pairs too long for the model: left out
        train = data["train"]
        self.stream = BatchStream(
            train.src_ids,
            train.tgt_ids,
            settings.max_tokens,
            settings.seed,
            name="training",
            ranks=self.ranks,
            per_process=settings.update_freq,
            **limits,
        )
        self.ranks.check_same({**settings.to_dict(), "device": None, "model": self.spec, "data": self.data_identity})
        val = data["val"]
        self.valid_batches = validation_batches(val, settings.max_tokens, **limits)  # refused now if it makes none
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
        self.reduce = BucketedReduce(list(self.model.parameters()), self.ranks)
        self.step_count = 0
        self.best_loss = math.inf
        self.bad_validations = 0
        self.validated_step = -1  # checkpoints are written right after a validation
        self.window = _Window()
        self.log = self.open_log("log", LOG_FILE)
        checkpoint = self._checked_checkpoint() if resume else None
        if checkpoint is not None:
            self._resume(checkpoint)
        self.claim(resume, overwrite)  # every check is done: from here on the run writes
        if checkpoint is not None:
            self.rewind(checkpoint["log_bytes"])

    # the position in the training data, as the checkpoints and tests name it
    @property
    def steps(self) -> int:
        return self.step_count

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def position(self) -> int:
        return self.stream.position

    @property
    def train_batches(self) -> TokenBatches:
        return self.stream.batches

    def _checked_checkpoint(self) -> dict[str, Any]:
        """``checkpoint_last.pt``, checked to continue this run (data, model, settings)."""
        path, steps = self.run_dir.checkpoint, step_checkpoints(self.run_dir.path)
        state = load_resumable(path, TRAIN_KIND, [*steps, self.run_dir / BEST_FILE])
        if self.settings.keep_last > 1:  # the run averages them at its end
            for step_file in steps:
                try:
                    verify_checkpoint(step_file)
                except DamagedCheckpoint as error:
                    advice = f"the run would average it at its end: remove it (rm {step_file}) and resume again"
                    raise DamagedCheckpoint(step_file, error.reason, advice) from None
        check_same_data(state.get("data"), self.data_identity, path)
        if state["spec"] != self.spec:
            raise ValueError(
                f"cannot resume from {path}: it trained another model (spec {state['spec']} vs {self.spec})"
            )
        check_resume(TrainConfig.from_dict(state["train_config"]), self.settings, path)
        check_state_dict(self.model, state["model"], f"checkpoint {path}")
        return state

    def _resume(self, state: dict[str, Any]) -> None:
        """Load the training state of ``checkpoint_last.pt`` (the log is cut back to it once the
        directory is claimed)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step"]
        self.stream.load_state({"epoch": state["epoch"], "position": state["position"]})
        self.best_loss, self.bad_validations = state["best_loss"], state["bad_validations"]
        self.window = _Window(**state["window"])
        self.clock = RunClock(state["train_seconds"])
        self.validated_step = self.step_count
        set_rng_state(state["rng"])

    def budget_reason(self) -> Optional[str]:
        """A spent budget (steps, epochs, minutes) or early stopping (rank 0 keeps its count)."""
        settings = self.settings
        reason = spent_budget(self.step_count, settings.max_steps, self.clock, settings.max_minutes)
        if reason is None and settings.max_epochs is not None and self.epoch >= settings.max_epochs:
            reason = "max_epochs"
        if reason is None and settings.patience and self.bad_validations >= settings.patience:
            reason = "patience"
        return reason

    def take_step(self, bar: Progress) -> None:
        """One update on this process's batches of the step, logged every ``log_interval``,
        validated and checkpointed every ``valid_interval`` updates."""
        settings = self.settings
        self.model.train()
        loss, nll, tokens, grad_norm = self._train_step(self.stream.take())
        self.window.add(loss, nll, tokens, grad_norm)
        bar.update(tokens, loss / tokens, settings.learning_rate(self.step_count), epoch=str(self.epoch))
        if self.step_count % settings.log_interval == 0:
            self._log_window(bar)
        if self.step_count % settings.valid_interval == 0:
            self._validate_and_save()

    def save(self) -> None:
        """``checkpoint_last.pt`` (rank 0)."""
        if self.ranks.main:
            save_checkpoint(self.run_dir / LAST_FILE, self._payload())

    def stopped(self, stopped_by: str) -> RunResult:
        return RunResult(
            self.step_count, stopped_by, self.run_dir.path, peak_memory(self.device), details={"epochs": self.epoch}
        )

    def finish(self, stopped_by: str, bar: Progress) -> RunResult:
        """Validate and checkpoint the last step (unless just done), log the open window, write
        ``curves.png`` and, with ``keep_last`` > 1, ``checkpoint_avg.pt``. The result's details:
        epochs, best_valid_loss, last_valid (the last validation record), wall_s, parameters
        and the checkpoint paths (rank 0; the other processes' hold the epochs only)."""
        if self.validated_step != self.step_count:
            self._validate_and_save()  # the checkpoint keeps the open window, which a resume continues
        if self.window.steps:
            self._log_window(bar, partial=True)
        result = self.stopped(stopped_by)
        result.tokens_per_s = bar.tokens_per_second()
        if not self.ranks.main:
            return result
        keep = self.settings.keep_last
        average = write_average_checkpoint(self.run_dir.path, keep) if keep > 1 else None
        plot_curves(self.run_dir.path)
        last = self.log.read("valid")[-1]
        result.val_loss = last["loss"]
        result.details.update(
            best_valid_loss=self.best_loss,
            last_valid=last,
            wall_s=self.clock.seconds() - self.clock.before,
            parameters=sum(p.numel() for p in self.model.parameters()),
            checkpoint_last=str(self.run_dir / LAST_FILE),
            checkpoint_best=str(self.run_dir / BEST_FILE),
            checkpoint_avg=None if average is None else str(average),
        )
        return result

    def _train_step(self, batches: list) -> tuple[float, float, int, float]:
        """One update on ``batches`` (this process's share of the step, update_freq batches):
        (summed loss, summed NLL, target tokens, all over the processes, and the gradient norm
        before clipping)."""
        settings = self.settings
        self.step_count += 1
        for group in self.optimizer.param_groups:
            group["lr"] = settings.learning_rate(self.step_count)
        (all_tokens,) = self.ranks.sum([float(sum(int(b.tgt_out.ne(self.pad_id).sum()) for b in batches))])
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = nll_sum = 0.0
        shared = self.ranks.world_size * len(batches) > 1
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            # a step of several batches: each batch's dropout masks depend on its place in the step,
            # not on the process layout; a step of one batch draws from the run's stream (as runs
            # made before this rule did, so that they are reproduced)
            randomness = batch_randomness(settings.seed, self.step_count, self.stream.index(i), self.device)
            with randomness if shared else contextlib.nullcontext():
                loss, nll, _ = sequence_loss(
                    self.model,
                    batch.src,
                    batch.tgt_in,
                    batch.tgt_out,
                    settings.label_smoothing,
                    settings.loss_chunk_rows,
                    settings.bf16,
                )
                loss_sum, nll_sum = loss_sum + float(loss.detach()), nll_sum + float(nll.detach())
                if i == len(batches) - 1:  # the gradients are summed over the processes once, in the last backward
                    self.reduce.start()
                (loss / all_tokens).backward()  # over the step's tokens in all processes: the whole step's gradient
        self.reduce.finish()
        loss_sum, nll_sum = self.ranks.sum([loss_sum, nll_sum])
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if settings.clip_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, settings.clip_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
        self.optimizer.step()
        return loss_sum, nll_sum, int(all_tokens), grad_norm

    def _log_window(self, bar: Progress, partial: bool = False) -> None:
        """Log the training summary of the updates since the last line (``partial``: a window
        cut short by the end of the run)."""
        extra = {"partial": True} if partial else {}
        self.log.append(
            "train",
            self.step_count,
            epoch=self.epoch,
            lr=self.settings.learning_rate(self.step_count),
            **self.window.flush(),
            tokens_per_s=bar.tokens_per_second(),
            **extra,
        )

    def _validate_and_save(self) -> None:
        """Validation loss (and BLEU), log line, early-stopping bookkeeping, checkpoints: on
        rank 0 only (the others go on to the next step, which waits for it)."""
        self.validated_step = self.step_count
        if not self.ranks.main:
            return
        settings = self.settings
        result = evaluate_loss(
            self.model, self.valid_batches, self.pad_id, settings.label_smoothing, self.device, settings.bf16
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
            self.step_count,
            epoch=self.epoch,
            **result,
            best_loss=self.best_loss,
            bad_validations=self.bad_validations,
        )
        payload = self._payload()
        save_checkpoint(self.run_dir / LAST_FILE, payload)
        if improved:
            save_checkpoint(self.run_dir / BEST_FILE, payload)
        if settings.keep_last:
            save_checkpoint(self.run_dir / f"checkpoint_step{self.step_count}.pt", payload)
            for old in step_checkpoints(self.run_dir.path)[: -settings.keep_last]:
                old.unlink()
        plot_curves(self.run_dir.path)

    def _payload(self) -> dict[str, Any]:
        """Everything an exact resume and :func:`~mdarts.checkpoint.load_model` need."""
        return {
            "kind": TRAIN_KIND,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "epoch": self.epoch,
            "position": self.position,
            "log_bytes": self.log_sizes(),
            "rng": rng_state(),
            "best_loss": self.best_loss,
            "bad_validations": self.bad_validations,
            "window": self.window.state(),
            "train_seconds": self.clock.seconds(),
            "train_config": self.settings.to_dict(),
            "spec": self.spec,
            "tokenizer": self.tokenizer_bytes,
            "data": self.data_identity,
        }


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

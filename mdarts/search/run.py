"""The run of a search (docs/design.md 1.1): the engine behind ``mdarts search``.

:class:`Searcher` trains a :class:`~mdarts.model.Supernet` with a supernet method on a training
corpus split into two disjoint parts (the weights on the first, ``split_ratio`` of the pairs;
the architecture logits, if the method trains them, on the rest), then chooses the genotype
with a selector (:mod:`mdarts.search.parts`). It knows neither part: it plans the budget,
draws the batches, evaluates, logs, checkpoints and resumes, on the run loop it shares with
:class:`~mdarts.train.Trainer` (:class:`mdarts.runloop.RunLoop`).

A run directory receives, at every evaluation of a method that trains alpha: ``genotype.json``
(the argmax genotype while the search runs), one line of ``alpha_history.jsonl``,
``alpha_heatmap.png``; at the end, whatever the method, ``genotype.json`` holds the selector's
choice. Every step, evaluation and scored genotype is a JSON line of
``search_log.jsonl``; ``search_checkpoint.pt`` every ``checkpoint_interval`` steps and at the
end, from which ``resume=True`` continues exactly (same losses and alphas as a run that was
never interrupted).
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from typing import Any, Optional

import torch

from ..batching import Batch, validation_batches, warn_dropped
from ..checkpoint import load_resumable, rng_state, save_checkpoint, set_rng_state
from ..config import ModelConfig, SearchSettings, Settings
from ..files import PathLike, RunDirectory
from ..genotype import Genotype
from ..loss import evaluate_loss
from ..memory import peak_memory
from ..model import Supernet, iter_nodes
from ..ops import parameter_free_ops
from ..plan import choose_memory_mode, default_memory_budget
from ..prepare import EncodedSplit, PreparedData
from ..progress import Progress
from ..runloop import BatchStream, RunClock, RunLoop, RunResult, check_resume, check_same_data, spent_budget
from .parts import METHODS, SELECTORS, SelectionContext, SupernetMethod, check_parts
from .reporting import argmax_ops, argmax_stability, collapse_message, plot_alpha_history, short_summary
from .weights import Schedule

CHECKPOINT_FILE, GENOTYPE_FILE, HISTORY_FILE, HEATMAP_FILE, LOG_FILE = RUN_FILES = RunDirectory.KINDS["search"][1]
CALIBRATION_STEPS = 5  # steps timed before a minutes budget is planned in steps, and again when the step cost changes


# ----------------------------------------------------------------------------- data


def split_corpus(num_pairs: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint index lists (theta part, alpha part) covering range(num_pairs), drawn from ``seed``.

    The theta part holds round(ratio * num_pairs) pairs; each part holds at least one."""
    if num_pairs < 2:
        raise ValueError(
            f"the training split has {num_pairs} pair(s); the search needs at least 2 (theta and alpha parts)"
        )
    order = list(range(num_pairs))
    random.Random(f"{seed}:theta-alpha-split").shuffle(order)
    cut = min(max(round(ratio * num_pairs), 1), num_pairs - 1)
    return sorted(order[:cut]), sorted(order[cut:])


# ----------------------------------------------------------------------------- the run


def searched_space(config: ModelConfig, parameter_free: bool) -> ModelConfig:
    """``config`` with the candidates a search uses: without zero and identity unless
    ``parameter_free`` (see ``SearchSettings.parameter_free``)."""
    if parameter_free:
        return config
    free = parameter_free_ops()
    return config.replace(
        encoder_candidates=tuple(op for op in config.encoder_candidates if op not in free),
        decoder_candidates=tuple(op for op in config.decoder_candidates if op not in free),
    )


def part_settings(registry, name: str, given: Optional[Settings]) -> Settings:
    """The settings of part ``name`` of ``registry``: ``given`` (which must be of that part's
    settings class) or the defaults."""
    cls = registry[name].Settings
    if given is None:
        return cls()
    if not isinstance(given, cls):
        raise ValueError(f"{registry.option} {name}: expected {cls.__name__}, got {type(given).__name__}")
    return given


class Searcher(RunLoop):
    """Searches an architecture on ``data["train"]`` into ``out_dir``: the supernet method
    ``settings.method`` trains the supernet, the selector ``settings.select`` chooses the genotype.

    Args:
        config: the supernet. Its ``memory_mode`` "auto" becomes the fastest mode predicted to
            fit ``settings.memory_budget_gb``; unless ``settings.parameter_free``, zero and
            identity leave the candidates. ``self.config`` is the supernet searched.
        data: the tokenizer and encoded splits; "train" is required, "val" (optional) is
            scored at every evaluation.
        settings: budget, weight optimiser, batches, reporting and the parts' names, see
            :class:`~mdarts.config.SearchSettings`.
        out_dir: the run directory (created). One holding another run is refused
            (FileExistsError) unless ``resume`` (continue from its checkpoint, exactly) or
            ``overwrite`` (delete that run's files, once every setting has been checked).
        method, selector: the settings of the method and of the selector (their defaults when None).
        progress: show the progress bar (None: when stderr is a terminal).
    """

    kind = label = "search"

    def __init__(
        self,
        config: ModelConfig,
        data: PreparedData,
        settings: SearchSettings,
        out_dir: PathLike,
        *,
        method: Optional[Settings] = None,
        selector: Optional[Settings] = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: Optional[bool] = None,
    ) -> None:
        super().__init__(out_dir, settings, resume=resume, overwrite=overwrite, progress=progress)
        self.method_settings = part_settings(METHODS, settings.method, method)
        self.select_settings = part_settings(SELECTORS, settings.select, selector)
        check_parts(settings.method, settings.select, "val" in data.splits)
        self.data = data
        self.data_identity = data.identity()  # recorded in every checkpoint, checked on resume
        checkpoint = load_resumable(self.run_dir.checkpoint, "search", []) if resume else None
        self.config, self.memory_reason = self._searched_config(config, checkpoint)
        if checkpoint is not None:
            self._check_resumable(checkpoint)
        self._make_batches(data)
        self.ranks.check_same(
            {
                **settings.to_dict(),
                "device": None,
                "method_settings": self.method_settings.to_dict(),
                "config": self.config.to_dict(),
                "data": self.data_identity,
            }
        )
        self.model = self.build(self._supernet)
        self.method: SupernetMethod = METHODS[settings.method](self.model, settings, self.method_settings, self.ranks)
        self.log = self.open_log("log", LOG_FILE)
        self.history = self.open_log("history", HISTORY_FILE)
        self.refit_due: Optional[tuple[int, float]] = None  # a minutes budget: (step, clock) of the next re-plan
        self.recent_losses: list[float] = []  # theta losses since the last evaluation
        self.last_ops: Optional[list[str]] = None
        self.stable_evals = 0  # evaluations of the alpha phase in a row with the same genotype
        self.last_eval_step = -1
        self.val_loss: Optional[float] = None
        self.val_step = -1  # the step of val_loss
        if checkpoint is not None:
            self._restore(checkpoint)
        self.claim(resume, overwrite)  # every check is done: from here on the run writes
        if checkpoint is not None:
            self._resume(checkpoint)
        else:
            self._log_start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def steps(self) -> int:
        return self.method.steps

    def _supernet(self) -> Supernet:
        model = Supernet(self.config, self.data.tokenizer.vocab_size)
        if self.settings.affine_free:
            for node in iter_nodes(model):
                if node.parametric:
                    node.ln_weight.requires_grad_(False)
                    node.ln_bias.requires_grad_(False)
        return model

    def _log_start(self) -> None:
        self.log.append(
            "start",
            0,
            settings=self.settings.to_dict(),
            method_settings=self.method_settings.to_dict(),
            select_settings=self.select_settings.to_dict(),
            config=self.config.to_dict(),
            memory_mode=self.memory_reason,
            schedule=dataclasses.asdict(self.method.schedule),
            **{f"{name}_pairs": len(stream.batches.kept) for name, stream in self.streams.items()},
            parameters=self.model.num_parameters(),
            device=str(self.device),
        )

    def _searched_config(self, config: ModelConfig, checkpoint: Optional[dict]) -> tuple[ModelConfig, str]:
        """The supernet searched (zero dropped if asked, memory mode resolved) and why that mode."""
        settings = self.settings
        config = searched_space(config, settings.parameter_free)
        if config.memory_mode != "auto":
            return config, f"{config.memory_mode}: as asked"
        if checkpoint is not None:
            mode = checkpoint["config"]["memory_mode"]
            return config.replace(memory_mode=mode), f"{mode}: chosen when the run started"
        budget = (
            int(settings.memory_budget_gb * 2**30) if settings.memory_budget_gb else default_memory_budget(self.device)
        )
        mode, reason = choose_memory_mode(
            config,
            self.data.tokenizer.vocab_size,
            settings.max_tokens,
            self.device,
            budget,
            2 if settings.bf16 else 4,
            settings.loss_chunk_rows,
        )
        return config.replace(memory_mode=mode), reason

    def _plan_minutes(self) -> None:
        """A minutes budget: after CALIBRATION_STEPS steps, plan the step budget that fits (the
        method knows what its later steps cost) and log it."""
        per_step = self._mean_seconds() / self.steps
        steps = self.method.steps_for(60.0 * self.settings.max_minutes, per_step)
        self.method.reschedule(self.method.plan(max(steps, self.steps + 1)))
        self.log.append("schedule", self.steps, seconds_per_step=per_step, **dataclasses.asdict(self.method.schedule))

    def _mean_seconds(self) -> float:
        """The run's seconds so far, averaged over the processes, so that they all plan alike."""
        return self.ranks.sum([self.clock.seconds()])[0] / self.ranks.world_size

    def _refit(self, started: float) -> None:
        """A minutes budget, CALIBRATION_STEPS after the step cost changed (the clock said
        ``started`` seconds CALIBRATION_STEPS ago): fit the rest to the time left."""
        now = self._mean_seconds()
        per_step = (now - started) / CALIBRATION_STEPS
        self.method.refit(per_step, 60.0 * self.settings.max_minutes - now)
        self.log.append("schedule", self.steps, seconds_per_step=per_step, **dataclasses.asdict(self.method.schedule))

    def _make_batches(self, data: PreparedData) -> None:
        """The batch streams of the method's data parts (disjoint parts of the training data,
        sharded by rank) and the validation batches (None without validation data)."""
        settings, config, train = self.settings, self.config, data["train"]
        warn_dropped(data, config.max_positions, "search")  # pairs too long for the supernet: left out
        indices = dict(zip(("theta", "alpha"), split_corpus(len(train), settings.split_ratio, settings.seed)))
        offsets = {"theta": 0, "alpha": 1}  # each part's batch order: a stream of its own
        self.streams = {
            name: BatchStream(
                [train.src_ids[i] for i in indices[name]],
                [train.tgt_ids[i] for i in indices[name]],
                settings.max_tokens,
                settings.seed + offsets[name],
                max_positions=config.max_positions,
                pad_id=config.pad_id,
                name=name,
                ranks=self.ranks,
            )
            for name in METHODS[settings.method].parts
        }
        self.valid_batches = None
        if "val" in data.splits:
            val = data["val"]
            self.valid_batches = validation_batches(val, settings.max_tokens, config.max_positions, config.pad_id)

    def _check_resumable(self, checkpoint: dict) -> None:
        """A resume must use the checkpoint's config, tokenizer and settings (budgets may change)."""
        path = self.run_dir.checkpoint
        if checkpoint["config"] != self.config.to_dict():
            changed = sorted(k for k, v in self.config.to_dict().items() if checkpoint["config"].get(k) != v)
            raise ValueError(f"cannot resume from {path}: the model config differs in {', '.join(changed)}")
        check_same_data(checkpoint.get("data"), self.data_identity, path)
        if checkpoint["tokenizer"] != self.data.tokenizer.to_bytes():
            raise ValueError(
                f"cannot resume from {path}: the data was prepared with another tokenizer than the checkpoint's"
            )
        check_resume(SearchSettings.from_dict(checkpoint["settings"]), self.settings, path)
        saved_method = type(self.method_settings).from_dict(checkpoint["method_settings"])
        check_resume(saved_method, self.method_settings, path)

    def _restore(self, checkpoint: dict) -> None:
        """Load the search state of the checkpoint (before the directory is claimed: no file changes)."""
        self.method.load_state_dict(checkpoint["searcher"])
        for name, stream in self.streams.items():
            stream.load_state(checkpoint["streams"][name])
        set_rng_state(checkpoint["rng"])
        self.clock = RunClock(checkpoint["elapsed_s"])
        self.recent_losses = list(checkpoint["recent_losses"])
        self.stable_evals = checkpoint["stable_evals"]
        self.last_eval_step, self.val_step = checkpoint["last_eval_step"], checkpoint["val_step"]
        self.val_loss = checkpoint["val_loss"]

    def _resume(self, checkpoint: dict) -> None:
        """Continue the restored search in its claimed directory: the logs cut back to the
        checkpoint, the schedule of the budget given, and a "resume" record."""
        self.rewind(checkpoint["log_bytes"])  # what was logged after the checkpoint goes
        saved = SearchSettings.from_dict(checkpoint["settings"])
        if (saved.max_steps, saved.max_minutes) == (self.settings.max_steps, self.settings.max_minutes):
            self.method.reschedule(Schedule(**checkpoint["schedule"]))
        elif self.settings.max_steps is None:  # another minutes budget: plan it at the step time so far
            self._plan_minutes()
        # else another step budget: the method planned it when it was built
        history = self.history.read()
        if history:
            self.last_ops = argmax_ops(history[-1], self.config)
        self.log.append("resume", self.steps, settings=self.settings.to_dict())

    def budget_reason(self) -> Optional[str]:
        """ "max_steps" (the planned steps are done), "max_minutes", "stable" (the argmax genotype
        has not changed for ``stable_evals`` evaluations), or None."""
        settings = self.settings
        reason = spent_budget(self.steps, self.method.schedule.steps or None, self.clock, settings.max_minutes)
        if reason is None and settings.stable_evals and self.stable_evals >= settings.stable_evals:
            reason = "stable"
        return reason

    def take_step(self, bar: Progress) -> None:
        """One step of the method, logged; a minutes budget planned or re-fitted when due; an
        evaluation every ``eval_interval`` and a checkpoint every ``checkpoint_interval`` steps."""
        settings, method = self.settings, self.method
        lr = method.theta_lr()
        record = method.step(self._next_batch)
        events = record.pop("events", [])
        self.recent_losses.append(record["theta_loss"])
        self.log.append("step", self.steps, **record, lr=lr)
        for event, fields in events:
            self.log.append(event, self.steps, **fields)
        if self.steps == CALIBRATION_STEPS and method.schedule.steps == 0:
            self._plan_minutes()
        if settings.max_steps is None and method.cost_changed:  # measure the step time anew
            self.refit_due = (self.steps + CALIBRATION_STEPS, self._mean_seconds())
        if self.refit_due is not None and self.steps == self.refit_due[0]:
            self._refit(self.refit_due[1])
            self.refit_due = None
        if self.steps % settings.eval_interval == 0:
            self._evaluate(final=self.stop_reason(signals=False) is not None)
        if self.steps % settings.checkpoint_interval == 0:
            self.save()
        shown = {}
        if method.trains_alpha:  # else there is no argmax to show: the selector chooses at the end
            alpha_loss = record["alpha_loss"]
            shown["alpha_loss"] = "frozen" if alpha_loss is None else f"{alpha_loss:.3f}"
            shown["arch"] = short_summary(self.model.genotype())
        bar.update(record["tokens"], record["theta_loss"], lr, **shown)

    def _next_batch(self, part: str) -> Batch:
        return self.streams[part].take()[0].to(self.device)

    def stopped(self, stopped_by: str) -> RunResult:
        """The result of a search stopped by a signal: its checkpoint is written, nothing else. Its
        details' genotype: the argmax so far (None with a method that trains no alpha)."""
        details = {"genotype": self.model.genotype() if self.method.trains_alpha else None}
        return RunResult(
            self.steps, stopped_by, self.run_dir.path, peak_memory(self.device), self.val_loss, details=details
        )

    def finish(self, stopped_by: str, bar: Progress) -> RunResult:
        """The last evaluation (unless just done), the checkpoint, then the selector's choice
        (genotype.json) and the "end" record. The result's details: the genotype."""
        if self.last_eval_step != self.steps or (self.valid_batches is not None and self.val_step != self.steps):
            self._evaluate(final=True)
        self.save()  # before the choice, which a resume of a finished run makes again (logged once)
        if self.ranks.main:
            self._select()
        genotype = Genotype.load(self.run_dir / GENOTYPE_FILE) if self.ranks.main else self.model.genotype()
        result = self.stopped(stopped_by)
        result.details["genotype"] = genotype
        result.tokens_per_s = bar.tokens_per_second()
        self.log.append(
            "end",
            self.steps,
            stopped_by=stopped_by,
            elapsed_s=round(self.clock.seconds(), 3),
            peak_memory_bytes=result.peak_memory_bytes,
            tokens_per_s=result.tokens_per_s,
            genotype=genotype.summary(),
        )
        return result

    def _select(self) -> None:
        """Choose the genotype with the selector: genotype.json, and a "ranking" record a genotype scored."""
        context = selection_context(self.model, self.settings, self.data, self.device)
        genotype, records = SELECTORS[self.settings.select](self.select_settings).select(context)
        for record in records:
            self.log.append("ranking", self.steps, **record)
        genotype.save(self.run_dir / GENOTYPE_FILE)

    def _evaluate(self, final: bool = False) -> None:
        """Write an "eval" log record, with the validation loss every ``valid_interval`` steps and
        at the ``final`` evaluation; with a method that trains alpha, also genotype.json (the
        argmax), the alpha history line and the heatmap."""
        step, weights, genotype = self.steps, self.model.arch_weights(), self.model.genotype()
        ops = argmax_ops(weights, self.config)
        same = self.last_ops == ops and self.method.alpha_active(step)
        self.stable_evals = self.stable_evals + 1 if same else 0
        if not self.ranks.main:  # every process keeps the count that may stop the search; rank 0 writes
            self.last_ops, self.last_eval_step, self.recent_losses = ops, step, []
            return
        recent = sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None
        record: dict[str, Any] = {"train_loss": recent}
        if self.method.trains_alpha:  # else the logits never move: no choice before the selector's
            genotype.save(self.run_dir / GENOTYPE_FILE)
            self.history.append("alpha", step, **weights)
            plot_alpha_history(self.history.read(), self.config, self.run_dir / HEATMAP_FILE)
            record.update(argmax_stability=argmax_stability(self.last_ops, ops), genotype=genotype.summary())
        record.update(peak_memory_bytes=peak_memory(self.device), elapsed_s=round(self.clock.seconds(), 3))
        self.last_ops, self.last_eval_step, self.recent_losses = ops, step, []
        if self.valid_batches is not None and (step % self.settings.valid_interval == 0 or final):
            settings = self.settings
            with self.method.evaluated():
                scores = evaluate_loss(
                    self.model,
                    self.valid_batches,
                    self.config.pad_id,
                    settings.label_smoothing,
                    self.device,
                    settings.bf16,
                )
            self.val_loss, self.val_step = scores["loss"], step
            record.update(val_loss=scores["loss"], val_nll=scores["nll"])
        message = collapse_message(ops) if self.method.trains_alpha else None
        self.log.append("eval", step, **record, collapse=message is not None)
        if message is not None:
            warnings.warn(message, stacklevel=3)
            self.log.append("warning", step, message=message)

    def save(self) -> None:
        if not self.ranks.main:
            return
        save_checkpoint(
            self.run_dir.checkpoint,
            {
                "kind": "search",
                "searcher": self.method.state_dict(),
                "streams": {name: stream.state() for name, stream in self.streams.items()},
                "rng": rng_state(),
                "elapsed_s": self.clock.seconds(),
                "recent_losses": list(self.recent_losses),
                "log_bytes": self.log_sizes(),
                "last_eval_step": self.last_eval_step,
                "val_step": self.val_step,
                "val_loss": self.val_loss,
                "stable_evals": self.stable_evals,
                "schedule": dataclasses.asdict(self.method.schedule),
                "settings": self.settings.to_dict(),
                "method_settings": self.method_settings.to_dict(),
                "select_settings": self.select_settings.to_dict(),
                "config": self.config.to_dict(),
                "vocab_size": self.data.tokenizer.vocab_size,
                "tokenizer": self.data.tokenizer.to_bytes(),
                "data": self.data_identity,
            },
        )


def selection_context(
    model: Supernet, settings: SearchSettings, data: Optional[PreparedData], device: torch.device
) -> SelectionContext:
    """What a selector reads of a trained supernet searched with ``settings`` (``data``: the
    validation split, if any)."""
    val: Optional[EncodedSplit] = data["val"] if data is not None and "val" in data.splits else None
    return SelectionContext(
        model=model,
        val=val,
        max_tokens=settings.max_tokens,
        label_smoothing=settings.label_smoothing,
        device=device,
        bf16=settings.bf16,
        seed=settings.seed,
    )

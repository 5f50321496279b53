"""The run of a search (docs/design.md 1.1): the engine behind ``mdarts search``.

:class:`Searcher` trains a :class:`~mdarts.model.Supernet` with a supernet method on a training
corpus split into two disjoint parts (the weights on the first, ``split_ratio`` of the pairs;
the architecture logits, if the method trains them, on the rest), then chooses the genotype
with a selector (:mod:`mdarts.search.parts`). It knows neither part: it plans the budget,
draws the batches, evaluates, logs, checkpoints and resumes. It is shaped like
:class:`~mdarts.train.Trainer` and shares its run layer (:mod:`mdarts.runs`).

A run directory receives, at every evaluation: ``genotype.json`` (the argmax genotype while
the search runs; the selector's choice at the end), one line of ``alpha_history.jsonl``,
``alpha_heatmap.png``; every step, evaluation and scored genotype is a JSON line of
``search_log.jsonl``; ``search_checkpoint.pt`` every ``checkpoint_interval`` steps and at the
end, from which ``resume=True`` continues exactly (same losses and alphas as a run that was
never interrupted).
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import runs
from ..batching import Batch, TokenBatches, warn_dropped
from ..checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..config import ModelConfig, SearchSettings, Settings
from ..genotype import Genotype
from ..memory import peak_memory
from ..model import Supernet, iter_nodes
from ..ops import parameter_free_ops
from ..plan import choose_memory_mode, default_memory_budget
from ..prepare import EncodedSplit, PreparedData
from ..progress import Progress
from .parts import METHODS, SELECTORS, SelectionContext, SupernetMethod, check_parts
from .reporting import argmax_ops, argmax_stability, collapse_message, plot_alpha_history, short_summary
from .weights import Schedule

CHECKPOINT_FILE, GENOTYPE_FILE, HISTORY_FILE, HEATMAP_FILE, LOG_FILE = RUN_FILES = runs.RunDirectory.KINDS["search"][1]
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


class BatchStream:
    """Endless batches over some pairs of a split, epoch after epoch, resumable, shared out
    among the processes of a run: each step takes the next ``ranks.world_size`` batches of the
    epoch, this process the one at its rank (an epoch's last batches that do not fill a step
    are left out), so the processes see disjoint parts of every epoch.

    Batch order is a function of (seed, epoch) (see :class:`~mdarts.batching.TokenBatches`),
    so :meth:`state` (epoch, batches of it taken by all processes) is all a resumed run needs,
    with any number of processes."""

    def __init__(
        self,
        split: EncodedSplit,
        indices: Sequence[int],
        max_tokens: int,
        seed: int,
        config: ModelConfig,
        name: str,
        ranks: runs.Ranks = runs.ONE_PROCESS,
    ) -> None:
        self.name, self.ranks = name, ranks
        self.batches = TokenBatches(
            [split.src_ids[i] for i in indices],
            [split.tgt_ids[i] for i in indices],
            max_tokens,
            seed=seed,
            shuffle=True,
            max_positions=config.max_positions,
            pad_id=config.pad_id,
        )
        if len(self.batches) < ranks.world_size:
            raise ValueError(
                f"the {name} part yields {len(self.batches)} batch(es), fewer than the {ranks.world_size} processes: "
                f"every pair longer than max_tokens={max_tokens} or max_positions={config.max_positions} is left out"
            )
        self.epoch, self.position = 0, 0

    def next(self) -> Batch:
        """This process's batch of the next step (CPU tensors), starting a new epoch when one ends."""
        if self.position + self.ranks.world_size > len(self.batches):
            self.load_state({"epoch": self.epoch + 1, "position": 0})
        batch = self.batches[self.position + self.ranks.rank]
        self.position += self.ranks.world_size
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        """Continue at batch ``position`` of epoch ``epoch``."""
        self.epoch, self.position = state["epoch"], state["position"]
        self.batches.set_epoch(self.epoch)


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


@dataclass
class SearchResult:
    """What a search produced: the genotype, the steps done in all, the peak memory (bytes;
    CUDA max allocated or CPU peak resident set), the last validation loss (None without a
    "val" split), the run directory, which holds the files named in the module docstring
    (``out_dir / GENOTYPE_FILE`` and so on), and why it stopped: "max_steps", "max_minutes",
    "stable" (see ``SearchSettings.stable_evals``), or a signal, "SIGINT" or "SIGTERM" (then
    only the checkpoint is written, and ``resume`` continues)."""

    genotype: Genotype
    steps: int
    peak_memory_bytes: int
    val_loss: Optional[float]
    out_dir: Path
    stopped_by: str


class Searcher:
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

    def __init__(
        self,
        config: ModelConfig,
        data: PreparedData,
        settings: SearchSettings,
        out_dir: runs.PathLike,
        *,
        method: Optional[Settings] = None,
        selector: Optional[Settings] = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: Optional[bool] = None,
    ) -> None:
        self.run_dir = runs.RunDirectory(out_dir, "search")
        self.run_dir.check(resume, overwrite)
        self.method_settings = part_settings(METHODS, settings.method, method)
        self.select_settings = part_settings(SELECTORS, settings.select, selector)
        check_parts(settings.method, settings.select, "val" in data.splits)
        self.data, self.settings, self.show_progress = data, settings, progress
        self.data_identity = data.identity()  # recorded in every checkpoint, checked on resume
        self.ranks = runs.Ranks.from_environment(settings.device)
        self.device = self.ranks.device(settings.device)
        runs.warn_if_slow_bf16(settings.bf16, self.device)
        checkpoint = load_checkpoint(self.run_dir.checkpoint, kind="search") if resume else None
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
        runs.seed_everything(settings.seed)
        self.model = self._supernet()
        self.method: SupernetMethod = METHODS[settings.method](self.model, settings, self.method_settings, self.ranks)
        if self.ranks.main:
            self.run_dir.claim(resume, overwrite)
        self.ranks.barrier()  # the others read the run directory once rank 0 has claimed it
        self.log = runs.JsonLog(self.run_dir / LOG_FILE, writes=self.ranks.main)
        self.history = runs.JsonLog(self.run_dir / HISTORY_FILE, writes=self.ranks.main)
        self.recent_losses: list[float] = []  # theta losses since the last evaluation
        self.last_ops: Optional[list[str]] = None
        self.stable_evals = 0  # evaluations of the alpha phase in a row with the same genotype
        self.last_eval_step = -1
        self.val_loss: Optional[float] = None
        self.val_step = -1  # the step of val_loss
        self.clock = runs.RunClock()
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
        model = Supernet(self.config, self.data.tokenizer.vocab_size).to(self.device)
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
                train, indices[name], settings.max_tokens, settings.seed + offsets[name], config, name, self.ranks
            )
            for name in METHODS[settings.method].parts
        }
        self.valid_batches = None
        if "val" in data.splits:
            val = data["val"]
            self.valid_batches = TokenBatches(
                val.src_ids,
                val.tgt_ids,
                settings.max_tokens,
                shuffle=False,
                max_positions=config.max_positions,
                pad_id=config.pad_id,
            )

    def _check_resumable(self, checkpoint: dict) -> None:
        """A resume must use the checkpoint's config, tokenizer and settings (budgets may change)."""
        path = self.run_dir.checkpoint
        if checkpoint["config"] != self.config.to_dict():
            changed = sorted(k for k, v in self.config.to_dict().items() if checkpoint["config"].get(k) != v)
            raise ValueError(f"cannot resume from {path}: the model config differs in {', '.join(changed)}")
        runs.check_same_data(checkpoint.get("data"), self.data_identity, path)
        if checkpoint["tokenizer"] != self.data.tokenizer.to_bytes():
            raise ValueError(
                f"cannot resume from {path}: the data was prepared with another tokenizer than the checkpoint's"
            )
        runs.check_resume(SearchSettings.from_dict(checkpoint["settings"]), self.settings, path)
        saved_method = type(self.method_settings).from_dict(checkpoint["method_settings"])
        runs.check_resume(saved_method, self.method_settings, path)

    def _resume(self, checkpoint: dict) -> None:
        self.method.load_state_dict(checkpoint["searcher"])
        for name, stream in self.streams.items():
            stream.load_state(checkpoint["streams"][name])
        set_rng_state(checkpoint["rng"])
        for name, log in (("log", self.log), ("history", self.history)):
            log.cut(checkpoint["log_bytes"][name])  # what was logged after the checkpoint goes
        self.clock = runs.RunClock(checkpoint["elapsed_s"])
        self.recent_losses = list(checkpoint["recent_losses"])
        self.stable_evals = checkpoint["stable_evals"]
        saved = SearchSettings.from_dict(checkpoint["settings"])
        if (saved.max_steps, saved.max_minutes) == (self.settings.max_steps, self.settings.max_minutes):
            self.method.reschedule(Schedule(**checkpoint["schedule"]))
        elif self.settings.max_steps is None:  # another minutes budget: plan it at the step time so far
            self._plan_minutes()
        # else another step budget: the method planned it when it was built
        history = self.history.read()
        if history:
            self.last_ops = argmax_ops(history[-1], self.config)
        self.last_eval_step, self.val_step = checkpoint["last_eval_step"], checkpoint["val_step"]
        self.val_loss = checkpoint["val_loss"]
        self.log.append("resume", self.steps, settings=self.settings.to_dict())

    def run(self) -> SearchResult:
        """Search until the planned steps are done, ``max_minutes`` have passed or the genotype
        is stable (see :meth:`_stop_reason`), evaluating every ``eval_interval`` and
        checkpointing every ``checkpoint_interval`` steps and at the end, then choose the
        genotype with the selector. SIGINT or SIGTERM stops it after the current step with the
        checkpoint (and nothing else) written."""
        self.clock = runs.RunClock(self.clock.seconds())
        shown = self.show_progress if self.ranks.main else False
        bar = Progress(self.settings.max_steps, "search", self.device, initial=self.steps, enabled=shown)
        with runs.StopSignals() as signals:
            try:
                stopped_by = self._loop(bar, signals)
            finally:
                bar.close()
        if stopped_by in runs.SIGNAL_NAMES:
            self._save()
            genotype = self.model.genotype()
            return SearchResult(
                genotype, self.steps, peak_memory(self.device), self.val_loss, self.run_dir.path, stopped_by
            )
        if self.last_eval_step != self.steps or (self.valid_batches is not None and self.val_step != self.steps):
            self._evaluate(final=True)
        self._save()  # before the choice, which a resume of a finished run makes again (logged once)
        if self.ranks.main:
            self._select()
        genotype = Genotype.load(self.run_dir / GENOTYPE_FILE) if self.ranks.main else self.model.genotype()
        peak = peak_memory(self.device)
        self.log.append(
            "end",
            self.steps,
            stopped_by=stopped_by,
            elapsed_s=round(self.clock.seconds(), 3),
            peak_memory_bytes=peak,
            tokens_per_s=bar.tokens_per_second(),
            genotype=genotype.summary(),
        )
        return SearchResult(genotype, self.steps, peak, self.val_loss, self.run_dir.path, stopped_by)

    def _select(self) -> None:
        """Choose the genotype with the selector: genotype.json, and a "ranking" record a genotype scored."""
        context = selection_context(self.model, self.settings, self.data, self.device)
        genotype, records = SELECTORS[self.settings.select](self.select_settings).select(context)
        for record in records:
            self.log.append("ranking", self.steps, **record)
        genotype.save(self.run_dir / GENOTYPE_FILE)

    def _next_batch(self, part: str) -> Batch:
        return self.streams[part].next().to(self.device)

    def _loop(self, bar: Progress, signals: runs.StopSignals) -> str:
        """Search steps until the budget is spent or a signal asks to stop; why it stopped."""
        settings, method = self.settings, self.method
        refit = None  # with a minutes budget: (step, clock seconds CALIBRATION_STEPS before it) of the next re-plan
        while (stopped_by := self._stop_reason(signals)) is None:
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
                refit = (self.steps + CALIBRATION_STEPS, self._mean_seconds())
            if refit is not None and self.steps == refit[0]:
                self._refit(refit[1])
                refit = None
            if self.steps % settings.eval_interval == 0:
                self._evaluate(final=self._stop_reason() is not None)
            if self.steps % settings.checkpoint_interval == 0:
                self._save()
            alpha_loss = record["alpha_loss"]
            shown = "frozen" if alpha_loss is None else f"{alpha_loss:.3f}"
            bar.update(
                record["tokens"], record["theta_loss"], lr, alpha_loss=shown, arch=short_summary(self.model.genotype())
            )
        return stopped_by

    def _stop_reason(self, signals: Optional[runs.StopSignals] = None) -> Optional[str]:
        """Why the search stops now: "SIGINT" or "SIGTERM" (to any process), "max_steps" (the
        planned steps are done), "max_minutes", "stable" (the genotype has not changed for
        ``stable_evals`` evaluations), or None; decided for all processes at once."""
        settings = self.settings
        reason = runs.spent_budget(self.steps, self.method.schedule.steps or None, self.clock, settings.max_minutes)
        if reason is None and settings.stable_evals and self.stable_evals >= settings.stable_evals:
            reason = "stable"
        signal = signals.requested if signals is not None else None
        signalled, stopping = self.ranks.sum([float(signal is not None), float(reason is not None)])
        if signalled:
            return signal or "SIGTERM"  # another process was signalled
        return reason or ("another process" if stopping else None)

    def _evaluate(self, final: bool = False) -> Genotype:
        """Write genotype.json, the alpha history line, the heatmap and an "eval" log record, with
        the validation loss every ``valid_interval`` steps and at the ``final`` evaluation."""
        step, weights, genotype = self.steps, self.model.arch_weights(), self.model.genotype()
        ops = argmax_ops(weights, self.config)
        same = self.last_ops == ops and self.method.alpha_active(step)
        self.stable_evals = self.stable_evals + 1 if same else 0
        if not self.ranks.main:  # every process keeps the count that may stop the search; rank 0 writes
            self.last_ops, self.last_eval_step, self.recent_losses = ops, step, []
            return genotype
        genotype.save(self.run_dir / GENOTYPE_FILE)
        self.history.append("alpha", step, **weights)
        plot_alpha_history(self.history.read(), self.config, self.run_dir / HEATMAP_FILE)
        recent = sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None
        record: dict[str, Any] = {
            "train_loss": recent,
            "argmax_stability": argmax_stability(self.last_ops, ops),
            "genotype": genotype.summary(),
            "peak_memory_bytes": peak_memory(self.device),
            "elapsed_s": round(self.clock.seconds(), 3),
        }
        self.last_ops, self.last_eval_step, self.recent_losses = ops, step, []
        if self.valid_batches is not None and (step % self.settings.valid_interval == 0 or final):
            settings = self.settings
            scores = runs.evaluate_loss(
                self.model, self.valid_batches, self.config.pad_id, settings.label_smoothing, self.device, settings.bf16
            )
            self.val_loss, self.val_step = scores["loss"], step
            record.update(val_loss=scores["loss"], val_nll=scores["nll"])
        message = collapse_message(ops) if self.method.trains_alpha else None
        self.log.append("eval", step, **record, collapse=message is not None)
        if message is not None:
            warnings.warn(message, stacklevel=3)
            self.log.append("warning", step, message=message)
        return genotype

    def _save(self) -> None:
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
                "log_bytes": {"log": self.log.size(), "history": self.history.size()},
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
        method=settings.method,
        trains_alpha=METHODS[settings.method].trains_alpha,
        val=val,
        max_tokens=settings.max_tokens,
        label_smoothing=settings.label_smoothing,
        device=device,
        bf16=settings.bf16,
        seed=settings.seed,
    )

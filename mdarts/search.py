"""DARTS search on the reversible supernet (docs/design.md 1.1): the engine behind ``mdarts search``.

:class:`Searcher` trains a :class:`~mdarts.model.Supernet` on a training corpus split into two
disjoint parts: the weights theta on the first (``split_ratio`` of the pairs), the
architecture logits alpha on the rest, alternating one theta step and one alpha step
(:class:`~mdarts.darts.DartsSearcher`), both on the label-smoothed cross-entropy. It is
shaped like :class:`~mdarts.train.Trainer` and shares its run layer (:mod:`mdarts.runs`).

A run directory receives, at every evaluation: ``genotype.json``, one line of
``alpha_history.jsonl``, ``alpha_heatmap.png``; every step and evaluation is a JSON line of
``search_log.jsonl``; ``search_checkpoint.pt`` every ``checkpoint_interval`` steps and at the
end, from which ``resume=True`` continues exactly (same losses and alphas as a run that was
never interrupted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import runs
from .batching import Batch, TokenBatches, warn_dropped
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ModelConfig, SearchSettings
from .darts import DartsSearcher, Schedule
from .genotype import Genotype, random_genotype
from .memory import peak_memory
from .model import Supernet, iter_nodes
from .plan import choose_memory_mode, default_memory_budget
from .prepare import EncodedSplit, PreparedData
from .progress import Progress

__all__ = ["Searcher", "SearchResult", "SearchSettings", "split_corpus", "BatchStream", "plot_alpha_history"]

CHECKPOINT_FILE, GENOTYPE_FILE, HISTORY_FILE, HEATMAP_FILE, LOG_FILE = RUN_FILES = runs.RunDirectory.KINDS["search"][1]
COLLAPSE_OPS = PARAMETER_FREE = ("zero", "identity")
RANKING_PAIRS = 256  # validation pairs that rank the paths of a weight-sharing search
CALIBRATION_STEPS = 5  # steps timed before a minutes budget is planned in steps, and again in the alpha phase


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


# ----------------------------------------------------------------------------- reporting


def argmax_ops(weights: dict[str, list[list[list[float]]]], config: ModelConfig) -> list[str]:
    """The argmax op (zero included) of every node, encoder nodes then decoder nodes."""
    ops = []
    for side in ("encoder", "decoder"):
        candidates = getattr(config, f"{side}_candidates")
        ops.extend(candidates[max(range(len(node)), key=node.__getitem__)] for layer in weights[side] for node in layer)
    return ops


def argmax_stability(previous: Optional[Sequence[str]], current: Sequence[str]) -> Optional[float]:
    """Fraction of nodes whose argmax op is unchanged since ``previous`` (None without one)."""
    if previous is None or len(previous) != len(current):
        return None
    return sum(a == b for a, b in zip(previous, current)) / len(current)


def collapse_message(ops: Sequence[str]) -> Optional[str]:
    """A warning when zero or identity is the argmax of more than half of the nodes, else None."""
    taken = sum(op in COLLAPSE_OPS for op in ops)
    if 2 * taken <= len(ops):
        return None
    return (
        f"DARTS collapse: zero or identity is the argmax of {taken} of {len(ops)} nodes; "
        "consider a shorter search, a lower alpha_lr or a larger alpha_weight_decay"
    )


def short_summary(genotype: Genotype) -> str:
    """One-line genotype for a progress bar, e.g. ``E attention,ffn|conv3,glu D ffn,conv5|...``."""
    return " ".join(
        f"{side[0].upper()} " + "|".join(",".join(layer) for layer in getattr(genotype, side))
        for side in ("encoder", "decoder")
    )


def plot_alpha_history(history: Sequence[dict], config: ModelConfig, path: Path) -> None:
    """Heatmaps of each node's weights over the search, one panel per node (rows: side and unit
    layer, columns: split), candidates on the y axis, evaluation steps on the x axis. A cell is
    the weight against uniform, log2(K * softmax(alpha)_o) for a node of K candidates, on one
    diverging scale centred on 0 (uniform), so nodes of 13 and 14 candidates compare; candidates
    removed by progressive shrinking (weight 0) are grey. PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [record["step"] for record in history]
    rows = [(side, i) for side in ("encoder", "decoder") for i in range(config.unit_layers)]
    columns = max(config.encoder_splits, config.decoder_splits - 1)
    height = max(len(config.encoder_candidates), len(config.decoder_candidates)) * 0.22 + 1.0
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns + 1.5, height * len(rows)), squeeze=False)
    with np.errstate(divide="ignore"):  # a removed candidate: log2(0), masked
        ratios = {
            (side, i, k): np.ma.masked_invalid(
                np.log2(len(node) * np.array([r[side][i][k] for r in history]).T), copy=False
            )
            for side, i in rows
            for k, node in enumerate(history[0][side][i])
        }  # (candidates, evaluations) each
    limit = max(1.0, max(float(np.abs(values).max()) for values in ratios.values()))
    colours = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.8")
    mappable = None
    for r, (side, i) in enumerate(rows):
        candidates = getattr(config, f"{side}_candidates")
        for k in range(columns):
            ax = axes[r][k]
            if (side, i, k) not in ratios:
                ax.axis("off")
                continue
            values = ratios[side, i, k]
            mappable = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=colours, vmin=-limit, vmax=limit)
            ax.set_yticks(range(len(candidates)), candidates, fontsize=7)
            ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 5))})
            ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
            best = int(values[:, -1].argmax())
            ax.set_title(f"{side}[{i}][{k}] -> {candidates[best]} ({2 ** values[best, -1]:.1f}x uniform)", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("step", fontsize=7)
    fig.suptitle("each node's weights against uniform (red: above 1/K, blue: below, grey: removed)")
    fig.tight_layout(rect=(0, 0, 0.86, 0.96))
    if mappable is not None:
        bar = fig.colorbar(mappable, cax=fig.add_axes((0.88, 0.1, 0.015, 0.8)))
        bar.set_label("weight / uniform (log2: 1 = twice uniform)")
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    runs.write_atomic(path, image.getvalue())


# ----------------------------------------------------------------------------- the run


def searched_space(config: ModelConfig, parameter_free: bool) -> ModelConfig:
    """``config`` with the candidates a search uses: without zero and identity unless
    ``parameter_free`` (see ``SearchSettings.parameter_free``)."""
    if parameter_free:
        return config
    return config.replace(
        encoder_candidates=tuple(op for op in config.encoder_candidates if op not in PARAMETER_FREE),
        decoder_candidates=tuple(op for op in config.decoder_candidates if op not in PARAMETER_FREE),
    )


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
    """Searches an architecture: first- (or second-) order DARTS on ``data["train"]``, into ``out_dir``.

    Args:
        config: the supernet. Its ``memory_mode`` "auto" becomes the fastest mode predicted to
            fit ``settings.memory_budget_gb``; unless ``settings.parameter_free``, zero and
            identity leave the candidates. ``self.config`` is the supernet searched.
        data: the tokenizer and encoded splits; "train" is required, "val" (optional) is
            scored at every evaluation.
        settings: optimisers, budget and reporting, see :class:`~mdarts.config.SearchSettings`.
        out_dir: the run directory (created). One holding another run is refused
            (FileExistsError) unless ``resume`` (continue from its checkpoint, exactly) or
            ``overwrite`` (delete that run's files, once every setting has been checked).
        progress: show the progress bar (None: when stderr is a terminal).
    """

    def __init__(
        self,
        config: ModelConfig,
        data: PreparedData,
        settings: SearchSettings,
        out_dir: runs.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: Optional[bool] = None,
    ) -> None:
        self.run_dir = runs.RunDirectory(out_dir, "search")
        self.run_dir.check(resume, overwrite)
        self.data, self.settings, self.show_progress = data, settings, progress
        self.data_identity = data.identity()  # recorded in every checkpoint, checked on resume
        self.ranks = runs.Ranks.from_environment(settings.device)
        self.device = self.ranks.device(settings.device)
        runs.warn_if_slow_bf16(settings.bf16, self.device)
        checkpoint = load_checkpoint(self.run_dir.checkpoint, kind="search") if resume else None
        self.config, self.memory_reason = self._searched_config(config, checkpoint)
        config = self.config
        if checkpoint is not None:
            self._check_resumable(checkpoint)
        if settings.single_path and "val" not in data.splits:
            raise ValueError("--single-path ranks genotypes by validation loss: give validation data")
        self._make_batches(data)
        self.ranks.check_same(
            {**settings.to_dict(), "device": None, "config": config.to_dict(), "data": self.data_identity}
        )
        runs.seed_everything(settings.seed)
        self.model = Supernet(config, data.tokenizer.vocab_size).to(self.device)
        if settings.affine_free:
            for node in iter_nodes(self.model):
                if node.parametric:
                    node.ln_weight.requires_grad_(False)
                    node.ln_bias.requires_grad_(False)
        self.darts = DartsSearcher(self.model, settings, self._first_schedule(), self.ranks)
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
            self.log.append(
                "start",
                0,
                settings=settings.to_dict(),
                config=config.to_dict(),
                memory_mode=self.memory_reason,
                schedule=dataclasses.asdict(self.darts.schedule),
                theta_pairs=len(self.streams["theta"].batches.kept),
                alpha_pairs=len(self.streams["alpha"].batches.kept),
                parameters=self.model.num_parameters(),
                device=str(self.device),
            )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def steps(self) -> int:
        return self.darts.steps

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

    def _first_schedule(self) -> Schedule:
        """The schedule of a step budget; for a minutes budget, weights-only steps until
        :meth:`_plan_minutes` knows the step time."""
        settings = self.settings
        if settings.single_path:
            settings = settings.replace(weights_only_fraction=0.0)
        if settings.max_steps is not None:
            schedule = Schedule.plan(settings, settings.max_steps)
            if self.settings.single_path:
                return dataclasses.replace(schedule, alpha_start=sys.maxsize)
            schedule.check(settings)
            return schedule
        return Schedule(0, settings.warmup_steps or 100, sys.maxsize, settings.alpha_lr or 1e-3)

    def _plan_minutes(self) -> None:
        """A minutes budget: after CALIBRATION_STEPS weights-only steps, plan the step budget
        that fits (an alternating step costs about two weights-only steps) and log it."""
        settings = self.settings
        per_step = self._mean_seconds() / self.steps
        fraction = settings.weights_only_fraction
        steps = int(60.0 * settings.max_minutes / (per_step * (2.0 - fraction)))
        schedule = Schedule.plan(settings, max(steps, self.steps + 1))
        if settings.single_path:
            schedule = dataclasses.replace(schedule, alpha_start=sys.maxsize)
        else:
            schedule.check(settings)
        self.darts.reschedule(schedule)
        self.log.append("schedule", self.steps, seconds_per_step=per_step, **dataclasses.asdict(schedule))

    def _mean_seconds(self) -> float:
        """The run's seconds so far, averaged over the processes, so that they all plan alike."""
        return self.ranks.sum([self.clock.seconds()])[0] / self.ranks.world_size

    def _replan_alpha_phase(self, started: float) -> None:
        """A minutes budget, CALIBRATION_STEPS into the alpha phase or after a shrinking (the
        clock said ``started`` seconds CALIBRATION_STEPS ago): fit the phase to the time left at
        the steps' measured cost, and spread alpha_travel over it."""
        settings, schedule = self.settings, self.darts.schedule
        now = self._mean_seconds()
        per_step = (now - started) / CALIBRATION_STEPS
        left = 60.0 * settings.max_minutes - now
        steps = self.steps + max(1, int(left / per_step))
        alpha_lr = settings.alpha_lr or settings.alpha_travel / (steps - schedule.alpha_start + 1)
        self.darts.reschedule(dataclasses.replace(schedule, steps=steps, alpha_lr=alpha_lr))
        self.log.append("schedule", self.steps, seconds_per_step=per_step, **dataclasses.asdict(self.darts.schedule))

    def _make_batches(self, data: PreparedData) -> None:
        """The theta and alpha batch streams (disjoint parts of the training data, sharded by
        rank) and the validation batches (None without validation data)."""
        settings, config, train = self.settings, self.config, data["train"]
        warn_dropped(data, config.max_positions, "search")  # pairs too long for the supernet: left out
        theta_idx, alpha_idx = split_corpus(len(train), settings.split_ratio, settings.seed)
        self.streams = {
            "theta": BatchStream(train, theta_idx, settings.max_tokens, settings.seed, config, "theta", self.ranks),
            "alpha": BatchStream(train, alpha_idx, settings.max_tokens, settings.seed + 1, config, "alpha", self.ranks),
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

    def _resume(self, checkpoint: dict) -> None:
        self.darts.load_state_dict(checkpoint["searcher"])
        for name, stream in self.streams.items():
            stream.load_state(checkpoint["streams"][name])
        set_rng_state(checkpoint["rng"])
        sizes = checkpoint.get("log_bytes")  # what was logged after the checkpoint goes first
        for name, log in (("log", self.log), ("history", self.history)):
            if sizes:
                log.cut(sizes[name])
            else:
                log.truncate(self.steps)
        self.clock = runs.RunClock(checkpoint["elapsed_s"])
        self.recent_losses = list(checkpoint.get("recent_losses", []))
        self.stable_evals = checkpoint.get("stable_evals", 0)
        saved = SearchSettings.from_dict(checkpoint["settings"])
        if (saved.max_steps, saved.max_minutes) == (self.settings.max_steps, self.settings.max_minutes):
            self.darts.reschedule(Schedule(**checkpoint["schedule"]))
        elif self.settings.max_steps is None:  # another minutes budget: plan it at the step time so far
            self._plan_minutes()
        # else another step budget: the phases are planned over it (_first_schedule)
        history = self.history.read()
        if history:
            self.last_ops, self.last_eval_step = argmax_ops(history[-1], self.config), history[-1]["step"]
        if "last_eval_step" in checkpoint:
            self.last_eval_step, self.val_step = checkpoint["last_eval_step"], checkpoint["val_step"]
            self.val_loss = checkpoint["val_loss"]
        self.log.append("resume", self.steps, settings=self.settings.to_dict())

    def run(self) -> SearchResult:
        """Search until the planned steps are done, ``max_minutes`` have passed or the genotype
        is stable (see :meth:`_stop_reason`), evaluating every ``eval_interval`` and
        checkpointing every ``checkpoint_interval`` steps, and at the end. SIGINT or SIGTERM
        stops it after the current step with the checkpoint (and nothing else) written."""
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
        if self.settings.single_path and self.ranks.main:
            self._ranked_path().save(self.run_dir / GENOTYPE_FILE)
        self._save()
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

    def _loop(self, bar: Progress, signals: runs.StopSignals) -> str:
        """Search steps until the budget is spent or a signal asks to stop; why it stopped."""
        settings = self.settings
        refit = None  # with a minutes budget: (step, clock seconds CALIBRATION_STEPS before it) of the next re-plan
        while (stopped_by := self._stop_reason(signals)) is None:
            shrinks = self.darts.shrinks
            theta_batch = self.streams["theta"].next().to(self.device)
            alpha_batch = self.streams["alpha"].next().to(self.device) if self.darts.alpha_active() else None
            lr = self.darts.theta_lr()
            with self._path():
                theta_loss, alpha_loss = self.darts.step(theta_batch, alpha_batch)
            self.recent_losses.append(theta_loss)
            tokens = theta_batch.num_tokens + (0 if alpha_batch is None else alpha_batch.num_tokens)
            self.log.append("step", self.steps, theta_loss=theta_loss, alpha_loss=alpha_loss, lr=lr, tokens=tokens)
            if self.steps == CALIBRATION_STEPS and self.darts.schedule.steps == 0:
                self._plan_minutes()
            if self.darts.shrinks != shrinks:
                self.log.append("shrink", self.steps, keep=settings.shrink_to[shrinks], dropped=self.model.dropped)
            if settings.max_steps is None and (
                self.steps == self.darts.schedule.alpha_start - 1 or self.darts.shrinks != shrinks
            ):  # the step time changes: measure it anew and fit the rest of the phase to the time left
                refit = (self.steps + CALIBRATION_STEPS, self._mean_seconds())
            if refit is not None and self.steps == refit[0]:
                self._replan_alpha_phase(refit[1])
                refit = None
            if self.steps % settings.eval_interval == 0:
                self._evaluate(final=self._stop_reason() is not None)
            if self.steps % settings.checkpoint_interval == 0:
                self._save()
            shown = "frozen" if alpha_loss is None else f"{alpha_loss:.3f}"
            bar.update(tokens, theta_loss, lr, alpha_loss=shown, arch=short_summary(self.model.genotype()))
        return stopped_by

    def _path(self) -> contextlib.AbstractContextManager:
        """With ``single_path``: the uniformly drawn path of the next step (a function of the seed
        and the step, so a resumed run draws the same); else nothing."""
        if not self.settings.single_path:
            return contextlib.nullcontext()
        return self.model.use_path(random_genotype(self.config, self.settings.seed * 1_000_003 + self.steps))

    def _ranked_path(self) -> Genotype:
        """The best of ``ranked_paths`` random genotypes by shared-weight validation loss (on the
        first RANKING_PAIRS validation pairs), each logged as a "ranking" record."""
        settings, val = self.settings, self.data["val"]
        batches = TokenBatches(
            val.src_ids[:RANKING_PAIRS],
            val.tgt_ids[:RANKING_PAIRS],
            settings.max_tokens,
            shuffle=False,
            max_positions=self.config.max_positions,
            pad_id=self.config.pad_id,
        )
        best, best_loss = None, math.inf
        for i in range(settings.ranked_paths):
            genotype = random_genotype(self.config, -(settings.seed * 1_000_003 + i + 1))
            with self.model.use_path(genotype):
                loss = runs.evaluate_loss(
                    self.model, batches, self.config.pad_id, settings.label_smoothing, self.device, settings.bf16
                )["loss"]
            self.log.append("ranking", self.steps, genotype=genotype.summary(), val_loss=loss)
            if loss < best_loss:
                best, best_loss = genotype, loss
        return best

    def _stop_reason(self, signals: Optional[runs.StopSignals] = None) -> Optional[str]:
        """Why the search stops now: "SIGINT" or "SIGTERM" (to any process), "max_steps" (the
        planned steps are done), "max_minutes", "stable" (the genotype has not changed for
        ``stable_evals`` evaluations), or None; decided for all processes at once."""
        settings = self.settings
        reason = runs.spent_budget(self.steps, self.darts.schedule.steps or None, self.clock, settings.max_minutes)
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
        same = self.last_ops == ops and self.darts.alpha_active(step)
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
        message = collapse_message(ops)
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
                "searcher": self.darts.state_dict(),
                "streams": {name: stream.state() for name, stream in self.streams.items()},
                "rng": rng_state(),
                "elapsed_s": self.clock.seconds(),
                "recent_losses": list(self.recent_losses),
                "log_bytes": {"log": self.log.size(), "history": self.history.size()},
                "last_eval_step": self.last_eval_step,
                "val_step": self.val_step,
                "val_loss": self.val_loss,
                "stable_evals": self.stable_evals,
                "schedule": dataclasses.asdict(self.darts.schedule),
                "settings": self.settings.to_dict(),
                "config": self.config.to_dict(),
                "vocab_size": self.data.tokenizer.vocab_size,
                "tokenizer": self.data.tokenizer.to_bytes(),
                "data": self.data_identity,
            },
        )

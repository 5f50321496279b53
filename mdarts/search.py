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

import io
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from . import runs
from .batching import Batch, TokenBatches
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ModelConfig, SearchSettings
from .darts import DartsSearcher
from .genotype import Genotype
from .memory import peak_memory
from .model import Supernet
from .prepare import EncodedSplit, PreparedData
from .progress import Progress

__all__ = ["Searcher", "SearchResult", "SearchSettings", "split_corpus", "BatchStream", "plot_alpha_history"]

CHECKPOINT_FILE = "search_checkpoint.pt"
GENOTYPE_FILE = "genotype.json"
HISTORY_FILE = "alpha_history.jsonl"
HEATMAP_FILE = "alpha_heatmap.png"
LOG_FILE = "search_log.jsonl"
RUN_FILES = (CHECKPOINT_FILE, GENOTYPE_FILE, HISTORY_FILE, HEATMAP_FILE, LOG_FILE)
COLLAPSE_OPS = ("zero", "identity")


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
    """Endless batches over some pairs of a split, epoch after epoch, resumable.

    Batch order is a function of (seed, epoch) (see :class:`~mdarts.batching.TokenBatches`),
    so :meth:`state` (epoch, position in it) is all a resumed run needs."""

    def __init__(
        self, split: EncodedSplit, indices: Sequence[int], max_tokens: int, seed: int, config: ModelConfig, name: str
    ) -> None:
        self.name = name
        self.batches = TokenBatches(
            [split.src_ids[i] for i in indices],
            [split.tgt_ids[i] for i in indices],
            max_tokens,
            seed=seed,
            shuffle=True,
            max_positions=config.max_positions,
            pad_id=config.pad_id,
        )
        if len(self.batches) == 0:
            raise ValueError(
                f"the {name} part yields no batch: every pair is longer than max_tokens={max_tokens} "
                f"or max_positions={config.max_positions} positions"
            )
        self.epoch, self.position = 0, 0
        self._iterator: Iterator[Batch] = iter(self.batches)

    def next(self) -> Batch:
        """The next batch (CPU tensors), starting a new epoch when one ends."""
        if self.position >= len(self.batches):
            self.load_state({"epoch": self.epoch + 1, "position": 0})
        self.position += 1
        return next(self._iterator)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        """Continue at batch ``position`` of epoch ``epoch``."""
        self.epoch, self.position = state["epoch"], state["position"]
        self.batches.set_epoch(self.epoch)
        self._iterator = iter(self.batches)
        for _ in range(self.position):
            next(self._iterator)


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
    """Heatmaps of softmax(alpha) over time, one panel per node (rows: unit layer and side,
    columns: split), candidates on the y axis and evaluation steps on the x axis, one colour
    scale from 0 to the largest weight seen; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [record["step"] for record in history]
    rows = [(side, i) for side in ("encoder", "decoder") for i in range(config.unit_layers)]
    columns = max(config.encoder_splits, config.decoder_splits - 1)
    height = max(len(config.encoder_candidates), len(config.decoder_candidates)) * 0.22 + 1.0
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns + 1.5, height * len(rows)), squeeze=False)
    # one colour scale over the range the weights actually take (early in a search they all sit
    # near 1/K, and a scale from 0 would show no difference)
    weights = [
        p
        for record in history
        for side in ("encoder", "decoder")
        for layer in record[side]
        for node in layer
        for p in node
    ]
    vmin, vmax = min(weights), max(weights)
    image = None
    for r, (side, i) in enumerate(rows):
        candidates = getattr(config, f"{side}_candidates")
        for k in range(columns):
            ax = axes[r][k]
            if k >= len(history[0][side][i]):
                ax.axis("off")
                continue
            values = np.array([record[side][i][k] for record in history]).T  # (candidates, evaluations)
            image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax)
            ax.set_yticks(range(len(candidates)), candidates, fontsize=7)
            ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 5))})
            ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
            best = int(values[:, -1].argmax())
            ax.set_title(f"{side}[{i}][{k}] -> {candidates[best]}", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("step", fontsize=7)
    fig.suptitle("softmax(alpha) per node over the search")
    fig.tight_layout(rect=(0, 0, 0.86, 0.96))
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.88, 0.1, 0.015, 0.8)), format="%.3f")
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    runs.write_atomic(path, image.getvalue())


# ----------------------------------------------------------------------------- the run


@dataclass
class SearchResult:
    """What a search produced: the genotype, the steps done in all, the peak memory (bytes;
    CUDA max allocated or CPU peak resident set), the last validation loss (None without a
    "val" split), the run directory, which holds the files named in the module docstring
    (``out_dir / GENOTYPE_FILE`` and so on), and the signal that stopped it early, if one did
    ("SIGINT", "SIGTERM": the checkpoint is written and ``resume`` continues)."""

    genotype: Genotype
    steps: int
    peak_memory_bytes: int
    val_loss: Optional[float]
    out_dir: Path
    stopped_by: Optional[str] = None


class Searcher:
    """Searches an architecture: first- (or second-) order DARTS on ``data["train"]``, into ``out_dir``.

    Args:
        config: the supernet (its ``memory_mode`` is used as is).
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
        self.run_dir = runs.RunDirectory(out_dir, "search", CHECKPOINT_FILE, RUN_FILES)
        self.run_dir.check(resume, overwrite)
        self.config, self.data, self.settings, self.show_progress = config, data, settings, progress
        self.device = runs.resolve_device(settings.device)
        checkpoint = load_checkpoint(self.run_dir.checkpoint, kind="search") if resume else None
        if checkpoint is not None:
            self._check_resumable(checkpoint)
        train = data["train"]
        theta_idx, alpha_idx = split_corpus(len(train), settings.split_ratio, settings.seed)
        self.streams = {
            "theta": BatchStream(train, theta_idx, settings.max_tokens, settings.seed, config, "theta"),
            "alpha": BatchStream(train, alpha_idx, settings.max_tokens, settings.seed + 1, config, "alpha"),
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
        runs.seed_everything(settings.seed)
        self.model = Supernet(config, data.tokenizer.vocab_size).to(self.device)
        self.darts = DartsSearcher(self.model, settings)
        self.run_dir.claim(resume, overwrite)
        self.log = runs.JsonLog(self.run_dir / LOG_FILE)
        self.history = runs.JsonLog(self.run_dir / HISTORY_FILE)
        self.recent_losses: list[float] = []  # theta losses since the last evaluation
        self.last_ops: Optional[list[str]] = None
        self.last_eval_step = -1
        self.val_loss: Optional[float] = None
        self.clock = runs.RunClock()
        if checkpoint is not None:
            self._resume(checkpoint)
        else:
            self.log.append(
                "start",
                0,
                settings=settings.to_dict(),
                config=config.to_dict(),
                theta_pairs=len(theta_idx),
                alpha_pairs=len(alpha_idx),
                parameters=self.model.num_parameters(),
                device=str(self.device),
            )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def steps(self) -> int:
        return self.darts.steps

    def _check_resumable(self, checkpoint: dict) -> None:
        """A resume must use the checkpoint's config, tokenizer and settings (budgets may change)."""
        path = self.run_dir.checkpoint
        if checkpoint["config"] != self.config.to_dict():
            changed = sorted(k for k, v in self.config.to_dict().items() if checkpoint["config"].get(k) != v)
            raise ValueError(f"cannot resume from {path}: the model config differs in {', '.join(changed)}")
        runs.check_same_data(checkpoint.get("data"), self.data.identity(), path)
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
        self.clock = runs.RunClock(checkpoint["elapsed_s"])
        self.recent_losses = list(checkpoint.get("recent_losses", []))
        for log in (self.log, self.history):
            log.truncate(self.steps)
        history = self.history.read()
        if history:
            self.last_ops, self.last_eval_step = argmax_ops(history[-1], self.config), history[-1]["step"]
        self.log.append("resume", self.steps, settings=self.settings.to_dict())

    def run(self) -> SearchResult:
        """Search until ``max_steps`` steps are done in all or ``max_minutes`` have passed,
        evaluating every ``eval_interval`` and checkpointing every ``checkpoint_interval``
        steps, and at the end. SIGINT or SIGTERM stops it after the current step with the
        checkpoint (and nothing else) written."""
        self.clock = runs.RunClock(self.clock.seconds())
        bar = Progress(self.settings.max_steps, "search", self.device, initial=self.steps, enabled=self.show_progress)
        with runs.StopSignals() as signals:
            try:
                self._loop(bar, signals)
            finally:
                bar.close()
        if signals.requested:
            self._save()
            genotype = self.model.genotype()
            return SearchResult(
                genotype, self.steps, peak_memory(self.device), self.val_loss, self.run_dir.path, signals.requested
            )
        if self.last_eval_step != self.steps:
            self._evaluate()
        self._save()
        genotype = Genotype.load(self.run_dir / GENOTYPE_FILE)
        peak = peak_memory(self.device)
        self.log.append(
            "end",
            self.steps,
            elapsed_s=round(self.clock.seconds(), 3),
            peak_memory_bytes=peak,
            tokens_per_s=bar.tokens_per_second(),
            genotype=genotype.summary(),
        )
        return SearchResult(genotype, self.steps, peak, self.val_loss, self.run_dir.path)

    def _loop(self, bar: Progress, signals: runs.StopSignals) -> None:
        """Search steps until the budget is spent or a signal asks to stop."""
        settings = self.settings
        while not self._budget_spent() and not signals.requested:
            theta_batch = self.streams["theta"].next().to(self.device)
            alpha_batch = self.streams["alpha"].next().to(self.device)
            lr = self.darts.theta_lr()
            theta_loss, alpha_loss = self.darts.step(theta_batch, alpha_batch)
            self.recent_losses.append(theta_loss)
            tokens = theta_batch.num_tokens + alpha_batch.num_tokens
            self.log.append("step", self.steps, theta_loss=theta_loss, alpha_loss=alpha_loss, lr=lr, tokens=tokens)
            if self.steps % settings.eval_interval == 0:
                self._evaluate()
            if self.steps % settings.checkpoint_interval == 0:
                self._save()
            bar.update(
                tokens, theta_loss, lr, alpha_loss=f"{alpha_loss:.3f}", arch=short_summary(self.model.genotype())
            )

    def _budget_spent(self) -> bool:
        settings = self.settings
        if settings.max_steps is not None and self.steps >= settings.max_steps:
            return True
        return settings.max_minutes is not None and self.clock.seconds() >= 60.0 * settings.max_minutes

    def _evaluate(self) -> Genotype:
        """Write genotype.json, the alpha history line, the heatmap and an "eval" log record."""
        step, weights, genotype = self.steps, self.model.arch_weights(), self.model.genotype()
        genotype.save(self.run_dir / GENOTYPE_FILE)
        self.history.append("alpha", step, **weights)
        plot_alpha_history(self.history.read(), self.config, self.run_dir / HEATMAP_FILE)
        ops = argmax_ops(weights, self.config)
        recent = sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None
        record: dict[str, Any] = {
            "train_loss": recent,
            "argmax_stability": argmax_stability(self.last_ops, ops),
            "genotype": genotype.summary(),
            "peak_memory_bytes": peak_memory(self.device),
            "elapsed_s": round(self.clock.seconds(), 3),
        }
        self.last_ops, self.last_eval_step, self.recent_losses = ops, step, []
        if self.valid_batches is not None:
            settings = self.settings
            scores = runs.evaluate_loss(
                self.model, self.valid_batches, self.config.pad_id, settings.label_smoothing, self.device, settings.bf16
            )
            self.val_loss = scores["loss"]
            record.update(val_loss=scores["loss"], val_nll=scores["nll"])
        message = collapse_message(ops)
        self.log.append("eval", step, **record, collapse=message is not None)
        if message is not None:
            warnings.warn(message, stacklevel=3)
            self.log.append("warning", step, message=message)
        return genotype

    def _save(self) -> None:
        save_checkpoint(
            self.run_dir.checkpoint,
            {
                "kind": "search",
                "searcher": self.darts.state_dict(),
                "streams": {name: stream.state() for name, stream in self.streams.items()},
                "rng": rng_state(),
                "elapsed_s": self.clock.seconds(),
                "recent_losses": list(self.recent_losses),
                "settings": self.settings.to_dict(),
                "config": self.config.to_dict(),
                "vocab_size": self.data.tokenizer.vocab_size,
                "tokenizer": self.data.tokenizer.to_bytes(),
                "data": self.data.identity(),
            },
        )

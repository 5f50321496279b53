"""DARTS search on the reversible supernet (DESIGN.md 1.1): the engine behind ``mdarts search``.

:func:`run_search` trains a :class:`~mdarts.model.Supernet` on a training corpus split into two
disjoint parts: the weights theta on the first (``split_ratio`` of the pairs), the architecture
logits alpha on the rest, alternating one theta step and one alpha step, both on the
label-smoothed cross-entropy. The alpha gradient is first-order (dL_alpha_part/dalpha at the
current weights) or, with ``second_order``, the unrolled gradient of DARTS (Liu et al. 2019)::

    w' = w - xi * dL_train(w, alpha)/dw
    g  = dL_val(w', alpha)/dalpha - xi * [dL_train(w+, alpha)/dalpha - dL_train(w-, alpha)/dalpha] / (2 eps)
    w+- = w +- eps * dL_val(w', alpha)/dw',   eps = 0.01 / ||dL_val(w', alpha)/dw'||

computed on parameter dictionaries with ``torch.func.functional_call`` (the model is never
copied; see :func:`unrolled_arch_gradients`).

An output directory receives, at every evaluation: ``genotype.json``, one line of
``alpha_history.jsonl``, ``alpha_heatmap.png``; every step and evaluation is a JSON line of
``search_log.jsonl``; ``search_checkpoint.pt`` every ``checkpoint_interval`` steps and at the
end, from which ``resume=True`` continues exactly (same losses and alphas as a run that was
never interrupted).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .batching import Batch, TokenBatches
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import DictFields, SearchConfig
from .genotype import Genotype
from .loss import label_smoothed_loss
from .memory import peak_memory
from .model import Supernet
from .prepare import EncodedSplit, PreparedData
from .progress import Progress

CHECKPOINT_FILE = "search_checkpoint.pt"
GENOTYPE_FILE = "genotype.json"
HISTORY_FILE = "alpha_history.jsonl"
HEATMAP_FILE = "alpha_heatmap.png"
LOG_FILE = "search_log.jsonl"
RUN_FILES = (CHECKPOINT_FILE, GENOTYPE_FILE, HISTORY_FILE, HEATMAP_FILE, LOG_FILE)
COLLAPSE_OPS = ("zero", "identity")

# settings that may change when a run is resumed (budgets and reporting); the others must match
RESUMABLE_CHANGES = ("max_steps", "max_minutes", "eval_interval", "checkpoint_interval", "device")

LossFn = Callable[[nn.Module, Any], Tensor]


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SearchSettings(DictFields):
    """How to search (the supernet itself is a :class:`~mdarts.config.SearchConfig`).

    Budget (at least one): max_steps: search steps (one theta and one alpha update each);
    max_minutes: wall-clock minutes, counted over all resumed parts of a run, checked after
    every step.
    Theta: lr: peak learning rate of Adam(betas) reached after warmup_steps (linear warm-up,
    then inverse square root decay); clip_norm: gradient-norm clipping (L2 over all weights).
    Alpha: alpha_lr (fixed), alpha_betas, alpha_weight_decay (Adam's L2 term).
    Data: split_ratio: fraction of the training pairs for theta (the rest, disjoint, for
    alpha; the split is drawn from ``seed``); max_tokens: batch size in padded positions
    (batch * max(src_len, tgt_len)); label_smoothing of both losses.
    Reporting: eval_interval: steps between evaluations (genotype, alpha history, heatmap,
    validation loss); checkpoint_interval: steps between checkpoints.
    second_order: unrolled DARTS; unrolled_lr: its xi (None: the current theta lr).
    bf16: bfloat16 autocast for forward passes (first-order only); seed: model
    initialisation, data split and batch order; device: "cpu", "cuda", "cuda:N" or "auto".
    """

    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 10_000
    clip_norm: float = 1.0
    alpha_lr: float = 3e-4
    alpha_betas: tuple[float, float] = (0.9, 0.98)
    alpha_weight_decay: float = 1e-3
    split_ratio: float = 0.55
    max_tokens: int = 4096
    label_smoothing: float = 0.1
    eval_interval: int = 500
    checkpoint_interval: int = 1000
    second_order: bool = False
    unrolled_lr: Optional[float] = None
    bf16: bool = False
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "alpha_betas", tuple(self.alpha_betas))
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("SearchSettings.max_steps: give a budget, max_steps and/or max_minutes")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"SearchSettings.max_steps: expected a positive number of steps, got {self.max_steps!r}")
        if self.max_minutes is not None and not (self.max_minutes > 0 and math.isfinite(self.max_minutes)):
            raise ValueError(f"SearchSettings.max_minutes: expected a positive number of minutes, got {self.max_minutes!r}")
        for name in ("warmup_steps", "max_tokens", "eval_interval", "checkpoint_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SearchSettings.{name}: expected a positive integer, got {value!r}")
        for name in ("lr", "alpha_lr", "clip_norm"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SearchSettings.{name}: expected a positive number, got {value!r}")
        if self.unrolled_lr is not None and not (self.unrolled_lr >= 0 and math.isfinite(self.unrolled_lr)):
            raise ValueError(f"SearchSettings.unrolled_lr: expected a non-negative number, got {self.unrolled_lr!r}")
        if self.alpha_weight_decay < 0:
            raise ValueError(f"SearchSettings.alpha_weight_decay: expected a non-negative number, got {self.alpha_weight_decay!r}")
        for name in ("betas", "alpha_betas"):
            value = getattr(self, name)
            if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
                raise ValueError(f"SearchSettings.{name}: expected two numbers in [0, 1), got {value!r}")
        if not 0.0 < self.split_ratio < 1.0:
            raise ValueError(f"SearchSettings.split_ratio: expected a fraction strictly between 0 and 1, got {self.split_ratio!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"SearchSettings.label_smoothing: expected a value in [0, 1), got {self.label_smoothing!r}")
        if self.second_order and self.bf16:
            raise ValueError("SearchSettings.bf16: the second-order finite differences need float32; use one of bf16, second_order")
        resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu" / "cuda" / "cuda:N" as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"SearchSettings.device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"SearchSettings.device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"SearchSettings.device: {name!r} requested but CUDA is not available here")
    return device


def inverse_sqrt_lr(step: int, peak: float, warmup_steps: int) -> float:
    """Learning rate of update ``step`` (1-based): peak * min(step / warmup, sqrt(warmup / step))."""
    step = max(step, 1)
    return peak * min(step / warmup_steps, math.sqrt(warmup_steps / step))


# ----------------------------------------------------------------------------- data


def split_corpus(num_pairs: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint index lists (theta part, alpha part) covering range(num_pairs), drawn from ``seed``.

    The theta part holds round(ratio * num_pairs) pairs; each part holds at least one."""
    if num_pairs < 2:
        raise ValueError(f"the training split has {num_pairs} pair(s); the search needs at least 2 (theta and alpha parts)")
    order = list(range(num_pairs))
    random.Random(f"{seed}:theta-alpha-split").shuffle(order)
    cut = min(max(round(ratio * num_pairs), 1), num_pairs - 1)
    return sorted(order[:cut]), sorted(order[cut:])


class BatchStream:
    """Endless batches over some pairs of a split, epoch after epoch, resumable.

    Batch order is a function of (seed, epoch) (see :class:`~mdarts.batching.TokenBatches`),
    so :meth:`state` (epoch, position in it) is all a resumed run needs."""

    def __init__(self, split: EncodedSplit, indices: Sequence[int], max_tokens: int, seed: int, config: SearchConfig, name: str) -> None:
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


# ----------------------------------------------------------------------------- losses and steps


def _set_grads(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> None:
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else g.to(p.dtype)


def _rng_get(device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _rng_set(device: torch.device, state: tuple[Tensor, Optional[Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _LossAndGrads(nn.Module):
    """Loss and gradients of ``model`` in one call, for ``torch.func.functional_call``.

    The backward runs inside the call, so the tensors functional_call put in place of the
    parameters are still there when the reversible layers recompute their ops."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any, wrt: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        loss = self.loss_fn(self.model, batch)
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        return loss.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


def loss_and_grads(
    model: nn.Module, loss_fn: LossFn, tensors: dict[str, Tensor], batch: Any, wrt: Sequence[str]
) -> tuple[Tensor, list[Tensor]]:
    """loss_fn(model, batch) with the parameters named in ``tensors`` replaced by those tensors
    (``torch.func.functional_call``, no copy of the model), and its gradient with respect to
    ``tensors[name]`` for each name in ``wrt`` (which must require grad; zeros where unused)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    # every place a parameter is held, each once: a module reached under two names (tied
    # embeddings) must be swapped once, else functional_call fails to restore it (torch
    # restores aliases in forward order); a Parameter held by two modules (the shared
    # alphas) must be swapped in both, hence tie_weights=False with every place listed.
    placed = {}
    for prefix, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if canonical[id(p)] in tensors:
                placed[f"model.{prefix}.{attr}" if prefix else f"model.{attr}"] = tensors[canonical[id(p)]]
    wrapper = _LossAndGrads(model, loss_fn)
    return torch.func.functional_call(wrapper, placed, (batch, [tensors[name] for name in wrt]), tie_weights=False)


def finite_difference_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    params: dict[str, Tensor],
    weight_names: Sequence[str],
    arch_names: Sequence[str],
    vector: Sequence[Tensor],
    batch: Any,
    eps: float,
) -> list[Tensor]:
    """(d^2 L / dalpha dw) v by central differences, one tensor per arch name:

        [dL(w + eps v, alpha)/dalpha - dL(w - eps v, alpha)/dalpha] / (2 eps)

    params: every parameter by name (weights w and arch logits alpha), vector: v, shaped like
    the weights. Both passes start from the same RNG state (same dropout masks), which is
    restored afterwards."""
    device = next(iter(params.values())).device
    start = _rng_get(device)
    arch = {name: params[name].detach().requires_grad_() for name in arch_names}
    results = []
    for sign in (1.0, -1.0):
        _rng_set(device, start)
        moved = {name: params[name].detach() + sign * eps * v for name, v in zip(weight_names, vector)}
        results.append(loss_and_grads(model, loss_fn, {**moved, **arch}, batch, arch_names)[1])
    _rng_set(device, start)
    return [(plus - minus) / (2 * eps) for plus, minus in zip(*results)]


def unrolled_arch_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    weight_names: Sequence[str],
    arch_names: Sequence[str],
    train_batch: Any,
    val_batch: Any,
    xi: float,
) -> tuple[Tensor, list[Tensor]]:
    """Second-order DARTS: (L_val(w', alpha), its unrolled gradient for each arch parameter).

    w' = w - xi dL_train(w, alpha)/dw; gradient = dL_val(w', alpha)/dalpha - xi (d^2 L_train /
    dalpha dw) dL_val(w', alpha)/dw', the last product by :func:`finite_difference_hvp` with
    eps = 0.01 / ||dL_val/dw'||. All passes use ``torch.func.functional_call`` on parameter
    dictionaries; the model's parameters are read, never written. The three train passes
    draw the same dropout masks; the global RNG ends as after one train and one val pass."""
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    weights = {name: params[name].detach() for name in weight_names}
    arch = {name: params[name].detach() for name in arch_names}
    train_rng = _rng_get(device)
    leaves = {name: params[name].detach().requires_grad_() for name in weight_names}
    _, train_grads = loss_and_grads(model, loss_fn, {**leaves, **arch}, train_batch, weight_names)
    unrolled = {name: (weights[name] - xi * g).requires_grad_() for name, g in zip(weight_names, train_grads)}
    arch_leaves = {name: params[name].detach().requires_grad_() for name in arch_names}
    val_loss, val_grads = loss_and_grads(model, loss_fn, {**unrolled, **arch_leaves}, val_batch, [*weight_names, *arch_names])
    dw, da = val_grads[: len(weight_names)], val_grads[len(weight_names) :]
    if xi == 0.0:
        return val_loss, da
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in dw]))
    eps = 0.01 / max(norm.item(), 1e-12)
    after_val = _rng_get(device)
    _rng_set(device, train_rng)
    hvp = finite_difference_hvp(model, loss_fn, {**weights, **arch}, weight_names, arch_names, dw, train_batch, eps)
    _rng_set(device, after_val)
    return val_loss, [g - xi * h for g, h in zip(da, hvp)]


class DartsSearcher:
    """A supernet, its two optimisers and the step counter: one :meth:`step` is one theta
    update on a theta batch, then one alpha update on an alpha batch.

    Each update computes the gradient of its own parameter group only (``torch.autograd.grad``)
    and steps only its own optimiser, so a theta update leaves every alpha bit-identical and
    an alpha update every weight."""

    def __init__(self, model: Supernet, settings: SearchSettings) -> None:
        self.model = model
        self.settings = settings
        self.config = model.config
        self.weights = model.weight_parameters()
        self.arch = model.arch_parameters()
        self.theta_optimizer = torch.optim.Adam(self.weights, lr=settings.lr, betas=settings.betas)
        self.alpha_optimizer = torch.optim.Adam(
            self.arch, lr=settings.alpha_lr, betas=settings.alpha_betas, weight_decay=settings.alpha_weight_decay
        )
        names = {id(p): name for name, p in model.named_parameters()}
        self.weight_names = [names[id(p)] for p in self.weights]
        self.arch_names = [names[id(p)] for p in self.arch]
        self.steps = 0

    def _autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.settings.bf16)

    def _loss(self, model: nn.Module, batch: Batch) -> Tensor:
        with self._autocast(batch.src.device):
            logits = model(batch.src, batch.tgt_in)
        loss, _, ntokens = label_smoothed_loss(logits, batch.tgt_out, self.config.pad_id, self.settings.label_smoothing)
        return loss / max(ntokens, 1)

    def theta_lr(self, step: Optional[int] = None) -> float:
        """Theta learning rate of update ``step`` (default: the next one)."""
        return inverse_sqrt_lr(self.steps + 1 if step is None else step, self.settings.lr, self.settings.warmup_steps)

    def theta_step(self, batch: Batch) -> float:
        """One Adam update of the weights on ``batch`` (device tensors), clipped; returns the loss."""
        self.model.train()
        lr = self.theta_lr()
        for group in self.theta_optimizer.param_groups:
            group["lr"] = lr
        loss = self._loss(self.model, batch)
        _set_grads(self.weights, torch.autograd.grad(loss, self.weights, allow_unused=True))
        torch.nn.utils.clip_grad_norm_(self.weights, self.settings.clip_norm)
        self.theta_optimizer.step()
        self.theta_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def alpha_step(self, batch: Batch, train_batch: Optional[Batch] = None) -> float:
        """One Adam update of the architecture logits on ``batch`` (alpha part); returns its loss.

        Second-order settings need ``train_batch`` (a theta-part batch) for the unrolled step."""
        self.model.train()
        if self.settings.second_order:
            if train_batch is None:
                raise ValueError("alpha_step: second-order DARTS needs the theta batch (train_batch)")
            xi = self.theta_lr(max(self.steps, 1)) if self.settings.unrolled_lr is None else self.settings.unrolled_lr
            loss, grads = unrolled_arch_gradients(
                self.model, self._loss, self.weight_names, self.arch_names, train_batch, batch, xi
            )
        else:
            loss = self._loss(self.model, batch)
            grads = torch.autograd.grad(loss, self.arch, allow_unused=True)
        _set_grads(self.arch, grads)
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def step(self, theta_batch: Batch, alpha_batch: Batch) -> tuple[float, float]:
        """One search step: theta update, then alpha update; returns (theta loss, alpha loss)."""
        theta_loss = self.theta_step(theta_batch)
        alpha_loss = self.alpha_step(alpha_batch, theta_batch)
        self.steps += 1
        return theta_loss, alpha_loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "theta_optimizer": self.theta_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.theta_optimizer.load_state_dict(state["theta_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.steps = state["steps"]


@torch.no_grad()
def evaluate_loss(model: nn.Module, split: EncodedSplit, config: SearchConfig, max_tokens: int, smoothing: float, device: torch.device) -> dict[str, float]:
    """Per-token label-smoothed loss and NLL (nats) of ``split`` in eval mode (no dropout)."""
    model.eval()
    batches = TokenBatches(split.src_ids, split.tgt_ids, max_tokens, shuffle=False, max_positions=config.max_positions, pad_id=config.pad_id)
    total = nll = 0.0
    tokens = 0
    for batch in batches:
        batch = batch.to(device)
        loss, nll_sum, ntokens = label_smoothed_loss(model(batch.src, batch.tgt_in), batch.tgt_out, config.pad_id, smoothing)
        total, nll, tokens = total + loss.item(), nll + nll_sum.item(), tokens + ntokens
    model.train()
    return {"loss": total / max(tokens, 1), "nll": nll / max(tokens, 1)}


# ----------------------------------------------------------------------------- reporting


def argmax_ops(weights: dict[str, list[list[list[float]]]], config: SearchConfig) -> list[str]:
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


def plot_alpha_history(history: Sequence[dict], config: SearchConfig, path: Path) -> None:
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
    weights = [p for record in history for side in ("encoder", "decoder") for layer in record[side] for node in layer for p in node]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the records of steps after ``last_step`` (written after the checkpoint a resume starts from)."""
    if path.is_file():
        kept = [r for r in _read_jsonl(path) if r.get("step", 0) <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------- the run


@dataclass
class SearchResult:
    """What a search produced: the genotype, the steps done in all, the peak memory (bytes;
    CUDA max allocated or CPU peak resident set), the last validation loss (None without a
    "val" split) and the output paths."""

    genotype: Genotype
    steps: int
    peak_memory_bytes: int
    val_loss: Optional[float]
    out_dir: Path
    genotype_path: Path
    history_path: Path
    heatmap_path: Path
    log_path: Path
    checkpoint_path: Path


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory that holds another run unless ``resume`` or ``overwrite``;
    with ``overwrite``, delete that run's files (only those). Nothing is written otherwise."""
    if resume and overwrite:
        raise ValueError("run_search: resume and overwrite exclude each other")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output path {out_dir} exists and is not a directory")
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if resume:
        if not (out_dir / CHECKPOINT_FILE).is_file():
            raise FileNotFoundError(f"nothing to resume: {out_dir / CHECKPOINT_FILE} does not exist")
    elif present:
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} holds another search run ({', '.join(present)}); resume it, pass overwrite, or choose another directory"
            )
        for name in present:
            (out_dir / name).unlink()


class _Run:
    """One invocation of :func:`run_search`: state, outputs and the evaluation routine."""

    def __init__(self, config: SearchConfig, data: PreparedData, settings: SearchSettings, out_dir: Path, device: torch.device) -> None:
        self.config, self.data, self.settings, self.out_dir, self.device = config, data, settings, out_dir, device
        self.paths = {name: out_dir / name for name in RUN_FILES}
        self.last_ops: Optional[list[str]] = None
        self.last_eval_step = -1
        self.val_loss: Optional[float] = None

    def log(self, record: dict) -> None:
        _append_jsonl(self.paths[LOG_FILE], record)

    def evaluate(self, searcher: DartsSearcher, recent_loss: Optional[float], elapsed_s: float) -> Genotype:
        """Write genotype.json, the alpha history line, the heatmap and an "eval" log record."""
        model, step = searcher.model, searcher.steps
        weights = model.arch_weights()
        genotype = model.genotype()
        genotype.save(self.paths[GENOTYPE_FILE])
        _append_jsonl(self.paths[HISTORY_FILE], {"step": step, **weights})
        plot_alpha_history(_read_jsonl(self.paths[HISTORY_FILE]), self.config, self.paths[HEATMAP_FILE])
        ops = argmax_ops(weights, self.config)
        stability = argmax_stability(self.last_ops, ops)
        self.last_ops, self.last_eval_step = ops, step
        record: dict[str, Any] = {
            "event": "eval",
            "step": step,
            "train_loss": recent_loss,
            "argmax_stability": stability,
            "genotype": genotype.summary(),
            "peak_memory_bytes": peak_memory(self.device),
            "elapsed_s": round(elapsed_s, 3),
        }
        if "val" in self.data.splits:
            scores = evaluate_loss(model, self.data["val"], self.config, self.settings.max_tokens, self.settings.label_smoothing, self.device)
            self.val_loss = scores["loss"]
            record.update(val_loss=scores["loss"], val_nll=scores["nll"])
        message = collapse_message(ops)
        record["collapse"] = message is not None
        self.log(record)
        if message is not None:
            warnings.warn(message, stacklevel=3)
            self.log({"event": "warning", "step": step, "message": message})
        return genotype


def run_search(
    config: SearchConfig,
    data: PreparedData,
    settings: SearchSettings,
    out_dir: Any,
    resume: bool = False,
    overwrite: bool = False,
    progress: Optional[bool] = None,
) -> SearchResult:
    """Search an architecture: first- (or second-) order DARTS on ``data["train"]``.

    Args:
        config: the supernet (its ``memory_mode`` is used as is).
        data: the tokenizer and encoded splits; "train" is required, "val" (optional) is
            scored at every evaluation.
        settings: optimisers, budget and reporting, see :class:`SearchSettings`.
        out_dir: the run directory (created). One holding another run is refused
            (FileExistsError) unless ``resume`` (continue from its checkpoint, exactly) or
            ``overwrite`` (delete that run's files first).
        progress: show the progress bar (None: when stderr is a terminal).

    Returns:
        :class:`SearchResult`. Stops when ``settings.max_steps`` steps are done in all or
        ``settings.max_minutes`` have passed, writing a final checkpoint and evaluation.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume, overwrite)
    device = resolve_device(settings.device)
    checkpoint = load_checkpoint(out_dir / CHECKPOINT_FILE, kind="search") if resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, config, data, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    train = data["train"]
    theta_idx, alpha_idx = split_corpus(len(train), settings.split_ratio, settings.seed)
    streams = {
        "theta": BatchStream(train, theta_idx, settings.max_tokens, settings.seed, config, "theta"),
        "alpha": BatchStream(train, alpha_idx, settings.max_tokens, settings.seed + 1, config, "alpha"),
    }
    _seed_everything(settings.seed)
    model = Supernet(config, data.tokenizer.vocab_size).to(device)
    searcher = DartsSearcher(model, settings)
    run = _Run(config, data, settings, out_dir, device)
    elapsed_before = 0.0
    if checkpoint is not None:
        searcher.load_state_dict(checkpoint["searcher"])
        for name, stream in streams.items():
            stream.load_state(checkpoint["streams"][name])
        set_rng_state(checkpoint["rng"])
        elapsed_before = checkpoint["elapsed_s"]
        for name in (HISTORY_FILE, LOG_FILE):
            _truncate_jsonl(run.paths[name], searcher.steps)
        history = _read_jsonl(run.paths[HISTORY_FILE])
        if history:
            run.last_ops, run.last_eval_step = argmax_ops(history[-1], config), history[-1]["step"]
        run.log({"event": "resume", "step": searcher.steps, "settings": settings.to_dict()})
    else:
        run.log({
            "event": "start", "step": 0, "settings": settings.to_dict(), "config": config.to_dict(),
            "theta_pairs": len(theta_idx), "alpha_pairs": len(alpha_idx),
            "parameters": model.num_parameters(), "device": str(device),
        })

    started = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def save() -> None:
        save_checkpoint(run.paths[CHECKPOINT_FILE], {
            "kind": "search",
            "searcher": searcher.state_dict(),
            "streams": {name: stream.state() for name, stream in streams.items()},
            "rng": rng_state(),
            "elapsed_s": elapsed(),
            "settings": settings.to_dict(),
            "config": config.to_dict(),
            "vocab_size": data.tokenizer.vocab_size,
            "tokenizer": data.tokenizer.to_bytes(),
        })

    bar = Progress(settings.max_steps, "search", device, initial=searcher.steps, enabled=progress)
    recent: list[float] = []
    try:
        while not _budget_spent(settings, searcher.steps, elapsed()):
            theta_batch = streams["theta"].next().to(device)
            alpha_batch = streams["alpha"].next().to(device)
            lr = searcher.theta_lr()
            theta_loss, alpha_loss = searcher.step(theta_batch, alpha_batch)
            recent.append(theta_loss)
            run.log({
                "event": "step", "step": searcher.steps, "theta_loss": theta_loss, "alpha_loss": alpha_loss,
                "lr": lr, "tokens": theta_batch.num_tokens + alpha_batch.num_tokens,
            })
            if searcher.steps % settings.eval_interval == 0:
                run.evaluate(searcher, sum(recent) / len(recent), elapsed())
                recent = []
            if searcher.steps % settings.checkpoint_interval == 0:
                save()
            bar.update(
                theta_batch.num_tokens + alpha_batch.num_tokens, theta_loss, lr,
                alpha_loss=f"{alpha_loss:.3f}", arch=short_summary(model.genotype()),
            )
    finally:
        bar.close()
    if run.last_eval_step != searcher.steps:
        run.evaluate(searcher, sum(recent) / len(recent) if recent else None, elapsed())
    save()
    genotype = Genotype.load(run.paths[GENOTYPE_FILE])
    peak = peak_memory(device)
    run.log({
        "event": "end", "step": searcher.steps, "elapsed_s": round(elapsed(), 3), "peak_memory_bytes": peak,
        "tokens_per_s": bar.tokens_per_second(), "genotype": genotype.summary(),
    })
    return SearchResult(
        genotype=genotype,
        steps=searcher.steps,
        peak_memory_bytes=peak,
        val_loss=run.val_loss,
        out_dir=out_dir,
        genotype_path=run.paths[GENOTYPE_FILE],
        history_path=run.paths[HISTORY_FILE],
        heatmap_path=run.paths[HEATMAP_FILE],
        log_path=run.paths[LOG_FILE],
        checkpoint_path=run.paths[CHECKPOINT_FILE],
    )


def _budget_spent(settings: SearchSettings, steps: int, elapsed_s: float) -> bool:
    if settings.max_steps is not None and steps >= settings.max_steps:
        return True
    return settings.max_minutes is not None and elapsed_s >= 60.0 * settings.max_minutes


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_resumable(checkpoint: dict, config: SearchConfig, data: PreparedData, settings: SearchSettings) -> None:
    """A resume must use the checkpoint's config, tokenizer and settings (budgets may change)."""
    if checkpoint["config"] != config.to_dict():
        changed = sorted(k for k, v in config.to_dict().items() if checkpoint["config"].get(k) != v)
        raise ValueError(f"cannot resume: the search config differs from the checkpoint's in {', '.join(changed)}")
    if checkpoint["tokenizer"] != data.tokenizer.to_bytes():
        raise ValueError("cannot resume: the data was prepared with another tokenizer than the checkpoint's")
    saved = SearchSettings.from_dict(checkpoint["settings"]).to_dict()
    changed = sorted(k for k, v in settings.to_dict().items() if k not in RESUMABLE_CHANGES and saved[k] != v)
    if changed:
        raise ValueError(f"cannot resume: setting(s) {', '.join(changed)} differ from the checkpoint's (only {', '.join(RESUMABLE_CHANGES)} may change)")

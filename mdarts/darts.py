"""The DARTS updates of a supernet (docs/design.md 1.1): one weight (theta) step, then one
architecture (alpha) step, each on its own part of the training data.

The alpha gradient is first-order (dL_alpha_part/dalpha at the current weights) or, with
``second_order``, the unrolled gradient of DARTS (Liu et al. 2019)::

    w' = w - xi * dL_train(w, alpha)/dw
    g  = dL_val(w', alpha)/dalpha - xi * [dL_train(w+, alpha)/dalpha - dL_train(w-, alpha)/dalpha] / (2 eps)
    w+- = w +- eps * dL_val(w', alpha)/dw',   eps = 0.01 / ||dL_val(w', alpha)/dw'||

computed on parameter dictionaries with ``torch.func.functional_call`` (the model is never
copied; see :func:`unrolled_arch_gradients`). The run around these steps (data, budget,
logs, checkpoints) is :class:`mdarts.search.Searcher`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .batching import Batch
from .config import SearchSettings
from .loss import sequence_loss
from .model import Supernet
from .reduction import BucketedReduce
from .runs import ONE_PROCESS, Ranks, inverse_sqrt_lr

LossFn = Callable[[nn.Module, Any], Tensor]


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
    val_loss, val_grads = loss_and_grads(
        model, loss_fn, {**unrolled, **arch_leaves}, val_batch, [*weight_names, *arch_names]
    )
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


@dataclass(frozen=True)
class Schedule:
    """The budget-relative schedule of a search of ``steps`` steps (docs/design.md 1.1).

    The weights warm up over ``warmup_steps`` (then decay as 1/sqrt(step)); alpha is frozen
    until step ``alpha_start`` (1-based), then updated once a step at the fixed ``alpha_lr``.
    Adam moves a logit by about its learning rate per step while the gradient keeps its sign,
    so over the ``steps - alpha_start + 1`` alpha steps a logit can travel about
    ``alpha_travel``: alpha_lr = alpha_travel / alpha steps. (The paper's 3e-4 over 60,000
    steps allows 18; over 200 steps it allows 0.06, which leaves every weight near uniform.)
    """

    steps: int
    warmup_steps: int
    alpha_start: int
    alpha_lr: float

    @classmethod
    def plan(cls, settings: SearchSettings, steps: int) -> "Schedule":
        """The schedule of ``settings`` for a budget of ``steps`` search steps."""
        warmup = settings.warmup_steps or max(1, round(settings.warmup_fraction * steps))
        alpha_start = round(settings.weights_only_fraction * steps) + 1
        alpha_lr = settings.alpha_lr or settings.alpha_travel / max(1, steps - alpha_start + 1)
        return cls(steps, warmup, alpha_start, alpha_lr)

    def shrinks_due(self, step: int, stages: int) -> int:
        """How many of the ``stages`` boundaries of progressive shrinking step ``step`` has passed:
        they cut the alpha phase into stages + 1 equal parts."""
        alpha_steps = max(1, self.steps - self.alpha_start + 1)
        return min(stages, max(0, (step - self.alpha_start + 1) * (stages + 1) // alpha_steps))

    def check(self, settings: SearchSettings) -> None:
        """ValueError when the budget is too short for the phases: no architecture step left
        after the weights-only phase."""
        if self.alpha_start > self.steps:
            need = math.floor(1 / max(1e-9, 1 - settings.weights_only_fraction)) + 1
            raise ValueError(
                f"--max-steps / --max-minutes: a budget of {self.steps} steps leaves no architecture step after the "
                f"weights-only phase ({settings.weights_only_fraction:.0%} of it); give at least {need} steps or a "
                "smaller --weights-only-fraction"
            )


class DartsSearcher:
    """A supernet, its two optimisers, the schedule and the step counter: one :meth:`step` is one
    theta update on a theta batch, then (from ``schedule.alpha_start`` on) one alpha update on an
    alpha batch.

    Each update computes the gradient of its own parameter group only (``inputs=`` of the
    backward, ``torch.autograd.grad``) and steps only its own optimiser, so a theta update
    leaves every alpha bit-identical and an alpha update every weight. The first-order alpha
    update runs with the weights frozen (no weight gradient is computed, not even inside the
    reversible layers' backward) and, unless ``alpha_dropout``, in eval mode (no dropout)."""

    def __init__(
        self, model: Supernet, settings: SearchSettings, schedule: Schedule, ranks: Ranks = ONE_PROCESS
    ) -> None:
        if settings.second_order and ranks.world_size > 1:
            raise ValueError(
                "--second-order: the unrolled step runs in one process; use first-order DARTS with torchrun"
            )
        self.model = model
        self.settings = settings
        self.schedule = schedule
        self.ranks = ranks
        self.config = model.config
        self.weights = [p for p in model.weight_parameters() if p.requires_grad]
        self.arch = model.arch_parameters()
        self.theta_optimizer = torch.optim.Adam(self.weights, lr=settings.lr, betas=settings.betas)
        self.weight_reduce = BucketedReduce(self.weights, ranks)
        self.alpha_optimizer = torch.optim.Adam(
            self.arch, lr=schedule.alpha_lr, betas=settings.alpha_betas, weight_decay=settings.alpha_weight_decay
        )
        names = {id(p): name for name, p in model.named_parameters()}
        self.weight_names = [names[id(p)] for p in self.weights]
        self.arch_names = [names[id(p)] for p in self.arch]
        self.steps = 0
        self.shrinks = 0  # shrinking stages done (settings.shrink_to)

    def reschedule(self, schedule: Schedule) -> None:
        """Continue under ``schedule`` (the plan of a minutes budget, once the step time is known)."""
        self.schedule = schedule
        for group in self.alpha_optimizer.param_groups:
            group["lr"] = schedule.alpha_lr

    def _autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.settings.bf16)

    def _loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The label-smoothed loss of ``batch`` summed, over the target tokens of the step in all
        processes: the processes' gradients sum to the gradient of the whole step. The output
        layer and loss run in blocks of ``settings.loss_chunk_rows`` tokens, in float32."""
        settings = self.settings
        loss, _, ntokens = sequence_loss(
            model,
            batch.src,
            batch.tgt_in,
            batch.tgt_out,
            settings.label_smoothing,
            settings.loss_chunk_rows,
            settings.bf16,
        )
        (all_tokens,) = self.ranks.sum([float(ntokens)])
        return loss / max(all_tokens, 1)

    def theta_lr(self, step: Optional[int] = None) -> float:
        """Theta learning rate of update ``step`` (default: the next one)."""
        return inverse_sqrt_lr(self.steps + 1 if step is None else step, self.settings.lr, self.schedule.warmup_steps)

    def alpha_active(self, step: Optional[int] = None) -> bool:
        """Whether search step ``step`` (default: the next one) updates alpha."""
        return (self.steps + 1 if step is None else step) >= self.schedule.alpha_start

    def weight_gradients(self, batch: Batch) -> Tensor:
        """The weights' gradients of the loss of ``batch`` in their ``.grad`` (zeros for weights
        the step did not use), summed over the processes while the backward runs; the loss."""
        loss = self._loss(self.model, batch)
        self.weight_reduce.start()
        torch.autograd.backward(loss, inputs=self.weights)  # accumulates: the reduction's hooks see it
        self.weight_reduce.finish()
        _set_grads(self.weights, [p.grad for p in self.weights])
        return loss

    def theta_step(self, batch: Batch) -> float:
        """One Adam update of the weights on ``batch`` (device tensors), clipped; returns the loss."""
        self.model.train()
        lr = self.theta_lr()
        for group in self.theta_optimizer.param_groups:
            group["lr"] = lr
        loss = self.weight_gradients(batch)
        torch.nn.utils.clip_grad_norm_(self.weights, self.settings.clip_norm)
        self.theta_optimizer.step()
        self.theta_optimizer.zero_grad(set_to_none=True)
        return self.ranks.sum([loss.item()])[0]

    def alpha_step(self, batch: Batch, train_batch: Optional[Batch] = None) -> float:
        """One Adam update of the architecture logits on ``batch`` (alpha part); returns its loss.

        Second-order settings need ``train_batch`` (a theta-part batch) for the unrolled step."""
        self.model.train(self.settings.alpha_dropout)
        try:
            if self.settings.second_order:
                if train_batch is None:
                    raise ValueError("alpha_step: second-order DARTS needs the theta batch (train_batch)")
                xi = (
                    self.theta_lr(max(self.steps, 1))
                    if self.settings.unrolled_lr is None
                    else self.settings.unrolled_lr
                )
                loss, grads = unrolled_arch_gradients(
                    self.model, self._loss, self.weight_names, self.arch_names, train_batch, batch, xi
                )
            else:
                with _frozen(self.weights):
                    loss = self._loss(self.model, batch)
                    grads = torch.autograd.grad(loss, self.arch, allow_unused=True)
        finally:
            self.model.train()
        _set_grads(self.arch, grads)
        self.ranks.reduce([p.grad for p in self.arch])
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        return self.ranks.sum([loss.item()])[0]

    def step(self, theta_batch: Batch, alpha_batch: Optional[Batch]) -> tuple[float, Optional[float]]:
        """One search step: theta update, then the alpha update when ``alpha_batch`` is given
        (see :meth:`alpha_active`); returns (theta loss, alpha loss or None)."""
        theta_loss = self.theta_step(theta_batch)
        alpha_loss = None if alpha_batch is None else self.alpha_step(alpha_batch, theta_batch)
        self.steps += 1
        keep = self.settings.shrink_to
        while self.shrinks < self.schedule.shrinks_due(self.steps, len(keep)):
            self.model.shrink(keep[self.shrinks])
            self.shrinks += 1
        return theta_loss, alpha_loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "theta_optimizer": self.theta_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "steps": self.steps,
            "shrinks": self.shrinks,
            "dropped": [list(dropped) for dropped in self.model.dropped],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.theta_optimizer.load_state_dict(state["theta_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.steps = state["steps"]
        self.shrinks = state.get("shrinks", 0)  # checkpoints from before progressive shrinking lack both
        self.model.set_dropped(state.get("dropped", [[] for _ in self.model.dropped]))


@contextlib.contextmanager
def _frozen(parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within: ``parameters`` do not require grad, so autograd computes no gradient for them."""
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)

"""The ``darts`` supernet method (docs/design.md 1.1): one weight (theta) step, then one
architecture (alpha) step, each on its own part of the training data.

The alpha gradient is first-order (dL_alpha_part/dalpha at the current weights) or, with
``second_order``, the unrolled gradient of DARTS (Liu et al. 2019)::

    w' = w - xi * dL_train(w, alpha)/dw
    g  = dL_val(w', alpha)/dalpha - xi * [dL_train(w+, alpha)/dalpha - dL_train(w-, alpha)/dalpha] / (2 eps)
    w+- = w +- eps * dL_val(w', alpha)/dw',   eps = 0.01 / ||dL_val(w', alpha)/dw'||

computed on parameter dictionaries with ``torch.func.functional_call`` (the model is never
copied; see :func:`unrolled_arch_gradients`). The run around these steps (data, budget,
logs, checkpoints) is :class:`mdarts.search.Searcher`; the genotype is chosen afterwards by a
selector (:mod:`mdarts.search.parts`).
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..batching import Batch
from ..config import SearchSettings, Settings, setting
from ..model import Supernet, iter_nodes, masked_softmax
from ..processes import ONE_PROCESS, Ranks
from .parts import METHODS
from .weights import Schedule, WeightTraining, set_grads

LossFn = Callable[[nn.Module, Any], Tensor]


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
class DartsSettings(Settings):
    """How ``--method darts`` trains the architecture logits (docs/design.md 1.1)."""

    weights_only_fraction: float = setting(
        0.3, "first fraction of the budget in which only the weights train, alpha frozen (as PC-DARTS does)"
    )
    alpha_lr: Optional[float] = setting(None, "fixed learning rate of alpha (none: alpha_travel / the alpha steps)")
    alpha_travel: float = setting(
        3.0,
        "logit distance Adam can move a logit over the alpha phase if its gradient keeps its sign (one alpha_lr a "
        "step); sets alpha_lr. 3 lets one op of 13 reach 0.6 against uniform 0.08",
    )
    alpha_betas: tuple[float, float] = setting((0.5, 0.999), "Adam betas of the architecture logits (DARTS's)")
    alpha_weight_decay: float = setting(1e-3, "Adam's L2 term on the architecture logits")
    alpha_dropout: bool = setting(False, "dropout on in the architecture step (off: alpha sees the evaluated network)")
    shrink_to: tuple[int, ...] = setting(
        (),
        "progressive shrinking (P-DARTS): the alpha phase is cut into len + 1 equal stages and after stage i every "
        "node keeps only its shrink_to[i] best candidates, the only ones computed from then on (none: off)",
    )
    param_cost: float = setting(
        0.0,
        "weight of the parameter cost in the architecture loss: per node the expected parameter count of its op under "
        "softmax(alpha) over the mean of its candidates', averaged over the nodes (0: off). The retrain spends a fixed "
        "parameter budget, so an op's parameters cost the network width (as latency terms do in ProxylessNAS, FBNet)",
    )
    second_order: bool = setting(False, "unrolled (second-order) DARTS")
    unrolled_lr: Optional[float] = setting(None, "xi of the unrolled step (none: the current weight learning rate)")

    def __post_init__(self) -> None:
        self._check_positive(("alpha_lr",), optional=True)
        self._check_positive(("alpha_travel",))
        self._check_fraction(("weights_only_fraction",))
        self._check_positive(("unrolled_lr",), optional=True, zero=True)
        self._check_positive(("alpha_weight_decay", "param_cost"), zero=True)
        self._check_betas(("alpha_betas",))
        object.__setattr__(self, "shrink_to", tuple(self.shrink_to))
        keep = self.shrink_to
        if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in keep) or any(
            a <= b for a, b in zip(keep, keep[1:])
        ):
            self._fail("shrink_to", "candidate counts >= 1 in decreasing order")

    def schedule(self, run: SearchSettings, steps: int) -> Schedule:
        """The schedule of a budget of ``steps`` search steps. Adam moves a logit by about its
        learning rate per step while the gradient keeps its sign, so over the ``steps -
        alpha_start + 1`` alpha steps a logit can travel about ``alpha_travel``: alpha_lr =
        alpha_travel / alpha steps. (The paper's 3e-4 over 60,000 steps allows 18; over 200
        steps it allows 0.06, which leaves every weight near uniform.)"""
        warmup = run.warmup_steps or max(1, round(run.warmup_fraction * steps))
        alpha_start = round(self.weights_only_fraction * steps) + 1
        alpha_lr = self.alpha_lr or self.alpha_travel / max(1, steps - alpha_start + 1)
        return Schedule(steps, warmup, alpha_start, alpha_lr)

    def shrinks_due(self, schedule: Schedule, step: int) -> int:
        """How many of the ``len(shrink_to)`` boundaries of progressive shrinking step ``step``
        has passed: they cut the alpha phase into len(shrink_to) + 1 equal parts."""
        stages = len(self.shrink_to)
        alpha_steps = max(1, schedule.steps - schedule.alpha_start + 1)
        return min(stages, max(0, (step - schedule.alpha_start + 1) * (stages + 1) // alpha_steps))

    def check_budget(self, schedule: Schedule) -> None:
        """ValueError when the budget is too short for the phases: no architecture step left
        after the weights-only phase."""
        if schedule.alpha_start > schedule.steps:
            need = math.floor(1 / max(1e-9, 1 - self.weights_only_fraction)) + 1
            raise ValueError(
                f"--max-steps / --max-minutes: a budget of {schedule.steps} steps leaves no architecture step after "
                f"the weights-only phase ({self.weights_only_fraction:.0%} of it); give at least {need} steps or a "
                "smaller --weights-only-fraction"
            )


class DartsSearcher(WeightTraining):
    """``--method darts``: one :meth:`step` is one theta update on a theta batch, then (from
    ``schedule.alpha_start`` on) one alpha update on an alpha batch.

    Each update computes the gradient of its own parameter group only (``inputs=`` of the
    backward, ``torch.autograd.grad``) and steps only its own optimiser, so a theta update
    leaves every alpha bit-identical and an alpha update every weight. The first-order alpha
    update runs with the weights frozen (no weight gradient is computed, not even inside the
    reversible layers' backward) and, unless ``alpha_dropout``, in eval mode (no dropout)."""

    name = "darts"
    Settings = DartsSettings
    trains_alpha = True
    parts = ("theta", "alpha")

    def __init__(
        self, model: Supernet, run: SearchSettings, settings: DartsSettings, ranks: Ranks = ONE_PROCESS
    ) -> None:
        if settings.second_order and ranks.world_size > 1:
            raise ValueError(
                "--second-order: the unrolled step runs in one process; use first-order DARTS with torchrun"
            )
        if settings.second_order and run.bf16:
            raise ValueError("--bf16: the second-order finite differences need float32; use one of bf16, second_order")
        self.settings = settings
        super().__init__(model, run, ranks)
        self.arch = model.arch_parameters()
        self.alpha_optimizer = torch.optim.Adam(
            self.arch, lr=self.schedule.alpha_lr, betas=settings.alpha_betas, weight_decay=settings.alpha_weight_decay
        )
        names = {id(p): name for name, p in model.named_parameters()}
        self.weight_names = [names[id(p)] for p in self.weights]
        self.arch_names = [names[id(p)] for p in self.arch]
        self.shrinks = 0  # shrinking stages done (settings.shrink_to)
        self.op_sizes = relative_op_sizes(model)

    # -- the budget

    def plan(self, steps: int) -> Schedule:
        schedule = self.settings.schedule(self.run, steps)
        self.settings.check_budget(schedule)
        return schedule

    def unplanned(self) -> Schedule:
        """Weights-only steps until the step time is known."""
        return Schedule(0, self.run.warmup_steps or 100, sys.maxsize, self.settings.alpha_lr or 1e-3)

    def steps_for(self, seconds: float, per_step: float) -> int:
        """An alternating step costs about two weights-only steps (those timed so far)."""
        return int(seconds / (per_step * (2.0 - self.settings.weights_only_fraction)))

    def refit(self, per_step: float, seconds_left: float) -> None:
        """Fit the alpha phase to the time left at the steps' measured cost, and spread
        alpha_travel over it."""
        steps = self.steps + max(1, int(seconds_left / per_step))
        schedule = self.schedule
        alpha_lr = self.settings.alpha_lr or self.settings.alpha_travel / (steps - schedule.alpha_start + 1)
        self.reschedule(Schedule(steps, schedule.warmup_steps, schedule.alpha_start, alpha_lr))

    def reschedule(self, schedule: Schedule) -> None:
        self.schedule = schedule
        for group in self.alpha_optimizer.param_groups:
            group["lr"] = schedule.alpha_lr

    # -- the updates

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
        set_grads(self.arch, grads)
        self.ranks.reduce([p.grad for p in self.arch])
        if self.settings.param_cost:  # after the sum over processes: the term is every process's
            cost_grads = torch.autograd.grad(self.settings.param_cost * self.param_cost(), self.arch)
            for p, g in zip(self.arch, cost_grads):
                p.grad += g
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        return self.ranks.sum([loss.item()])[0]

    def param_cost(self) -> Tensor:
        """The parameter cost of the architecture (see ``DartsSettings.param_cost``): the mean over
        the nodes of sum_k softmax(alpha)_k * size_k, size_k the parameter count of candidate k
        over the mean of the node's candidates (:func:`relative_op_sizes`). 1 at uniform weights."""
        model = self.model
        terms = [
            masked_softmax(alpha, dropped) @ sizes.to(alpha.device)
            for alpha, dropped, sizes in zip(self.arch, model.dropped, self.op_sizes)
        ]
        return torch.stack(terms).mean()

    def step(self, next_batch: Callable[[str], Batch]) -> dict[str, Any]:
        """One search step: theta update, then the alpha update when :meth:`alpha_active`, then
        any shrinking due (logged as a "shrink" event)."""
        theta_batch = next_batch("theta")
        alpha_batch = next_batch("alpha") if self.alpha_active() else None
        theta_loss = self.theta_step(theta_batch)
        alpha_loss = None if alpha_batch is None else self.alpha_step(alpha_batch, theta_batch)
        self.steps += 1
        keep, shrinks = self.settings.shrink_to, self.shrinks
        while self.shrinks < self.settings.shrinks_due(self.schedule, self.steps):
            self.model.shrink(keep[self.shrinks])
            self.shrinks += 1
        self.cost_changed = self.steps == self.schedule.alpha_start - 1 or self.shrinks != shrinks
        tokens = theta_batch.num_tokens + (0 if alpha_batch is None else alpha_batch.num_tokens)
        record: dict[str, Any] = {"theta_loss": theta_loss, "alpha_loss": alpha_loss, "tokens": tokens}
        if self.shrinks != shrinks:
            record["events"] = [("shrink", {"keep": keep[self.shrinks - 1], "dropped": self.model.dropped})]
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "shrinks": self.shrinks,
            "dropped": [list(dropped) for dropped in self.model.dropped],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.shrinks = state.get("shrinks", 0)  # checkpoints from before progressive shrinking lack both
        self.model.set_dropped(state.get("dropped", [[] for _ in self.model.dropped]))


def relative_op_sizes(model: Supernet) -> list[Tensor]:
    """Per architecture logit (``model.arch_parameters()`` order): (K,) the parameter count of
    each candidate op of its node (its LayerNorm included; 0 for identity and zero) over the
    mean of the node's candidates."""
    nodes = {}
    for node in iter_nodes(model):
        if node.alpha is not None:
            nodes.setdefault(id(node.alpha), node)
    sizes = []
    for alpha in model.arch_parameters():
        node = nodes[id(alpha)]
        counts = torch.zeros(len(node.candidates))
        for j, k in enumerate(node.parametric):
            counts[k] = sum(p.numel() for p in node.ops[j].parameters()) + 2 * node.ln_weight.shape[1]
        sizes.append(counts / counts.mean().clamp_min(1.0))
    return sizes


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


METHODS.register(DartsSearcher)

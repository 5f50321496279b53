"""What every supernet method shares: the weights' optimiser and update, and the schedule of a
search budget (docs/design.md 1.1).

:class:`WeightTraining` holds the supernet, Adam over its weights (theta), the bucketed
gradient reduction over processes, the step counter and the :class:`Schedule`; a method adds
what its step does (:class:`mdarts.search.darts.DartsSearcher` an architecture update,
:class:`mdarts.search.single_path.SinglePath` a drawn path).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..batching import Batch
from ..config import SearchSettings, inverse_sqrt_lr
from ..loss import sequence_loss
from ..model import Supernet
from ..processes import ONE_PROCESS, Ranks
from ..reduction import BucketedReduce
from .parts import SupernetMethod


def set_grads(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> None:
    """``p.grad = g`` for each pair (zeros where ``g`` is None), in ``p``'s dtype."""
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else g.to(p.dtype)


@dataclass(frozen=True)
class Schedule:
    """The budget-relative schedule of a search of ``steps`` steps (docs/design.md 1.1).

    The weights warm up over ``warmup_steps`` (then decay as 1/sqrt(step)); alpha is frozen
    until step ``alpha_start`` (1-based; ``sys.maxsize``: never trained), then updated once a
    step at the fixed ``alpha_lr``. ``steps`` 0: a minutes budget not yet planned in steps."""

    steps: int
    warmup_steps: int
    alpha_start: int
    alpha_lr: float

    @classmethod
    def weights_only(cls, run: SearchSettings, steps: int) -> "Schedule":
        """A schedule of ``steps`` weight steps and no architecture step (0: not planned yet)."""
        warmup = run.warmup_steps or (max(1, round(run.warmup_fraction * steps)) if steps else 100)
        return cls(steps, warmup, sys.maxsize, 0.0)


class WeightTraining(SupernetMethod):
    """A supernet and Adam over its weights: :meth:`theta_step` is one clipped update on a
    batch, its gradient summed over the processes while the backward runs. A method derived
    from it supplies :meth:`step` and, if its steps change cost, the budget hooks."""

    def __init__(self, model: Supernet, run: SearchSettings, ranks: Ranks = ONE_PROCESS) -> None:
        self.model = model
        self.run = run
        self.ranks = ranks
        self.config = model.config
        self.weights = [p for p in model.weight_parameters() if p.requires_grad]
        self.theta_optimizer = torch.optim.Adam(self.weights, lr=run.lr, betas=run.betas)
        self.weight_reduce = BucketedReduce(self.weights, ranks)
        self.steps = 0
        self.cost_changed = False  # whether the last step changed the cost of the next ones
        self.schedule = self.plan(run.max_steps) if run.max_steps is not None else self.unplanned()

    # -- the budget: planned in steps (a minutes budget once the first steps are timed)

    def plan(self, steps: int) -> Schedule:
        """The schedule of a budget of ``steps`` search steps (ValueError if too short)."""
        return Schedule.weights_only(self.run, steps)

    def unplanned(self) -> Schedule:
        """The schedule of a minutes budget before :meth:`steps_for` has planned it."""
        return Schedule.weights_only(self.run, 0)

    def steps_for(self, seconds: float, per_step: float) -> int:
        """How many search steps fit in ``seconds`` when the steps so far took ``per_step`` each."""
        return int(seconds / per_step)

    def refit(self, per_step: float, seconds_left: float) -> None:
        """Fit the rest of the budget to ``seconds_left`` at ``per_step`` seconds a step (called
        CALIBRATION_STEPS after a step that set :attr:`cost_changed`)."""
        self.reschedule(self.plan(self.steps + max(1, int(seconds_left / per_step))))

    def reschedule(self, schedule: Schedule) -> None:
        """Continue under ``schedule``."""
        self.schedule = schedule

    def alpha_active(self, step: Optional[int] = None) -> bool:
        """Whether search step ``step`` (default: the next one) updates the architecture logits."""
        return (self.steps + 1 if step is None else step) >= self.schedule.alpha_start

    # -- the weights' update

    def _loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The label-smoothed loss of ``batch`` summed, over the target tokens of the step in all
        processes: the processes' gradients sum to the gradient of the whole step. The output
        layer and loss run in blocks of ``loss_chunk_rows`` tokens, in float32."""
        run = self.run
        loss, _, ntokens = sequence_loss(
            model, batch.src, batch.tgt_in, batch.tgt_out, run.label_smoothing, run.loss_chunk_rows, run.bf16
        )
        (all_tokens,) = self.ranks.sum([float(ntokens)])
        return loss / max(all_tokens, 1)

    def theta_lr(self, step: Optional[int] = None) -> float:
        """Theta learning rate of update ``step`` (default: the next one)."""
        return inverse_sqrt_lr(self.steps + 1 if step is None else step, self.run.lr, self.schedule.warmup_steps)

    def weight_gradients(self, batch: Batch) -> Tensor:
        """The weights' gradients of the loss of ``batch`` in their ``.grad`` (zeros for weights
        the step did not use), summed over the processes while the backward runs; the loss."""
        loss = self._loss(self.model, batch)
        self.weight_reduce.start()
        torch.autograd.backward(loss, inputs=self.weights)  # accumulates: the reduction's hooks see it
        self.weight_reduce.finish()
        set_grads(self.weights, [p.grad for p in self.weights])
        return loss

    def theta_step(self, batch: Batch) -> float:
        """One Adam update of the weights on ``batch`` (device tensors), clipped; returns the loss."""
        self.model.train()
        lr = self.theta_lr()
        for group in self.theta_optimizer.param_groups:
            group["lr"] = lr
        loss = self.weight_gradients(batch)
        torch.nn.utils.clip_grad_norm_(self.weights, self.run.clip_norm)
        self.theta_optimizer.step()
        self.theta_optimizer.zero_grad(set_to_none=True)
        return self.ranks.sum([loss.item()])[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "theta_optimizer": self.theta_optimizer.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.theta_optimizer.load_state_dict(state["theta_optimizer"])
        self.steps = state["steps"]

"""The ``gdas`` supernet method (GDAS, Dong and Yang 2019): DARTS's alternation of weight and
architecture steps, but every forward pass computes one path, drawn from softmax(alpha) with
the Gumbel-max trick (:meth:`mdarts.model.Supernet.sample_path`), instead of the whole mixture.

The weights of a node's op are trained only as the discrete network will use them, alone,
never beside the neighbours a mixture would add to it; alpha gets its gradient through the
straight-through weight of the drawn op at temperature tau, annealed linearly from ``tau_max``
to ``tau_min`` over the budget. A step computes one op per node, so it costs about what a
single-path step costs. The draws are a function of the seed and the step (a resumed search
draws the same paths, and every process the same path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch

from ..batching import Batch
from ..config import setting
from .darts import DartsSearcher, DartsSettings
from .parts import METHODS
from .single_path import PATH_STRIDE


@dataclass(frozen=True)
class GdasSettings(DartsSettings):
    """``--method gdas``: DARTS's settings (first order) and the Gumbel-softmax temperature."""

    tau_max: float = setting(10.0, "Gumbel-softmax temperature at the first step (GDAS's 10)")
    tau_min: float = setting(0.1, "Gumbel-softmax temperature at the last step (GDAS's 0.1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive(("tau_max", "tau_min"))
        if self.tau_min > self.tau_max:
            self._fail("tau_min", f"at most tau_max ({self.tau_max})")
        if self.second_order:
            self._fail("second_order", "off: GDAS's architecture gradient is first order")
        if self.shrink_to:
            self._fail("shrink_to", "empty: GDAS draws one op a node, shrinking saves nothing")


class Gdas(DartsSearcher):
    """``--method gdas``: :class:`~mdarts.search.darts.DartsSearcher`'s steps, each on a path
    drawn from alpha."""

    name = "gdas"
    Settings = GdasSettings

    def tau(self) -> float:
        """The temperature of the next step: tau_max at the first, tau_min at the planned last."""
        settings, planned = self.settings, self.schedule.steps
        progress = min(1.0, self.steps / max(1, planned - 1)) if planned else 0.0
        return settings.tau_max - (settings.tau_max - settings.tau_min) * progress

    def _draws(self, part: int) -> torch.Generator:
        """The random stream of the next step's path for data part ``part`` (0 theta, 1 alpha)."""
        return torch.Generator().manual_seed((self.run.seed * PATH_STRIDE + self.steps) * 2 + part)

    def evaluated(self) -> ContextManager[Any]:
        """The search's validation loss is that of the argmax path, the network GDAS trains
        towards (the whole mixture is never trained as one)."""
        return self.model.use_path(self.model.genotype())

    def theta_step(self, batch: Batch) -> float:
        with self.model.sample_path(self.tau(), self._draws(0)):
            return super().theta_step(batch)

    def alpha_step(self, batch: Batch, train_batch: Optional[Batch] = None) -> float:
        with self.model.sample_path(self.tau(), self._draws(1)):
            return super().alpha_step(batch, train_batch)


METHODS.register(Gdas)

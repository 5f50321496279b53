"""The ``single_path`` supernet method: random search with weight sharing (Li and Talwalkar
2019; docs/design.md 1.1). Each search step trains one path of the supernet, drawn uniformly
(:meth:`mdarts.model.Supernet.use_path` computes only its ops); the architecture logits are
never trained, so its genotype is chosen by a selector that scores paths (``ranked_paths``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..batching import Batch
from ..config import SearchSettings, Settings
from ..genotype import random_genotype
from ..model import Supernet
from ..processes import ONE_PROCESS, Ranks
from .parts import METHODS
from .weights import WeightTraining

PATH_STRIDE = 1_000_003  # the path of step s of seed n is random genotype n * PATH_STRIDE + s


@dataclass(frozen=True)
class SinglePathSettings(Settings):
    """``--method single_path`` has no settings of its own: every step's path is uniform."""


class SinglePath(WeightTraining):
    """One weight update a step, on the theta part of the training data, through the path
    drawn for that step: a function of the seed and the step, so a resumed run draws the same."""

    name = "single_path"
    Settings = SinglePathSettings
    trains_alpha = False
    parts = ("theta",)

    def __init__(
        self, model: Supernet, run: SearchSettings, settings: SinglePathSettings, ranks: Ranks = ONE_PROCESS
    ) -> None:
        self.settings = settings
        super().__init__(model, run, ranks)

    def step(self, next_batch: Callable[[str], Batch]) -> dict[str, Any]:
        batch = next_batch("theta")
        with self.model.use_path(random_genotype(self.config, self.run.seed * PATH_STRIDE + self.steps)):
            loss = self.theta_step(batch)
        self.steps += 1
        return {"theta_loss": loss, "alpha_loss": None, "tokens": batch.num_tokens}


METHODS.register(SinglePath)

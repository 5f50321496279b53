"""The ``ranked_paths`` selector (random search with weight sharing, Li and Talwalkar 2019):
``ranked_paths`` genotypes drawn uniformly, each scored by the validation loss of its single
path through the trained supernet's shared weights, the lowest kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings, setting
from ..genotype import Genotype, random_genotype
from .parts import SELECTORS, SelectionContext, Selector
from .single_path import PATH_STRIDE


@dataclass(frozen=True)
class RankedPathsSettings(Settings):
    """How ``--select ranked_paths`` draws and scores paths."""

    ranked_paths: int = setting(100, "random genotypes ranked by shared-weight validation loss")
    ranking_pairs: int = setting(256, "validation pairs that score each path (the first ones of the split)")

    def __post_init__(self) -> None:
        self._check_ints(("ranked_paths", "ranking_pairs"), 1)


class RankedPaths(Selector):
    name = "ranked_paths"
    Settings = RankedPathsSettings
    needs_validation = True
    score_name = "val_loss"  # lower is better

    def propose(self, context: SelectionContext) -> list[Genotype]:
        """Random genotypes from streams no training path uses (negative seeds)."""
        config = context.model.config
        return [
            random_genotype(config, -(context.seed * PATH_STRIDE + i + 1)) for i in range(self.settings.ranked_paths)
        ]

    def score(self, context: SelectionContext, genotypes: list[Genotype]) -> list[float]:
        batches = context.validation_batches(self.settings.ranking_pairs)
        return [context.path_loss(genotype, batches) for genotype in genotypes]


SELECTORS.register(RankedPaths)

"""The ``evolution`` selector (single-path one-shot search, Guo et al. 2020; HAT, Wang et al.
2020): genotypes evolved against their shared-weight validation loss in the trained supernet.

A population of ``population`` random genotypes; every generation keeps the ``parents`` best
genotypes scored so far and makes the next population from them, half by mutation (each node
of a random parent redrawn with probability ``mutation``) and half by crossover (each node
from one of two random parents), never a genotype already scored. After ``generations``
populations the best genotype scored wins. Every score is the validation loss of the
genotype's single path (:meth:`~mdarts.search.parts.SelectionContext.path_loss`), as
``ranked_paths`` scores its uniform draws; the defaults score as many genotypes (100).
The random stream is a function of the seed, so a search chooses the same genotype again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import Settings, setting
from ..genotype import Genotype, random_genotype
from ..ops import op_spec
from .parts import SELECTORS, SelectionContext, Selector
from .single_path import PATH_STRIDE


@dataclass(frozen=True)
class EvolutionSettings(Settings):
    """How ``--select evolution`` evolves genotypes."""

    population: int = setting(20, "genotypes scored each generation")
    generations: int = setting(5, "populations scored (the first one random)")
    parents: int = setting(10, "best genotypes so far that breed the next population")
    mutation: float = setting(0.25, "probability that mutation redraws a node's op")
    evolution_pairs: int = setting(256, "validation pairs that score each genotype (the first ones of the split)")

    def __post_init__(self) -> None:
        self._check_ints(("population", "generations", "parents", "evolution_pairs"), 1)
        if not (isinstance(self.mutation, (int, float)) and 0.0 < self.mutation <= 1.0):
            self._fail("mutation", "a probability in (0, 1]")


def _nodes(genotype: Genotype) -> list[tuple[str, int, int]]:
    """Every node of ``genotype`` as (side, layer, part)."""
    sides = ("encoder", "decoder")
    return [(side, i, k) for side in sides for i, ops in enumerate(getattr(genotype, side)) for k in range(len(ops))]


class Evolution(Selector):
    name = "evolution"
    Settings = EvolutionSettings
    needs_validation = True
    score_name = "val_loss"  # lower is better

    def __init__(self, settings: EvolutionSettings) -> None:
        super().__init__(settings)
        self._losses: dict[str, float] = {}  # by genotype summary, in the supernet self._model
        self._model: object = None

    def _cache(self, context: SelectionContext) -> dict[str, float]:
        """The losses scored so far in ``context``'s supernet (emptied for another supernet)."""
        if self._model is not context.model:
            self._losses, self._model = {}, context.model
        return self._losses

    def propose(self, context: SelectionContext) -> list[Genotype]:
        """Every genotype the evolution scored, in the order scored."""
        settings = self.settings
        config = context.model.config
        batches = context.validation_batches(settings.evolution_pairs)
        rng = random.Random(f"evolution:{context.seed}")
        candidates = {
            side: [op for op in getattr(config, f"{side}_candidates") if op_spec(op).connects]
            for side in ("encoder", "decoder")
        }
        losses = self._cache(context)
        scored: list[Genotype] = []
        population = [
            random_genotype(config, -(context.seed * PATH_STRIDE + i + 1)) for i in range(settings.population)
        ]
        for generation in range(settings.generations):
            for genotype in population:
                losses[genotype.summary()] = context.path_loss(genotype, batches)
                scored.append(genotype)
            if generation + 1 < settings.generations:
                parents = sorted(scored, key=lambda g: losses[g.summary()])[: settings.parents]
                population = self._breed(parents, candidates, rng)
        return scored

    def _breed(self, parents: list[Genotype], candidates: dict[str, list[str]], rng: random.Random) -> list[Genotype]:
        """The next population: half mutants, half crosses of ``parents``, none scored before
        (at most a fixed number of draws: a small space may hold fewer new genotypes)."""
        children: dict[str, Genotype] = {}
        for draw in range(100 * self.settings.population):
            if len(children) == self.settings.population:
                break
            if draw % 2 == 0:
                child = self._mutant(rng.choice(parents), candidates, rng)
            else:
                child = self._cross(rng.choice(parents), rng.choice(parents), rng)
            key = child.summary()
            if key not in self._losses and key not in children:
                children[key] = child
        return list(children.values())

    def _mutant(self, parent: Genotype, candidates: dict[str, list[str]], rng: random.Random) -> Genotype:
        layers = {side: [list(layer) for layer in getattr(parent, side)] for side in ("encoder", "decoder")}
        for side, i, k in _nodes(parent):
            if rng.random() < self.settings.mutation:
                layers[side][i][k] = rng.choice(candidates[side])
        return Genotype(layers["encoder"], layers["decoder"], parent.encoder_candidates, parent.decoder_candidates)

    @staticmethod
    def _cross(first: Genotype, second: Genotype, rng: random.Random) -> Genotype:
        layers = {side: [list(layer) for layer in getattr(first, side)] for side in ("encoder", "decoder")}
        for side, i, k in _nodes(first):
            if rng.random() < 0.5:
                layers[side][i][k] = getattr(second, side)[i][k]
        return Genotype(layers["encoder"], layers["decoder"], first.encoder_candidates, first.decoder_candidates)

    def score(self, context: SelectionContext, genotypes: list[Genotype]) -> list[float]:
        """Shared-weight validation loss; those the evolution scored are not scored again."""
        losses, batches = self._cache(context), None
        scores = []
        for genotype in genotypes:
            key = genotype.summary()
            if key not in losses:
                batches = batches or context.validation_batches(self.settings.evolution_pairs)
                losses[key] = context.path_loss(genotype, batches)
            scores.append(losses[key])
        return scores


SELECTORS.register(Evolution)

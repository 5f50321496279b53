"""The ``perturbation`` selector (Wang et al., ICLR 2021, "Rethinking architecture selection in
differentiable NAS"): choose by what the trained mixture loses without an op, not by its
weight. For every node and candidate, the validation loss of the supernet with that op removed
from the node's mixture (its weight 0, the others renormalised, as progressive shrinking does)
minus the loss of the whole supernet; a node keeps the op whose removal hurts most. As a score
over genotypes: the sum over nodes of the loss its op's removal costs (higher is better).

Unlike Wang et al., the supernet is not fine-tuned between nodes: every effect is measured on
the one trained mixture, so the score of any genotype is a sum of the same table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Settings, setting
from ..genotype import Genotype
from .parts import SELECTORS, SelectionContext, Selector


@dataclass(frozen=True)
class PerturbationSettings(Settings):
    """How ``--select perturbation`` measures each op's effect."""

    perturbation_pairs: int = setting(256, "validation pairs that measure each removal (the first ones of the split)")

    def __post_init__(self) -> None:
        self._check_ints(("perturbation_pairs",), 1)


class Perturbation(Selector):
    name = "perturbation"
    Settings = PerturbationSettings
    needs_alpha = needs_validation = True
    score_name = "loss_increase"
    higher_is_better = True

    def __init__(self, settings: PerturbationSettings) -> None:
        super().__init__(settings)
        self._effects: dict[int, list[dict[str, float]]] = {}  # by id of the supernet measured

    def effects(self, context: SelectionContext) -> list[dict[str, float]]:
        """Per node (encoder nodes, then decoder nodes, as the logits are ordered): {op: the
        validation loss with it removed minus the loss of the whole mixture}. An op that is
        the node's last is not removed (no entry)."""
        model = context.model
        if id(model) in self._effects:
            return self._effects[id(model)]
        batches = context.validation_batches(self.settings.perturbation_pairs)
        whole = context.loss(batches)
        config = model.config
        sides = ["encoder"] * len(model.alpha_encoder) + ["decoder"] * len(model.alpha_decoder)
        table = []
        for dropped, side in zip(model.dropped, sides):
            candidates = getattr(config, f"{side}_candidates")
            node = {}
            for i, op in enumerate(candidates):
                if i in dropped or len(candidates) - len(dropped) == 1:
                    continue
                dropped.append(i)  # the node reads this list: the op leaves its mixture
                try:
                    node[op] = context.loss(batches) - whole
                finally:
                    dropped.remove(i)
            table.append(node)
        self._effects[id(model)] = table
        return table

    def propose(self, context: SelectionContext) -> list[Genotype]:
        """The genotype of each node's most harmful removal."""
        table = self.effects(context)
        config = context.model.config
        ops = [max(node, key=node.get) for node in table]
        encoder_nodes = len(context.model.alpha_encoder)
        layers = {}
        for side, flat, splits in (
            ("encoder", ops[:encoder_nodes], config.encoder_splits),
            ("decoder", ops[encoder_nodes:], config.decoder_splits - 1),
        ):
            layers[side] = [flat[i : i + splits] for i in range(0, len(flat), splits)]
        return [Genotype(layers["encoder"], layers["decoder"], config.encoder_candidates, config.decoder_candidates)]

    def score(self, context: SelectionContext, genotypes: list[Genotype]) -> list[float]:
        table = self.effects(context)
        scores = []
        for genotype in genotypes:
            ops = [op for side in ("encoder", "decoder") for layer in getattr(genotype, side) for op in layer]
            scores.append(sum(node.get(op, -math.inf) for node, op in zip(table, ops, strict=True)))
        return scores


SELECTORS.register(Perturbation)

"""The ``argmax`` selector: every node keeps its op of highest architecture weight (DARTS's
rule, docs/design.md 1.1). As a score over genotypes it is the log-probability of a genotype
under softmax(alpha): the sum over nodes of log softmax(alpha)_op (-inf for an op the node
does not hold or progressive shrinking removed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Settings, setting
from ..genotype import Genotype
from .parts import SELECTORS, SelectionContext, Selector


@dataclass(frozen=True)
class ArgmaxSettings(Settings):
    """How ``--select argmax`` reads the architecture weights."""

    allow_zero: bool = setting(False, "let the zero op be chosen (off: a node keeps its best other op)")


class Argmax(Selector):
    name = "argmax"
    Settings = ArgmaxSettings
    needs_alpha = True
    score_name = "log_prob"
    higher_is_better = True

    def propose(self, context: SelectionContext) -> list[Genotype]:
        return [context.model.genotype(exclude_zero=not self.settings.allow_zero)]

    def score(self, context: SelectionContext, genotypes: list[Genotype]) -> list[float]:
        weights = context.model.arch_weights()
        config = context.model.config
        scores = []
        for genotype in genotypes:
            total = 0.0
            for side in ("encoder", "decoder"):
                candidates = getattr(config, f"{side}_candidates")
                for layer_ops, layer_weights in zip(getattr(genotype, side), weights[side], strict=True):
                    for op, probs in zip(layer_ops, layer_weights, strict=True):
                        p = probs[candidates.index(op)] if op in candidates else 0.0
                        total += math.log(p) if p > 0 else -math.inf
            scores.append(total)
        return scores


SELECTORS.register(Argmax)

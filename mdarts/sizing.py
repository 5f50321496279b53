"""Building a network from its architecture and sizing it to a parameter count: the one rule
that ``mdarts train --params`` and ``mdarts experiment`` share (docs/design.md 2.2).

An architecture is ``"transformer"`` or ``"evolved"`` (the baselines of
:data:`BASELINES`) or a :class:`~mdarts.genotype.Genotype` (a
:class:`~mdarts.model.DerivedNet` in the reversible skeleton). :func:`sized_config` gives a
network ``params`` parameters (within 2%) by its d_model, in steps of :func:`d_step`, and
then its embedding width e; every other field of the base :class:`ModelConfig` (depth, heads,
FFN width, dropout) is kept. Sizes are counted on the meta device: no memory is allocated.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Union

import torch
from torch import nn

from .config import ModelConfig
from .evolved import EvolvedTransformer
from .genotype import Genotype
from .model import DerivedNet, TransformerBaseline

Architecture = Union[str, Genotype]
"""``"transformer"``, ``"evolved"`` or a genotype."""
SIZE_TOLERANCE = 0.02  # a sized network is within 2% of the parameter count asked for

BASELINES = {"transformer": TransformerBaseline, "evolved": EvolvedTransformer}
"""The baselines by ``--arch`` name: built from a ModelConfig and a vocabulary size alone."""


def load_architecture(arch: Union[Architecture, "os.PathLike[str]"]) -> Architecture:
    """``arch`` as :func:`builder` takes it: a baseline's name or a genotype as given, anything
    else read as the path of a genotype file (FileNotFoundError / ValueError naming it)."""
    if isinstance(arch, Genotype) or arch in BASELINES:
        return arch
    return Genotype.load(arch)


def builder(arch: Architecture, vocab_size: int) -> Callable[[ModelConfig], nn.Module]:
    """``config -> network`` of ``arch`` over ``vocab_size`` token ids: the baseline's class, or
    a :class:`DerivedNet` of the genotype (plain backprop, ``memory_mode="store"``)."""
    if isinstance(arch, Genotype):
        return lambda config: DerivedNet(arch, config, vocab_size)
    if arch not in BASELINES:
        raise ValueError(f"arch: expected {', '.join(BASELINES)} or a genotype, got {arch!r}")
    return lambda config: BASELINES[arch](config, vocab_size)


def d_step(config: ModelConfig, arch: Optional[Architecture] = None) -> int:
    """The step of d_model: 2 x heads for a baseline (heads divides d, and the Evolved
    Transformer's halves d / 2 are whole); for the reversible skeleton (a genotype, or None:
    the supernet) the least d that splits into encoder_splits and decoder_splits parts each
    divisible by heads, lcm(encoder_splits, decoder_splits) x heads."""
    if isinstance(arch, str):
        return 2 * config.heads
    return math.lcm(config.encoder_splits, config.decoder_splits) * config.heads


def count_parameters(build: Callable[[ModelConfig], nn.Module], config: ModelConfig) -> tuple[int, int]:
    """(all parameters, those outside the embedding table) of ``build(config)``, a
    :class:`~mdarts.model.Seq2Seq` built on the meta device."""
    with torch.device("meta"):
        model = build(config)
    total = model.num_parameters()
    return total, total - model.src_embed.table.weight.numel()


def sized_config(arch: Architecture, config: ModelConfig, target: int, vocab_size: int) -> ModelConfig:
    """``config`` with the d_model (a multiple of :func:`d_step`) and then the embedding width e
    whose network of ``arch`` has the parameter count nearest ``target``: d is the largest
    step whose network at e = d stays at or under the target, e the best of the widths that
    bracket the target on each side of d. ValueError when it misses by over 2%.

    The count grows with e except at e = d, where the embedding and output projections
    (d x e each) are left out: each side of it is searched on its own."""
    if target < 1:
        raise ValueError(f"params: expected a positive parameter count, got {target}")
    build, step = builder(arch, vocab_size), d_step(config, arch)

    def total(d: int, e: int) -> int:
        return count_parameters(build, config.replace(d_model=d, embed_dim=e))[0]

    def nearest(d: int, low: int, high: int) -> list[int]:
        """The largest e in [low, high] whose count stays under the target, and the next one."""
        below, above = low, high
        while below < above:
            mid = (below + above + 1) // 2
            below, above = (mid, above) if total(d, mid) <= target else (below, mid - 1)
        return [e for e in (below, below + 1) if low <= e <= high]

    d = step
    while total(d + step, d + step) <= target:
        d += step
    widths = [*nearest(d, 8, d - 1), d, *nearest(d, d + 1, 8 * d)]
    e = min(widths, key=lambda e: abs(total(d, e) - target))
    if abs(total(d, e) - target) > SIZE_TOLERANCE * target:
        raise ValueError(f"params: no size of this network comes within 2% of {target:,} parameters")
    return config.replace(d_model=d, embed_dim=e)

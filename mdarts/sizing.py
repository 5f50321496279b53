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

import functools
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
MAX_D_MODEL = 2048
"""The widest d_model sizing gives (twice the big Transformer's 1,024): the largest parameter
count it reaches is the network at this width with the widest embedding, 8 d."""
MIN_EMBED, EMBED_MULT = 8, 8  # sizing's embedding widths e: from 8 to 8 d

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


def size_range(arch: Architecture, config: ModelConfig, vocab_size: int) -> tuple[int, int]:
    """(fewest, most) parameters :func:`sized_config` can give ``arch`` with ``config``'s depth,
    heads and FFN width: the network at the narrowest d (:func:`d_step`) and embedding width
    (e = 8, or e = d where that drops the projections), and the one at :data:`MAX_D_MODEL` (in
    steps) with e = 8 d."""
    build, step = builder(arch, vocab_size), d_step(config, arch)
    widest = max(step, MAX_D_MODEL // step * step)

    def count(d: int, e: int) -> int:
        return count_parameters(build, config.replace(d_model=d, embed_dim=e))[0]

    return min(count(step, MIN_EMBED), count(step, step)), count(widest, EMBED_MULT * widest)


def check_size(arch: Architecture, config: ModelConfig, target: int, vocab_size: int, name: str = "params") -> None:
    """ValueError naming ``name`` unless ``target`` is a parameter count within 2% of the range
    :func:`size_range` gives (say, ``--params 1``: no network of this depth is that small)."""
    if not isinstance(target, int) or isinstance(target, bool) or target < 1:
        raise ValueError(f"{name}: expected a positive parameter count, got {target!r}")
    low, high = size_range(arch, config, vocab_size)
    if not low / (1 + SIZE_TOLERANCE) <= target <= high / (1 - SIZE_TOLERANCE):
        what = arch if isinstance(arch, str) else "a genotype"
        raise ValueError(
            f"{name}: {target:,} is outside the parameter counts {what} reaches at depth "
            f"{config.encoder_layers}+{config.decoder_layers} and vocabulary {vocab_size:,}: "
            f"{low:,} (the narrowest) to {high:,} (d_model {MAX_D_MODEL}, the widest sized)"
        )


def sized_config(
    arch: Architecture, config: ModelConfig, target: int, vocab_size: int, embed_dim: Optional[int] = None
) -> ModelConfig:
    """``config`` with the d_model (a multiple of :func:`d_step`, at most :data:`MAX_D_MODEL`)
    and then the embedding width e whose network of ``arch`` has the parameter count nearest
    ``target``: d is the largest step whose network at e = d stays at or under the target, e
    the best of the widths that bracket the target on each side of d. With ``embed_dim``, d is
    whichever of the two steps that bracket the target at e = ``embed_dim`` gets the e nearest
    ``embed_dim``: the table stays about that narrow and the layers take the rest.
    ValueError when the target is outside :func:`size_range` (:func:`check_size`) or missed by
    over 2%.

    The count grows with d, and with e except at e = d, where the embedding and output
    projections (d x e each) are left out: each side of it is searched on its own."""
    check_size(arch, config, target, vocab_size)
    if embed_dim is not None and (
        not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < MIN_EMBED
    ):
        raise ValueError(f"embed_dim: expected an embedding width of at least {MIN_EMBED}, got {embed_dim!r}")
    build, step = builder(arch, vocab_size), d_step(config, arch)

    @functools.cache
    def total(d: int, e: int) -> int:
        return count_parameters(build, config.replace(d_model=d, embed_dim=e))[0]

    def close(count: int) -> bool:
        return abs(count - target) <= SIZE_TOLERANCE * target

    def nearest(d: int, low: int, high: int) -> list[int]:
        """The largest e in [low, high] whose count stays under the target, and the next one."""
        below, above = low, high
        while below < above:
            mid = (below + above + 1) // 2
            below, above = (mid, above) if total(d, mid) <= target else (below, mid - 1)
        return [e for e in (below, below + 1) if low <= e <= high]

    def fitted(d: int) -> tuple[int, int]:
        """(d, the e whose count at d comes nearest the target)."""
        widths = [*nearest(d, MIN_EMBED, d - 1), d, *nearest(d, d + 1, EMBED_MULT * d)]
        return d, min(widths, key=lambda e: abs(total(d, e) - target))

    if embed_dim is not None and total(step, embed_dim) > target:
        raise ValueError(
            f"embed_dim: at embedding width {embed_dim} the narrowest network has {total(step, embed_dim):,} "
            f"parameters, over the {target:,} asked for"
        )
    low, high = 1, max(1, MAX_D_MODEL // step)  # multiples of the step: the largest under the target
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if total(mid * step, embed_dim or mid * step) <= target else (low, mid - 1)
    d, e = fitted(low * step)
    if embed_dim is not None and (low + 1) * step <= MAX_D_MODEL:  # of the two steps that bracket
        # the target at e = embed_dim, the one whose fitted e comes nearest embed_dim
        fits = [(d, e) for d, e in (fitted(low * step), fitted((low + 1) * step)) if close(total(d, e))]
        d, e = min(fits or [(d, e)], key=lambda fit: abs(fit[1] - embed_dim))
    if not close(total(d, e)):
        raise ValueError(f"params: no size of this network comes within 2% of {target:,} parameters")
    return config.replace(d_model=d, embed_dim=e)

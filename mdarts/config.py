"""Search and model configuration: a dataclass with presets (DESIGN.md 1.2, 1.4).

``SearchConfig`` describes the supernet (and the derived network and Transformer baseline
built at the same sizes). ``dataclasses.replace`` works on it, and every instance is
validated on creation, with errors that name the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .ops import DECODER_CANDIDATES, ENCODER_CANDIDATES

MEMORY_MODES = ("reconstruct", "checkpoint", "store")


class DictFields:
    """``to_dict`` / ``from_dict`` / ``replace`` for a (frozen) dataclass of settings;
    ``from_dict`` rejects unknown fields by name, and construction validates."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)
POOLS = ("max", "mean")


@dataclass(frozen=True)
class SearchConfig(DictFields):
    """Sizes and settings of a search space and its networks.

    d_model: width d of the residual stream (divisible by both split counts, and each part
        by ``heads``); embed_dim: e of the factorised embeddings (vocab x e, then e x d);
        encoder_layers / decoder_layers: depth; unit_layers: s searched layers whose
        architecture is repeated to the full depth; encoder_splits / decoder_splits: n of the
        multi-split reversible layers (the decoder's last split is fixed cross-attention);
        heads: attention heads (and dynamic-convolution channel groups) per op; ffn_mult: the
        FFN op's hidden size as a multiple of its input width; dropout: inside every op and
        after the embeddings; memory_mode: "reconstruct" (this method), "checkpoint" or
        "store" (plain DARTS); pad_id: padding token id; pool: "max" or "mean" split pooling;
        max_positions: longest sequence (sinusoidal positions); share_embeddings: one source
        and target embedding (joint vocabulary); tie_output: the output projection reuses the
        target embedding; encoder_candidates / decoder_candidates: the search space.
    """

    d_model: int = 96
    embed_dim: int = 64
    encoder_layers: int = 2
    decoder_layers: int = 2
    unit_layers: int = 2
    encoder_splits: int = 2
    decoder_splits: int = 3
    heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.1
    memory_mode: str = "reconstruct"
    pad_id: int = 0
    pool: str = "max"
    max_positions: int = 256
    share_embeddings: bool = True
    tie_output: bool = True
    encoder_candidates: tuple[str, ...] = field(default=ENCODER_CANDIDATES)
    decoder_candidates: tuple[str, ...] = field(default=DECODER_CANDIDATES)

    def __post_init__(self) -> None:
        for name in ("encoder_candidates", "decoder_candidates"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("d_model", "embed_dim", "encoder_layers", "decoder_layers", "unit_layers", "heads", "ffn_mult", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SearchConfig.{name}: expected a positive integer, got {value!r}")
        if self.encoder_splits < 2:
            raise ValueError(f"SearchConfig.encoder_splits: expected at least 2, got {self.encoder_splits}")
        if self.decoder_splits < 2:
            raise ValueError(f"SearchConfig.decoder_splits: expected at least 2 (the last is cross-attention), got {self.decoder_splits}")
        if self.d_model % self.heads:
            raise ValueError(f"SearchConfig.heads: {self.heads} does not divide d_model={self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SearchConfig.dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"SearchConfig.memory_mode: expected one of {', '.join(MEMORY_MODES)}, got {self.memory_mode!r}")
        if self.pool not in POOLS:
            raise ValueError(f"SearchConfig.pool: expected one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.pad_id < 0:
            raise ValueError(f"SearchConfig.pad_id: expected a non-negative id, got {self.pad_id}")
        _check_candidates("encoder_candidates", self.encoder_candidates, ENCODER_CANDIDATES)
        _check_candidates("decoder_candidates", self.decoder_candidates, DECODER_CANDIDATES)

    def check_splits(self) -> None:
        """Raise ValueError naming the field unless d_model splits into encoder_splits and
        decoder_splits equal parts, each divisible by heads (needed by the reversible nets,
        not by the Transformer baseline)."""
        for name in ("encoder_splits", "decoder_splits"):
            splits = getattr(self, name)
            if self.d_model % splits:
                raise ValueError(f"SearchConfig.d_model: {self.d_model} is not divisible by {name}={splits}")
            if (self.d_model // splits) % self.heads:
                raise ValueError(
                    f"SearchConfig.heads: {self.heads} does not divide the part width d_model/{name} = {self.d_model // splits}"
                )


def _check_candidates(name: str, chosen: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    if not chosen:
        raise ValueError(f"SearchConfig.{name}: expected at least one op")
    unknown = [op for op in chosen if op not in allowed]
    if unknown:
        raise ValueError(f"SearchConfig.{name}: unknown op(s) {', '.join(unknown)}; valid: {', '.join(allowed)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"SearchConfig.{name}: an op is listed twice in {chosen}")


PRESETS: dict[str, SearchConfig] = {
    # a search that runs on 2 CPU cores in minutes
    "tiny": SearchConfig(d_model=96, embed_dim=64, encoder_layers=2, decoder_layers=2, heads=4, max_positions=128),
    # a search for one GPU
    "small": SearchConfig(d_model=240, embed_dim=128, encoder_layers=6, decoder_layers=6, heads=8),
    # the paper's search width (DESIGN.md 1.2): e = 256, d = 960
    "paper": SearchConfig(d_model=960, embed_dim=256, encoder_layers=6, decoder_layers=6, heads=8),
}

TRAIN_PRESETS: dict[str, SearchConfig] = {
    # the published Multi30k Transformer (DESIGN.md 3): 4 + 4 layers, d 128, FFN 256, 4 heads
    "multi30k-base": SearchConfig(
        d_model=128, embed_dim=128, encoder_layers=4, decoder_layers=4, heads=4, ffn_mult=2, dropout=0.3, max_positions=256
    ),
    **PRESETS,
}


def preset(name: str, training: bool = False) -> SearchConfig:
    """The search preset (or, with ``training``, the training preset) called ``name``;
    ValueError listing the presets otherwise."""
    presets = TRAIN_PRESETS if training else PRESETS
    if name not in presets:
        raise ValueError(f"preset: unknown preset {name!r}; presets: {', '.join(presets)}")
    return presets[name]

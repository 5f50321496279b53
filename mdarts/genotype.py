"""Genotype: the discrete architecture a search yields, saved as JSON (never ``eval``).

A genotype names one op per searched node: ``encoder[i][k]`` for unit layer i and split k
of the encoder (encoder_splits nodes a layer), ``decoder[i][k]`` for the decoder's searched
splits (decoder_splits - 1 a layer; the last split is fixed cross-attention). The softmax
weights the choice came from are kept for the record.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import ModelConfig
from .files import write_atomic
from .ops import op_spec

FORMAT = "mdarts-genotype-1"


@dataclass
class Genotype:
    """encoder: (unit_layers, encoder_splits) op names; decoder: (unit_layers, decoder_splits - 1)
    op names; encoder_candidates / decoder_candidates: the search space they were chosen from;
    weights: optional {"encoder": [[[p per candidate]]], "decoder": ...} softmax records."""

    encoder: list[list[str]]
    decoder: list[list[str]]
    encoder_candidates: tuple[str, ...]
    decoder_candidates: tuple[str, ...]
    weights: Optional[dict] = field(default=None, compare=False)

    def validate(self, config: Optional[ModelConfig] = None) -> "Genotype":
        """Check op names against the candidates and, given ``config``, the node layout.

        Raises ValueError naming the bad node (e.g. ``decoder[1][0]``) or op."""
        for side in ("encoder", "decoder"):
            layers = getattr(self, side)
            candidates = getattr(self, f"{side}_candidates")
            _check_candidates(candidates, f"genotype.{side}_candidates")
            if not isinstance(layers, list) or not layers:
                raise ValueError(f"genotype.{side}: expected a non-empty list of layers, got {layers!r}")
            for i, layer in enumerate(layers):
                if not isinstance(layer, list) or not layer:
                    raise ValueError(f"genotype.{side}[{i}]: expected a non-empty list of op names, got {layer!r}")
                for k, op in enumerate(layer):
                    if op not in candidates:
                        raise ValueError(
                            f"genotype.{side}[{i}][{k}]: unknown op {op!r}; "
                            f"the search space has {', '.join(candidates)}"
                        )
        if config is not None:
            expected = {
                "encoder": (config.unit_layers, config.encoder_splits),
                "decoder": (config.unit_layers, config.decoder_splits - 1),
            }
            for side, (layers, splits) in expected.items():
                got = getattr(self, side)
                if len(got) != layers or any(len(layer) != splits for layer in got):
                    raise ValueError(
                        f"genotype.{side}: expected {layers} unit layers of {splits} nodes for this search space "
                        f"(unit_layers={config.unit_layers}, {side}_splits={getattr(config, side + '_splits')}), "
                        f"got {[len(layer) for layer in got]}"
                    )
            for side in ("encoder", "decoder"):
                allowed = getattr(config, f"{side}_candidates")
                for i, layer in enumerate(getattr(self, side)):
                    for k, op in enumerate(layer):
                        if op not in allowed:
                            raise ValueError(
                                f"genotype.{side}[{i}][{k}]: op {op!r} is not in this search space "
                                f"({', '.join(allowed)})"
                            )
        return self

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "encoder": self.encoder,
            "decoder": self.decoder,
            "encoder_candidates": list(self.encoder_candidates),
            "decoder_candidates": list(self.decoder_candidates),
            "weights": self.weights,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "genotype") -> "Genotype":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: expected format {FORMAT!r}, got {data.get('format')!r}")
        missing = [key for key in ("encoder", "decoder", "encoder_candidates", "decoder_candidates") if key not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        for key in ("encoder_candidates", "decoder_candidates"):
            _check_candidates(data[key], f"{source}: {key}")
        genotype = cls(
            encoder=data["encoder"],
            decoder=data["decoder"],
            encoder_candidates=tuple(data["encoder_candidates"]),
            decoder_candidates=tuple(data["decoder_candidates"]),
            weights=data.get("weights"),
        )
        return genotype.validate()

    def save(self, path: os.PathLike) -> None:
        """Write JSON atomically (temporary file, then rename)."""
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: os.PathLike) -> "Genotype":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"genotype file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(data, source=str(path))

    def summary(self) -> str:
        """One line per side, e.g. ``encoder: [attention ffn] [conv3 glu]``."""
        parts = []
        for side in ("encoder", "decoder"):
            layers = " ".join("[" + " ".join(layer) + "]" for layer in getattr(self, side))
            parts.append(f"{side}: {layers}")
        return "\n".join(parts)


def _check_candidates(candidates: object, name: str) -> None:
    """ValueError naming ``name`` unless ``candidates`` is a non-empty list (or tuple) of op names:
    a string such as ``"ffn"`` would otherwise read as the candidates f, f, n."""
    if (
        not isinstance(candidates, (list, tuple))
        or not candidates
        or not all(isinstance(op, str) and op for op in candidates)
    ):
        raise ValueError(f"{name}: expected a non-empty list of op names, got {candidates!r}")


def random_genotype(config: ModelConfig, seed: int) -> Genotype:
    """A genotype whose every node is drawn uniformly from the candidates of ``config`` (zero, the
    op that cuts the connection, excluded, as derive never picks it), from the random stream
    ``seed``: the same seed gives the same genotype on every machine."""
    rng = random.Random(f"random-genotype:{seed}")
    layers = {}
    for side, splits in (("encoder", config.encoder_splits), ("decoder", config.decoder_splits - 1)):
        candidates = [op for op in getattr(config, f"{side}_candidates") if op_spec(op).connects]
        layers[side] = [[rng.choice(candidates) for _ in range(splits)] for _ in range(config.unit_layers)]
    return Genotype(layers["encoder"], layers["decoder"], config.encoder_candidates, config.decoder_candidates)


def control_genotype(config: ModelConfig) -> Genotype:
    """The hand-made control in the reversible skeleton: the parts of every layer alternate
    self-attention and FFN (encoder: [attention, ffn]; decoder: [attention, ffn] beside the fixed
    cross-attention), as in a Transformer layer."""
    pattern = ("attention", "ffn")
    layers = {
        side: [[pattern[k % 2] for k in range(splits)] for _ in range(config.unit_layers)]
        for side, splits in (("encoder", config.encoder_splits), ("decoder", config.decoder_splits - 1))
    }
    return Genotype(layers["encoder"], layers["decoder"], config.encoder_candidates, config.decoder_candidates)

"""Every setting of mdarts in one place: dataclasses whose fields carry their help text, and
the presets (model, training and search) side by side.

* :class:`ModelConfig`: sizes of a search space and of the networks built from it (the
  supernet, a derived network, the Transformer and Evolved Transformer baselines);
* :class:`TrainConfig`: a training run (``mdarts train``);
* :class:`SearchSettings`: a search run (``mdarts search``).

The command line is generated from the fields (:mod:`mdarts.arguments`): a default and its
help are written once, here. Every instance is validated on creation; an error is a
:class:`SettingError` naming the field. The method behind the settings is described in
docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

# This module imports no other mdarts module: every other one may import it.

__all__ = [
    "MAX_SEED",
    "MAX_TOKENS",
    "MEMORY_MODES",
    "POOLS",
    "DEFAULT_ENCODER_CANDIDATES",
    "DEFAULT_DECODER_CANDIDATES",
    "SettingError",
    "ModelConfig",
    "SearchConfig",
    "TrainConfig",
    "SearchSettings",
    "MODEL_PRESETS",
    "TRAIN_PRESETS",
    "SEARCH_PRESETS",
    "preset",
    "search_preset",
]


MAX_TOKENS = 2**20
"""Most padded positions a batch may hold (``max_tokens``): 256 times the default, and more than
one step of any preset needs; a larger batch only asks for memory no device has."""
MAX_SEED = 2**32 - 1
"""Largest seed (as NumPy's): torch seeds are 64-bit, and runs add small offsets to their seed."""

MEMORY_MODES = ("reconstruct", "checkpoint", "store")
"""How a reversible stack keeps what its backward needs (mdarts.reversible, docs/design.md 1.3)."""
POOLS = ("max", "mean")
"""How a split of a reversible layer reads the other parts (docs/design.md 1.2)."""

# The default search space (docs/design.md 1.4) as plain data: the ops are registered in
# mdarts.ops, which checks on import that these are among them.
DEFAULT_ENCODER_CANDIDATES: tuple[str, ...] = (
    "conv3",
    "conv5",
    "conv7",
    "conv11",
    "dynconv3",
    "dynconv7",
    "dynconv11",
    "dynconv15",
    "attention",
    "ffn",
    "glu",
    "zero",
    "identity",
)
DEFAULT_DECODER_CANDIDATES: tuple[str, ...] = DEFAULT_ENCODER_CANDIDATES + ("cross_attention",)
OP_NAMES: dict[str, dict[str, None]] = {
    "encoder": dict.fromkeys(DEFAULT_ENCODER_CANDIDATES),
    "decoder": dict.fromkeys(DEFAULT_DECODER_CANDIDATES),
}
"""The op names a search space may hold on each side, in registration order: the defaults, and
each op :func:`mdarts.ops.register_op` adds (or :func:`mdarts.ops.unregister_op` removes). The
registry writes here, so that this module imports no other and validates every op name."""


class SettingError(ValueError):
    """A setting with a bad value; ``field`` is its name (``--field-name`` on the command line)."""

    def __init__(self, owner: str, name: str, message: str) -> None:
        super().__init__(f"{owner}.{name}: {message}")
        self.field = name
        self.message = message


def setting(default: Any, help: str, *, resumable: bool = False, cli: bool = True) -> Any:
    """A dataclass field with its ``help`` text. ``resumable``: may differ when a run is
    resumed (budgets and reporting; every other setting shapes the trajectory and must match).
    ``cli=False`` keeps it off the command line."""
    return field(default=default, metadata={"help": help, "resumable": resumable, "cli": cli})


class Settings:
    """``to_dict`` / ``from_dict`` / ``replace`` and the checks shared by the settings dataclasses."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        """An instance from ``values``; unknown fields are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def changed_on_resume(self, saved: "Settings") -> list[str]:
        """``"name old -> new"`` for each setting that differs from ``saved`` and may not change
        when a run is resumed (fields not marked ``resumable``)."""
        return [
            f"{f.name} {getattr(saved, f.name)!r} -> {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if not f.metadata.get("resumable") and getattr(saved, f.name) != getattr(self, f.name)
        ]

    def _fail(self, name: str, expected: str) -> None:
        raise SettingError(type(self).__name__, name, f"expected {expected}, got {getattr(self, name)!r}")

    def _check_ints(
        self, names: tuple[str, ...], minimum: int, optional: bool = False, maximum: Optional[int] = None
    ) -> None:
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            if not ok or (maximum is not None and value > maximum):
                kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                self._fail(name, kind if maximum is None else f"an integer from {minimum} to {maximum:,}")

    def _check_positive(self, names: tuple[str, ...], optional: bool = False, zero: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if zero else value > 0)
            if not ok:
                self._fail(name, ("a non-negative" if zero else "a positive") + " finite number")

    def _check_fraction(self, names: tuple[str, ...], low_open: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and (0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0)):
                self._fail(name, "a fraction strictly between 0 and 1" if low_open else "a value in [0, 1)")

    def _check_betas(self, names: tuple[str, ...]) -> None:
        for name in names:
            object.__setattr__(self, name, tuple(getattr(self, name)))
            value = getattr(self, name)
            if len(value) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in value):
                self._fail(name, "two numbers in [0, 1)")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            self._fail(name, f"one of {', '.join(choices)}")

    def _check_device(self) -> None:
        if not isinstance(self.device, str) or not (self.device == "auto" or _is_device(self.device)):
            self._fail("device", '"auto", "cpu", "cuda" or "cuda:N"')


def _is_device(name: str) -> bool:
    import torch

    try:
        return torch.device(name).type in ("cpu", "cuda")
    except (RuntimeError, TypeError):
        return False


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelConfig(Settings):
    """Sizes and settings of a search space and of the networks built from it (supernet,
    derived network, Transformer and Evolved Transformer baselines); docs/design.md 1.2, 1.4."""

    d_model: int = setting(96, "width d of the residual stream (divisible by both split counts, each part by heads)")
    embed_dim: int = setting(64, "e of the factorised embeddings (vocab x e, then e x d)")
    encoder_layers: int = setting(2, "encoder depth")
    decoder_layers: int = setting(2, "decoder depth")
    unit_layers: int = setting(2, "searched layers whose architecture is repeated to the full depth")
    encoder_splits: int = setting(2, "parts of an encoder layer (multi-split reversible layer)")
    decoder_splits: int = setting(3, "parts of a decoder layer; the last is fixed cross-attention")
    heads: int = setting(4, "attention heads (and dynamic-convolution channel groups) per op")
    ffn_mult: int = setting(4, "FFN hidden size as a multiple of its input width")
    dropout: float = setting(0.1, "dropout inside every op and after the embeddings")
    memory_mode: str = setting(
        "reconstruct",
        "reconstruct (recompute layers from their outputs, this method), checkpoint (store each "
        "layer's input), store (plain autograd: plain DARTS), or auto (a search picks the fastest that fits "
        "memory_budget_gb: store, else checkpoint, else reconstruct)",
    )
    pad_id: int = setting(0, "padding token id", cli=False)
    pool: str = setting("max", "how a split reads the other parts: elementwise max or mean")
    max_positions: int = setting(256, "longest sequence (sinusoidal positions)")
    share_embeddings: bool = setting(True, "one source and target embedding (joint vocabulary)", cli=False)
    tie_output: bool = setting(True, "the output projection reuses the target embedding", cli=False)
    encoder_candidates: tuple[str, ...] = setting(
        DEFAULT_ENCODER_CANDIDATES, "the encoder's search space (ops registered in mdarts.ops)", cli=False
    )
    decoder_candidates: tuple[str, ...] = setting(
        DEFAULT_DECODER_CANDIDATES, "the decoder's search space (ops registered in mdarts.ops)", cli=False
    )

    def __post_init__(self) -> None:
        for name in ("encoder_candidates", "decoder_candidates"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._check_ints(
            (
                "d_model",
                "embed_dim",
                "encoder_layers",
                "decoder_layers",
                "unit_layers",
                "heads",
                "ffn_mult",
                "max_positions",
            ),
            1,
        )
        self._check_ints(("encoder_splits",), 2)
        self._check_ints(("decoder_splits",), 2)  # the last is cross-attention
        self._check_ints(("pad_id",), 0)
        if self.d_model % self.heads:
            raise SettingError("ModelConfig", "heads", f"{self.heads} does not divide d_model={self.d_model}")
        self._check_fraction(("dropout",))
        self._check_choice("memory_mode", (*MEMORY_MODES, "auto"))
        self._check_choice("pool", POOLS)
        self._check_candidates("encoder")
        self._check_candidates("decoder")

    def _check_candidates(self, side: str) -> None:
        """Raise SettingError naming ``{side}_candidates`` unless it lists distinct ops that
        :data:`OP_NAMES` allows on ``side``."""
        name = f"{side}_candidates"
        chosen = getattr(self, name)
        if not chosen:
            raise SettingError("ModelConfig", name, "expected at least one op")
        allowed = OP_NAMES[side]
        unknown = [op for op in chosen if op not in allowed]
        if unknown:
            raise SettingError("ModelConfig", name, f"unknown op(s) {', '.join(unknown)}; valid: {', '.join(allowed)}")
        if len(set(chosen)) != len(chosen):
            raise SettingError("ModelConfig", name, f"an op is listed twice in {chosen}")

    def check_splits(self) -> None:
        """Raise SettingError unless d_model splits into encoder_splits and decoder_splits equal
        parts, each divisible by heads (needed by the reversible nets, not by the baselines)."""
        for name in ("encoder_splits", "decoder_splits"):
            splits = getattr(self, name)
            if self.d_model % splits:
                raise SettingError("ModelConfig", "d_model", f"{self.d_model} is not divisible by {name}={splits}")
            if (self.d_model // splits) % self.heads:
                raise SettingError(
                    "ModelConfig",
                    "heads",
                    f"{self.heads} does not divide the part width d_model/{name} = {self.d_model // splits}",
                )


SearchConfig = ModelConfig
"""Deprecated alias of :class:`ModelConfig` (its name before it also sized the baselines)."""


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSettings(Settings):
    """What training and search share: budget, weight optimiser, batches, precision, seed, device."""

    max_steps: Optional[int] = setting(
        None, "budget: updates (a search step is one weight and one architecture update)", resumable=True
    )
    max_minutes: Optional[float] = setting(
        None, "budget: minutes of the training loop (validations included), summed over resumes", resumable=True
    )
    lr: float = setting(5e-4, "peak learning rate of the weights, reached after warmup_steps")
    warmup_steps: int = setting(4000, "linear warm-up updates; then the rate decays as 1/sqrt(step)")
    betas: tuple[float, float] = setting((0.9, 0.98), "Adam betas of the weights")
    clip_norm: float = setting(1.0, "largest global gradient L2 norm (0: no clipping)")
    max_tokens: int = setting(4096, "batch size: padded positions, batch * max(source, target length)")
    label_smoothing: float = setting(0.1, "of the cross-entropy")
    bf16: bool = setting(
        False,
        "bfloat16 autocast for forward and backward (fast on GPUs and AVX-512 or AMX CPUs; emulated, slower, on AVX2)",
    )
    seed: int = setting(1, "model initialisation, dropout and batch order")
    device: str = setting("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N", resumable=True)
    loss_chunk_rows: int = setting(
        0,
        "target tokens per block of the output layer and loss, in float32 with the gradients made in the forward, "
        "so no (tokens x vocab) logits are kept (faster on a CPU); 0: full logits",
        resumable=True,
    )

    def __post_init__(self) -> None:
        self._check_ints(("max_steps",), 1, optional=True)
        self._check_ints(("loss_chunk_rows",), 0, maximum=MAX_TOKENS)
        self._check_positive(("max_minutes",), optional=True)
        self._check_positive(("lr",))
        self._check_ints(("warmup_steps",), 1, optional=isinstance(self, SearchSettings))
        self._check_ints(("max_tokens",), 1, maximum=MAX_TOKENS)
        self._check_betas(("betas",))
        self._check_positive(("clip_norm",), zero=True)
        self._check_fraction(("label_smoothing",))
        self._check_ints(("seed",), 0, maximum=MAX_SEED)
        self._check_device()

    def learning_rate(self, step: int) -> float:
        """Learning rate of update ``step`` (1-based): ``lr * min(step / warmup, sqrt(warmup / step))``."""
        return inverse_sqrt_lr(step, self.lr, self.warmup_steps)


@dataclass(frozen=True)
class TrainConfig(RunSettings):
    """Settings of a training run (``mdarts train``): at least one of max_steps, max_epochs,
    max_minutes must be set."""

    max_epochs: Optional[int] = setting(None, "budget: passes over the training data", resumable=True)
    weight_decay: float = setting(0.0, "Adam's L2 term")
    update_freq: int = setting(
        1,
        "batches each process sums into one update (gradient accumulation: an update of update_freq x processes "
        "batches; the gradients are summed over the processes once, after the last)",
        resumable=True,
    )
    valid_interval: int = setting(1000, "updates between validations (each also writes checkpoints)", resumable=True)
    log_interval: int = setting(100, "updates between training log lines", resumable=True)
    patience: int = setting(0, "stop after this many validations without a lower loss (0: never)", resumable=True)
    keep_last: int = setting(5, "step checkpoints kept for averaging (0: none)", resumable=True)
    cooldown_fraction: float = setting(
        0.0,
        "the last fraction of max_steps ramps the learning rate linearly down to zero, so that the budget ends "
        "on a decayed rate (0: the inverse-sqrt rate to the end)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_ints(("max_epochs",), 1, optional=True)
        self._check_fraction(("cooldown_fraction",))
        if self.cooldown_fraction and self.max_steps is None:
            raise SettingError(
                "TrainConfig", "cooldown_fraction", "a cool-down needs the budget in updates: give max_steps too"
            )
        if self.max_steps is None and self.max_epochs is None and self.max_minutes is None:
            raise SettingError(
                "TrainConfig",
                "max_steps",
                "give a budget: at least one of max_steps, max_epochs, max_minutes (or training never ends)",
            )
        self._check_positive(("weight_decay",), zero=True)
        self._check_ints(("update_freq", "valid_interval", "log_interval"), 1)
        self._check_ints(("patience", "keep_last"), 0)

    def learning_rate(self, step: int) -> float:
        """Learning rate of update ``step`` (1-based): the inverse-sqrt rate (:func:`inverse_sqrt_lr`),
        times ``(max_steps - step + 1) / cooldown`` over the last ``cooldown`` updates
        (``cooldown_fraction * max_steps``, rounded), so that the last update's rate is 1/cooldown of it."""
        rate = super().learning_rate(step)
        cooldown = round(self.cooldown_fraction * self.max_steps) if self.cooldown_fraction else 0
        if cooldown and step > self.max_steps - cooldown:
            rate *= max(self.max_steps - step + 1, 0) / cooldown
        return rate


@dataclass(frozen=True)
class SearchSettings(RunSettings):
    """How to search (the supernet itself is a :class:`ModelConfig`); docs/design.md 1.1. The
    supernet method (``method``) and the selector (``select``) have settings of their own
    (:mod:`mdarts.search.parts`). At least one of max_steps, max_minutes must be set."""

    method: str = setting("darts", "the supernet method: how the weights and architecture logits are trained")
    select: str = setting("argmax", "the selector: how the genotype is chosen from the trained supernet")
    warmup_steps: Optional[int] = setting(
        None, "linear warm-up updates of the weights, then 1/sqrt(step) decay (none: warmup_fraction of the budget)"
    )
    warmup_fraction: float = setting(
        0.1, "the weights' warm-up as a fraction of the step budget (without warmup_steps)"
    )
    affine_free: bool = setting(
        True, "candidate LayerNorms without learned gain and bias while searching, so the weights cannot do alpha's job"
    )
    parameter_free: bool = setting(
        False,
        "keep the parameter-free ops (zero, identity) in the search space; off: in a short search they win before "
        "the other ops have learned anything (DARTS collapse), and derive never picks zero",
    )
    stable_evals: int = setting(
        0, "stop once the argmax genotype has not changed for this many evaluations while alpha trains (0: never)"
    )
    memory_budget_gb: Optional[float] = setting(
        None, "memory a step may use, for --memory-mode auto (none: 90%% of the GPU, or 80%% of the free RAM)"
    )
    loss_chunk_rows: int = setting(
        256,
        "target tokens per block of the output layer and loss, in float32, no (tokens x vocab) logits kept "
        "(faster on a CPU); 0: full logits",
        resumable=True,
    )
    split_ratio: float = setting(0.55, "fraction of the training pairs for the weights (the rest, disjoint, for alpha)")
    eval_interval: int = setting(
        500, "steps between evaluations (genotype, alpha history, heatmap, validation loss)", resumable=True
    )
    valid_interval: int = setting(
        500, "steps between validation losses (at an evaluation; the last evaluation always has one)", resumable=True
    )
    checkpoint_interval: int = setting(1000, "steps between checkpoints", resumable=True)
    seed: int = setting(0, "model initialisation, theta/alpha data split, dropout, batch order and drawn paths")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps is None and self.max_minutes is None:
            raise SettingError("SearchSettings", "max_steps", "give a budget, max_steps and/or max_minutes")
        for name in ("method", "select"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                self._fail(name, "the name of a registered part")
        self._check_positive(("memory_budget_gb",), optional=True)
        self._check_positive(("clip_norm",))
        self._check_fraction(("warmup_fraction",), low_open=True)
        self._check_ints(("stable_evals",), 0)
        self._check_fraction(("split_ratio",), low_open=True)
        self._check_ints(("eval_interval", "valid_interval", "checkpoint_interval"), 1)


def inverse_sqrt_lr(step: int, peak: float, warmup_steps: int) -> float:
    """Learning rate of update ``step`` (1-based): ``peak * min(step / warmup, sqrt(warmup / step))``."""
    step = max(step, 1)
    return peak * min(step / warmup_steps, math.sqrt(warmup_steps / step))


# ----------------------------------------------------------------------------- presets

MODEL_PRESETS: dict[str, ModelConfig] = {
    # a search that runs on 2 CPU cores in minutes (memory mode: the fastest that fits)
    "tiny": ModelConfig(
        d_model=96, embed_dim=64, encoder_layers=2, decoder_layers=2, heads=4, max_positions=128, memory_mode="auto"
    ),
    # a search for one GPU
    "small": ModelConfig(d_model=240, embed_dim=128, encoder_layers=6, decoder_layers=6, heads=8, memory_mode="auto"),
    # the paper's search width (docs/design.md 1.2): e = 256, d = 960
    "paper": ModelConfig(d_model=960, embed_dim=256, encoder_layers=6, decoder_layers=6, heads=8, memory_mode="auto"),
}
PRESETS = MODEL_PRESETS  # the search presets' models (earlier name)

TRAIN_PRESETS: dict[str, ModelConfig] = {
    # the published Multi30k Transformer (docs/design.md 3): 4 + 4 layers, d 128, FFN 256, 4 heads
    "multi30k-base": ModelConfig(
        d_model=128, embed_dim=128, encoder_layers=4, decoder_layers=4, heads=4, ffn_mult=2, dropout=0.3
    ),
    **MODEL_PRESETS,
}

# how each search preset searches: "tiny" finishes in about 10 minutes on 2 CPU cores
SEARCH_PRESETS: dict[str, SearchSettings] = {
    "tiny": SearchSettings(
        max_minutes=10.0, lr=1e-3, eval_interval=10, valid_interval=100, checkpoint_interval=50, max_tokens=2048
    ),
    "small": SearchSettings(max_steps=20_000, eval_interval=500, checkpoint_interval=1000),
    "paper": SearchSettings(max_steps=60_000, eval_interval=1000, checkpoint_interval=2000),
}


def preset(name: str, training: bool = False) -> ModelConfig:
    """The model of search preset ``name`` (or, with ``training``, of training preset ``name``);
    ValueError listing the presets otherwise."""
    presets = TRAIN_PRESETS if training else MODEL_PRESETS
    if name not in presets:
        raise ValueError(f"preset: unknown preset {name!r}; presets: {', '.join(presets)}")
    return presets[name]


def search_preset(name: str) -> SearchSettings:
    """The search settings of preset ``name``; ValueError listing the presets otherwise."""
    if name not in SEARCH_PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; presets: {', '.join(SEARCH_PRESETS)}")
    return SEARCH_PRESETS[name]

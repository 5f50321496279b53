"""The two parts a search is made of, and their registries (docs/design.md 2.3).

* A **supernet method** (:class:`SupernetMethod`) says how the supernet's weights and
  architecture logits are trained: one :meth:`~SupernetMethod.step` a search step, its schedule
  over the budget, its state in the checkpoint. ``darts`` (:mod:`mdarts.search.darts`),
  ``gdas`` (:mod:`mdarts.search.gdas`) and ``single_path`` (:mod:`mdarts.search.single_path`)
  are built in.
* A **selector** (:class:`Selector`) says how a genotype is chosen from a trained supernet: a
  scoring function over genotypes (:meth:`~Selector.score`) plus a rule proposing the
  genotypes to score (:meth:`~Selector.propose`). ``argmax``, ``ranked_paths``, ``evolution`` and
  ``perturbation`` (modules of those names in :mod:`mdarts.search`) are built in.

Each part is a class with a ``name`` and a ``Settings`` dataclass (a
:class:`~mdarts.config.Settings`, whose fields become command-line options), registered with
one line, ``METHODS.register(MyMethod)`` or ``SELECTORS.register(MySelector)``. The run loop
(:class:`mdarts.search.Searcher`) knows neither: it looks them up by the names
``SearchSettings.method`` and ``SearchSettings.select`` give.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Generic, Iterable, Mapping, Optional, TypeVar

import torch

from ..arguments import option
from ..batching import Batch, TokenBatches
from ..config import SearchSettings, Settings
from ..genotype import Genotype
from ..loss import evaluate_loss
from ..model import Supernet
from ..prepare import EncodedSplit

Part = TypeVar("Part")


class Registry(Generic[Part]):
    """Parts of one kind ("method", "selector") by name."""

    def __init__(self, kind: str, option: str) -> None:
        self.kind, self.option = kind, option
        self._parts: dict[str, type] = {}

    def register(self, part: type) -> type:
        """Add ``part`` (a class with ``name`` and ``Settings``) under its name; returns it.
        ValueError for a name taken or a part without a settings dataclass."""
        name = getattr(part, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a name (class attribute `name`), {part.__name__} has none")
        if name in self._parts:
            raise ValueError(f"{self.kind} {name!r} is registered already ({self._parts[name].__name__})")
        settings = getattr(part, "Settings", None)
        if not (isinstance(settings, type) and dataclasses.is_dataclass(settings) and issubclass(settings, Settings)):
            raise ValueError(f"{self.kind} {name!r}: `Settings` must be a Settings dataclass")
        self._parts[name] = part
        return part

    def names(self) -> list[str]:
        return list(self._parts)

    def classes(self) -> list[type]:
        return list(self._parts.values())

    def __getitem__(self, name: str) -> type:
        """The part named ``name``; ValueError naming the option and the known names otherwise."""
        if name not in self._parts:
            raise ValueError(f"{self.option}: unknown {self.kind} {name!r}; known: {', '.join(self._parts)}")
        return self._parts[name]


class SupernetMethod:
    """How a supernet is trained. The run loop builds one with the supernet, the run's
    settings, the method's own settings and the processes, then calls :meth:`plan` once the
    budget is known in steps and :meth:`step` once a search step.

    Attributes the run loop reads: ``trains_alpha`` (whether the architecture logits learn;
    a selector reading them refuses a method that does not), ``parts`` (the names of the
    training-data parts it draws batches from, each a disjoint share of the training pairs:
    ``("theta", "alpha")``), ``steps`` (search steps done) and ``schedule`` (a
    :class:`~mdarts.search.darts.Schedule`; ``schedule.steps`` is the planned budget, 0 while
    a minutes budget is not yet planned; :mod:`mdarts.search.weights`), ``cost_changed``
    (whether the last step changed what the next ones cost, so that a minutes budget is timed
    again) and the weights' learning rate ``theta_lr()``.

    Built as ``Method(model, run, settings, ranks)``: the supernet, the run's
    :class:`~mdarts.config.SearchSettings`, the method's own settings and the processes.
    :class:`mdarts.search.weights.WeightTraining` implements all of it but :meth:`step`."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    trains_alpha: ClassVar[bool] = False
    parts: ClassVar[tuple[str, ...]] = ("theta", "alpha")

    def step(self, next_batch: Callable[[str], Batch]) -> dict[str, Optional[float]]:
        """One search step; ``next_batch(part)`` gives this process's next batch of a data part
        (on the device). Returns the step's losses by name ("theta_loss", "alpha_loss": None when
        alpha did not move) and "tokens", the target tokens it trained on."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def evaluated(self) -> ContextManager[Any]:
        """Within: the supernet as the search's validation loss measures it (default: as it is,
        the whole mixture; a method that trains paths may measure one)."""
        return contextlib.nullcontext()


@dataclass
class SelectionContext:
    """What a selector may read: the trained supernet (its weights and logits loaded), the
    validation split (None when there is none), and how the run scores a batch."""

    model: Supernet
    val: Optional[EncodedSplit]
    max_tokens: int
    label_smoothing: float
    device: torch.device
    bf16: bool
    seed: int

    def validation_batches(self, pairs: int) -> TokenBatches:
        """The first ``pairs`` validation pairs in batches; ValueError without validation data."""
        if self.val is None:
            raise ValueError("this selector scores genotypes by validation loss: give validation data")
        config = self.model.config
        return TokenBatches(
            self.val.src_ids[:pairs],
            self.val.tgt_ids[:pairs],
            self.max_tokens,
            shuffle=False,
            max_positions=config.max_positions,
            pad_id=config.pad_id,
        )

    def loss(self, batches: Iterable[Batch]) -> float:
        """The validation loss (label-smoothed, nats per token) of the supernet as it computes now."""
        config = self.model.config
        return evaluate_loss(self.model, batches, config.pad_id, self.label_smoothing, self.device, self.bf16)["loss"]

    def path_loss(self, genotype: Genotype, batches: Iterable[Batch]) -> float:
        """The shared-weight validation loss of the single path ``genotype`` names in the supernet."""
        with self.model.use_path(genotype):
            return self.loss(batches)


class Selector:
    """How a genotype is chosen from a trained supernet: :meth:`propose` the candidates, score
    each (:meth:`score`: one number per genotype, ``higher_is_better`` says which way), keep the
    best. A selector that reads the architecture logits sets ``needs_alpha``, one that reads
    validation data ``needs_validation`` (see :func:`check_parts`)."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    needs_alpha: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = False
    score_name: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def propose(self, context: SelectionContext) -> list[Genotype]:
        raise NotImplementedError

    def score(self, context: SelectionContext, genotypes: list[Genotype]) -> list[float]:
        raise NotImplementedError

    def select(self, context: SelectionContext) -> tuple[Genotype, list[dict[str, Any]]]:
        """The best proposed genotype and every proposal's record ({"genotype": summary,
        score_name: score}), in the order proposed."""
        proposals = self.propose(context)
        scores = self.score(context, proposals)
        records = [{"genotype": g.summary(), self.score_name: s} for g, s in zip(proposals, scores)]
        sign = -1.0 if self.higher_is_better else 1.0
        best = min(range(len(proposals)), key=lambda i: sign * scores[i] if math.isfinite(scores[i]) else math.inf)
        return proposals[best], records


def check_parts(method: str, select: str, has_validation: bool) -> None:
    """ValueError, before anything runs, when selector ``select`` cannot serve method ``method``
    (alpha argmax of a method that trains no alpha) or needs validation data that is not there."""
    method_cls, selector_cls = METHODS[method], SELECTORS[select]
    if selector_cls.needs_alpha and not method_cls.trains_alpha:
        raise ValueError(
            f"--select {select} reads the architecture logits, which --method {method} does not train; "
            "choose a selector that scores paths (e.g. --select ranked_paths)"
        )
    if selector_cls.needs_validation and not has_validation:
        raise ValueError(f"--select {select} ranks genotypes by validation loss: give validation data")


METHODS: Registry[SupernetMethod] = Registry("method", "--method")
"""The supernet methods by name (``mdarts search --method NAME``)."""
SELECTORS: Registry[Selector] = Registry("selector", "--select")
"""The selectors by name (``mdarts search --select NAME``, ``mdarts derive RUN --select NAME``)."""


def split_values(
    values: Mapping[str, Any], method: str, select: str, source: str = "search settings"
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``values`` (field name -> value, e.g. an experiment's ``[search]`` table or the options
    given) shared out to (SearchSettings, the method's settings, the selector's settings), each
    field going to the dataclass that declares it. ValueError naming a field that belongs to
    another method or selector, or to none."""
    owners = {
        "search": {f.name for f in dataclasses.fields(SearchSettings)},
        "method": {f.name for f in dataclasses.fields(METHODS[method].Settings)},
        "select": {f.name for f in dataclasses.fields(SELECTORS[select].Settings)},
    }
    shared: dict[str, dict[str, Any]] = {"search": {}, "method": {}, "select": {}}
    for name, value in values.items():
        owner = next((kind for kind, names in owners.items() if name in names), None)
        if owner is None:
            raise ValueError(f"{source}: {option(name)} {_owner_of(name, method, select)}")
        shared[owner][name] = value
    return shared["search"], shared["method"], shared["select"]


def parts_of_table(
    values: Mapping[str, Any], method: str, select: str, source: str = "[search]"
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """:func:`split_values` of a table shared by searches of several parts (an experiment's
    ``[search]``): the fields of other methods and selectors are left out, a field of none refused."""
    every = {f.name for f in dataclasses.fields(SearchSettings)}
    every |= {f.name for part in (*METHODS.classes(), *SELECTORS.classes()) for f in dataclasses.fields(part.Settings)}
    unknown = sorted(set(values) - every)
    if unknown:
        raise ValueError(f"{source}: {', '.join(unknown)}: not a setting of a search, a method or a selector")
    mine = {f.name for part in (METHODS[method], SELECTORS[select]) for f in dataclasses.fields(part.Settings)}
    mine |= {f.name for f in dataclasses.fields(SearchSettings)}
    return split_values({k: v for k, v in values.items() if k in mine}, method, select, source)


def _owner_of(name: str, method: str, select: str) -> str:
    for registry, chosen in ((METHODS, method), (SELECTORS, select)):
        for part in registry.classes():
            if name in {f.name for f in dataclasses.fields(part.Settings)}:
                return f"is a setting of {registry.kind} {part.name}, not of {chosen} ({registry.option} {part.name})"
    return "is not a search setting"

"""``mdarts experiment``: a whole comparison of searched architectures against baselines, from a
small specification file, resumable, with a table, a plot and ``summary.json``.

Arms (``kind``): ``searched`` (searches, one per seed, by the supernet method ``method`` and the
selector ``select``, default darts and argmax, with the parts' ``settings`` over the ``[search]``
table), ``weight_sharing`` (the same with method single_path and selector ranked_paths: random
search with weight sharing), ``random`` (``count`` uniformly drawn genotypes, seeds fixed
in advance: 0, 1, ...), ``control`` (attention + FFN in the reversible skeleton), ``transformer``
and ``evolved`` (the baselines). Every network is sized to ``params`` parameters (within 2%:
d_model in its steps, then the embedding width; :func:`mdarts.sizing.sized_config`, as
``mdarts train --params`` sizes it; ``embed_dim``: the reversible networks' d_model chosen at
that embedding width, so the layers take what a narrow table leaves; the baselines as always),
built with the training preset's depth, heads, FFN width and dropout, and trained with
identical settings. Each is first trained with the first
training seed; the finalists (every arm but ``random``, and the ``random_finalists`` random
genotypes best on validation loss) with every training seed. Choices use validation only; the
test split is translated and scored once, at the end.

The specification is TOML (or JSON)::

    name = "en-de"
    pair = "en-de"
    params = 2349568
    train_seeds = [1, 2, 3]
    random_finalists = 2
    search_preset = "tiny"
    search_network = "retrain"  # the default: search the retrained networks' settings at their
                                # width ("preset": the search preset's supernet)
    embed_dim = 128             # optional: size the reversible networks from this embedding width
                                # (default 0: from e = d_model)
    [search]                # SearchSettings fields over the search preset's (and the parts')
    max_minutes = 60
    [train]                 # TrainConfig fields of every retrain
    max_minutes = 30
    lr = 1e-3
    [[arms]]
    name = "DARTS"
    kind = "searched"
    seeds = [0, 1, 2]
    [[arms]]
    name = "SPOS"
    kind = "searched"
    method = "single_path"
    select = "ranked_paths"
    settings = { ranked_paths = 200 }
    search_network = "preset"   # optional: this arm's supernet (default: the experiment's)
    seeds = [0, 1, 2]
    [[arms]]
    name = "random"
    kind = "random"
    count = 8

Outputs in the experiment directory: ``searches/`` and ``train/`` (the run directories; a
training's ``record.json`` says it has finished, and which code, device and torch ran it),
``translations/`` (the test split as each finished training translates it, scored only by the
report), ``genotypes/``, ``summary.json``, ``table.md``, ``bleu.png``. Each search's
``reference_scores.json``: its selector's scores of the random and control genotypes, made as
it ends, which the report sets against their retrains (``selectors`` in the summary). A killed experiment run
again continues where it stopped; finished runs are not redone, and need no checkpoint: the
directory without its ``*.pt`` files continues elsewhere. A specification with arms added after
the recorded ones continues a finished experiment: only the new arms run, the report holds all
(any other change is refused). The same command started several
times shares the work out (each run is locked by the process doing it). Every training seed of
a network trains the size its first training recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import tomllib
import torch

from .arguments import build_settings
from .checkpoint import load_checkpoint, load_model
from .config import (
    MAX_SEED,
    SEARCH_PRESETS,
    TRAIN_PRESETS,
    ModelConfig,
    SearchSettings,
    TrainConfig,
    preset,
    search_preset,
)
from .data import PAIRS, SPLIT_LANGUAGES, multi30k_files, splits_for_pair
from .files import JsonLog, PathLike, exclusive, write_atomic
from .genotype import Genotype, control_genotype, random_genotype
from .prepare import PreparedData, prepare_data
from .processes import Ranks, code_version, device_name, resolve_device
from .report import selector_lines, spearman, validation_table, write_report
from .runloop import SIGNAL_NAMES, RunClock
from .search import METHODS, SELECTORS, Searcher, parts_of_table, searched_space, split_values
from .search.run import CHECKPOINT_FILE as SEARCH_CHECKPOINT
from .search.run import GENOTYPE_FILE
from .search.run import LOG_FILE as SEARCH_LOG
from .sizing import BASELINES, MIN_EMBED, Architecture, builder, check_size, count_parameters, sized_config
from .tokenizer import MAX_VOCAB, MIN_VOCAB, Tokenizer
from .train import BEST_FILE, LAST_FILE, LOG_FILE, Trainer
from .translate import MAX_BEAM, translate_lines

ARM_KINDS = ("searched", "weight_sharing", "random", "control", "transformer", "evolved")


SEARCH_NETWORKS = ("preset", "retrain")
"""What an experiment searches (``search_network``): the search preset's supernet, or the
retrained networks' settings at their width (:meth:`ExperimentSpec.search_model_config`)."""
RECORDED_BEFORE = {"search_network": "preset", "embed_dim": 0}
"""Entries added to specifications after some spec.json files were written, and what their
absence from a spec.json means (what such an experiment ran)."""
SEARCH_PARTS = {"searched": ("darts", "argmax"), "weight_sharing": ("single_path", "ranked_paths")}
"""The supernet method and selector of each searching arm kind, unless the arm names others."""


@dataclass(frozen=True)
class Arm:
    """One arm: ``seeds`` of its searches (searched, weight_sharing) or ``count`` genotypes
    (random); a searching arm's ``method`` and ``select`` (None: its kind's, SEARCH_PARTS),
    their ``settings`` (over the experiment's ``[search]`` table) and its ``search_network``
    (None: the experiment's)."""

    name: str
    kind: str
    seeds: tuple[int, ...] = (0,)
    count: int = 8
    method: Optional[str] = None
    select: Optional[str] = None
    settings: dict = field(default_factory=dict)
    search_network: Optional[str] = None

    @property
    def searches(self) -> bool:
        return self.kind in SEARCH_PARTS

    def parts(self) -> tuple[str, str]:
        """(supernet method, selector) of a searching arm."""
        method, select = SEARCH_PARTS[self.kind]
        return self.method or method, self.select or select

    def to_dict(self) -> dict:
        """The arm as its specification gives it (the parts' fields only when set, so that
        specifications written before arms named their parts read the same)."""
        values = dataclasses.asdict(self)
        return {k: v for k, v in values.items() if k not in ("method", "select", "settings", "search_network") or v}


@dataclass(frozen=True)
class ExperimentSpec:
    """A comparison, as read from its specification file (see the module docstring)."""

    name: str
    pair: str
    params: int
    arms: tuple[Arm, ...]
    train_seeds: tuple[int, ...] = (1,)
    random_finalists: int = 2
    search_preset: str = "tiny"
    search_network: str = "retrain"  # the supernet: the retrained networks' ("retrain"), or the search preset's
    embed_dim: int = 0  # the reversible networks are sized from this embedding width (0: from e = d)
    search: dict = field(default_factory=dict)
    train_preset: str = "multi30k-base"
    train: dict = field(default_factory=dict)
    vocab_size: int = 8000
    beam: int = 5
    split: str = "test_2016_flickr"
    limit: int = 0  # score only the first sentences of the split (0: all; for smoke runs)

    @classmethod
    def load(cls, path: PathLike) -> "ExperimentSpec":
        """The specification in ``path`` (TOML, or JSON by extension), checked entry by entry:
        ValueError naming the file and the entry for anything that would fail later."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"experiment file not found: {path}")
        text = path.read_text()
        try:
            values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as error:
            raise ValueError(
                f"experiment file {path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {error}"
            ) from None
        return cls.from_dict(values, str(path))

    @classmethod
    def recorded(cls, path: PathLike) -> "ExperimentSpec":
        """The specification an experiment directory's spec.json (``path``) records, entries it
        predates read as they ran (:data:`RECORDED_BEFORE`)."""
        values = json.loads(Path(path).read_text())
        return cls.from_dict({**RECORDED_BEFORE, **values}, str(path))

    @classmethod
    def from_dict(cls, values: dict, source: str = "experiment") -> "ExperimentSpec":
        """The specification ``values`` (as read from ``source``), checked whole before anything
        runs: every entry's type and range, every ``[search]``/``[train]`` key a setting of the
        right type, the presets and the pair known, the test split one the pair has, and the
        size reachable by every network known before the searches (:meth:`check_sizes`).
        ValueError ``"{source}: {entry}: {what was expected}"`` at the first fault."""

        def fail(entry: str, message: str) -> None:
            raise ValueError(f"{source}: {entry}: {message}")

        if not isinstance(values, dict):
            fail("the file", f"expected a table of entries, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(values) - known):
            fail(key, f"unknown entry; known: {', '.join(sorted(known))}")
        for key in ("name", "pair", "params", "arms"):
            if key not in values:
                fail(key, "missing")
        for key, value in values.items():
            problem = _entry_problem(key, value, values.get("pair"))
            if problem is not None:
                fail(key, f"expected {problem}, got {value!r}")
        arms = []
        for i, table in enumerate(values["arms"]):
            arm = _arm(table, f"arms[{i}] ({table.get('name', '?') if isinstance(table, dict) else '?'!r})", fail)
            if any(a.name == arm.name for a in arms):
                fail(f"arms[{i}] ({arm.name!r})", "two arms have this name")
            arms.append(arm)
        spec = cls(**{**values, "arms": tuple(arms), "train_seeds": tuple(values.get("train_seeds", (1,)))})
        checks = [("[search]", spec.search_settings), ("[train]", lambda: spec.train_config(spec.train_seeds[0]))]
        checks += [(f"arms ({arm.name!r})", functools.partial(spec.search_parts, arm)) for arm in arms if arm.searches]
        checks += [("params", spec.check_sizes)]
        for entry, build in checks:
            try:
                build()
            except ValueError as error:
                fail(entry, str(error).removeprefix(f"{entry}: "))
        return spec

    def check_sizes(self) -> None:
        """Check that every network known before the searches can have ``params`` parameters:
        the baselines and the control are sized (:func:`~mdarts.sizing.sized_config`; with
        ``search_network = "retrain"`` the control is the searched supernet too), and the count
        is checked to lie in the range each random genotype reaches (:func:`~mdarts.sizing.check_size`,
        a tenth of the time; sized at a fixed ``embed_dim``). ValueError naming the network. A
        searched genotype is sized when its search has finished."""
        space = searched_space(preset(self.search_preset), self.search_settings().parameter_free)
        retrain = self.model_config()
        checks: dict[str, Callable[[], Any]] = {}
        for arm in self.arms:
            if arm.kind in BASELINES:
                base = preset(self.train_preset, training=True)
                checks[arm.kind] = functools.partial(sized_config, arm.kind, base, self.params, self.vocab_size)
            elif arm.kind == "control" or (arm.searches and self.network_of(arm) == "retrain"):
                checks["control"] = functools.partial(self.size_genotype, control_genotype(space), retrain)
            elif arm.kind == "random":
                for i in range(arm.count):
                    genotype = random_genotype(space, i)
                    checks[f"random g{i}"] = (
                        functools.partial(self.size_genotype, genotype, retrain)
                        if self.embed_dim  # at a fixed width only sizing tells
                        else functools.partial(check_size, genotype, retrain, self.params, self.vocab_size)
                    )
        for name, check in checks.items():
            try:
                check()
            except ValueError as error:
                message = str(error).removeprefix("params: ")
                raise ValueError(f"{message} (the {name} network)") from None

    def size_genotype(self, genotype: Genotype, config: ModelConfig) -> ModelConfig:
        """``config`` sized for a reversible network of ``genotype`` at ``params`` parameters:
        :func:`~mdarts.sizing.sized_config`, from the width ``embed_dim`` when it is set."""
        return sized_config(genotype, config, self.params, self.vocab_size, embed_dim=self.embed_dim or None)

    def to_dict(self) -> dict:
        """The specification as spec.json records it."""
        return {**dataclasses.asdict(self), "arms": [arm.to_dict() for arm in self.arms]}

    def search_settings(self, seed: int = 0) -> SearchSettings:
        """The ``[search]`` table's SearchSettings fields over the search preset's."""
        values = parts_of_table(self.search, *SEARCH_PARTS["searched"])[0]
        return build_settings(
            SearchSettings, {**values, "seed": seed}, base=search_preset(self.search_preset), named=str
        )

    def search_parts(self, arm: Arm, seed: int = 0) -> tuple[SearchSettings, Any, Any]:
        """The settings of ``arm``'s searches: (SearchSettings, the method's, the selector's),
        from the ``[search]`` table (fields of other methods and selectors are left out) and
        the arm's ``settings`` (which must all belong to its parts)."""
        method, select = arm.parts()
        base = search_preset(self.search_preset).replace(method=method, select=select)
        values, method_values, select_values = parts_of_table(self.search, method, select)
        more = split_values(arm.settings, method, select, source="settings")
        values, method_values, select_values = (
            {**values, **more[0], "seed": seed},
            {**method_values, **more[1]},
            {**select_values, **more[2]},
        )
        return (
            build_settings(SearchSettings, values, base=base, named=str),
            build_settings(METHODS[method].Settings, method_values, named=str),
            build_settings(SELECTORS[select].Settings, select_values, named=str),
        )

    def train_config(self, seed: int) -> TrainConfig:
        return build_settings(TrainConfig, {**self.train, "seed": seed}, named=str)

    def network_of(self, arm: Optional[Arm] = None) -> str:
        """What ``arm`` searches (its own ``search_network``, else the experiment's)."""
        return getattr(arm, "search_network", None) or self.search_network

    def search_model_config(self, arm: Optional[Arm] = None) -> ModelConfig:
        """The supernet of ``arm``'s searches (None: the experiment's, :meth:`network_of`).
        ``search_network = "preset"``: the search preset's.
        ``"retrain"``: the network that is retrained: :meth:`model_config` (the training
        preset's depth, heads, FFN width, dropout) at the width sizing gives the control genotype
        at ``params`` (d 192, e 213 for the Multi30k Transformer's 2,349,568), in the memory mode
        the search finds to fit."""
        if self.network_of(arm) == "preset":
            return preset(self.search_preset)
        retrain = self.model_config()
        return self.size_genotype(control_genotype(retrain), retrain).replace(memory_mode="auto")

    def model_config(self) -> ModelConfig:
        """The retrained networks' sizes before sizing: the search preset's space with the
        training preset's depth, heads, FFN width and dropout."""
        base = preset(self.train_preset, training=True)
        return preset(self.search_preset).replace(
            encoder_layers=base.encoder_layers,
            decoder_layers=base.decoder_layers,
            heads=base.heads,
            ffn_mult=base.ffn_mult,
            dropout=base.dropout,
            max_positions=base.max_positions,
            memory_mode="store",
        )


MAX_RUNS = 100
"""Most seeds of an arm or of the trainings, and most genotypes of a random arm: each is a whole
search or training (the committed experiments use 3 and 8)."""


def _entry_problem(key: str, value: Any, pair: Any) -> Optional[str]:
    """What the top-level entry ``key`` of a specification expects, when ``value`` is not it
    (``pair``: the specification's, for the test split); None when it is."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    expected = {
        "name": ("a non-empty string", isinstance(value, str) and value.strip() != ""),
        "pair": (f"one of {', '.join(PAIRS)}", isinstance(value, str) and value in PAIRS),
        "params": ("a positive integer", whole and value >= 1),
        "random_finalists": ("an integer >= 0", whole and value >= 0),
        "vocab_size": (f"an integer from {MIN_VOCAB} to {MAX_VOCAB:,}", whole and MIN_VOCAB <= value <= MAX_VOCAB),
        "beam": (f"an integer from 1 to {MAX_BEAM}", whole and 1 <= value <= MAX_BEAM),
        "limit": ("an integer >= 0 (0: the whole split)", whole and value >= 0),
        "search_preset": (f"one of {', '.join(SEARCH_PRESETS)}", isinstance(value, str) and value in SEARCH_PRESETS),
        "train_preset": (f"one of {', '.join(TRAIN_PRESETS)}", isinstance(value, str) and value in TRAIN_PRESETS),
        "search_network": (f"one of {', '.join(SEARCH_NETWORKS)}", isinstance(value, str) and value in SEARCH_NETWORKS),
        "embed_dim": (
            f"0 (sizing chooses) or a width of at least {MIN_EMBED}",
            whole and (value == 0 or value >= MIN_EMBED),
        ),
        "search": ("a table of search settings", isinstance(value, dict)),
        "train": ("a table of training settings", isinstance(value, dict)),
        "train_seeds": (_SEEDS, _seeds_ok(value)),
        "arms": (f"a list of 1 to {MAX_RUNS} [[arms]] tables", isinstance(value, list) and 1 <= len(value) <= MAX_RUNS),
    }
    if key == "split":
        splits = splits_for_pair(pair) if pair in PAIRS else list(SPLIT_LANGUAGES)
        return None if isinstance(value, str) and value in splits else f"a split of {pair}: {', '.join(splits)}"
    description, ok = expected[key]
    return None if ok else description


_PART_FIELDS = ("method", "select")
_SEEDS = f"a list of 1 to {MAX_RUNS} distinct integers from 0 to {MAX_SEED:,}"


def _seeds_ok(value: Any) -> bool:
    return (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_RUNS
        and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in value)
        and len(set(value)) == len(value)
    )


def _arm(table: Any, label: str, fail: Callable[[str, str], None]) -> Arm:
    """The arm of the ``[[arms]]`` table ``table``, every field checked (``fail(label, message)``
    at the first fault)."""
    if not isinstance(table, dict):
        fail(label, "expected a table with a name and a kind")
    unknown = sorted(set(table) - {f.name for f in dataclasses.fields(Arm)})
    name, kind = table.get("name"), table.get("kind")
    if unknown or not isinstance(name, str) or not name.strip() or kind not in ARM_KINDS:
        fail(label, f"needs a name and a kind in {', '.join(ARM_KINDS)}" + (f"; unknown {unknown}" if unknown else ""))
    count = table.get("count", 8)
    checks = [
        ("seeds", _SEEDS, _seeds_ok(table.get("seeds", [0]))),
        ("count", f"an integer from 1 to {MAX_RUNS}", isinstance(count, int) and 1 <= count <= MAX_RUNS),
        ("settings", "a table of its parts' settings", isinstance(table.get("settings", {}), dict)),
        (
            "search_network",
            f"one of {', '.join(SEARCH_NETWORKS)}",
            table.get("search_network", "preset") in SEARCH_NETWORKS,
        ),
        *((part, "the name of a registered part", isinstance(table.get(part, ""), str)) for part in _PART_FIELDS),
    ]
    for field_name, expected, ok in checks:
        if not ok or isinstance(table.get(field_name), bool):
            fail(label, f"{field_name}: expected {expected}, got {table[field_name]!r}")
    arm = Arm(**{**table, "seeds": tuple(table.get("seeds", (0,)))})
    if not arm.searches and (arm.method or arm.select or arm.settings or arm.search_network):
        fail(label, "method, select, settings and search_network belong to searching arms (searched, weight_sharing)")
    return arm


# ----------------------------------------------------------------------------- the runner


def _search_minutes(search_dir: Path) -> float:
    """Minutes a finished search ran (its log's last "end" record: the supernet's training and
    the selector's choice, summed over resumes)."""
    ends = [e for e in JsonLog(search_dir / SEARCH_LOG, writes=False).read() if e["event"] == "end"]
    return ends[-1]["elapsed_s"] / 60.0 if ends else 0.0


def _check_continues(saved: dict, given: dict, path: Path) -> None:
    """Whether specification ``given`` continues the experiment recorded in ``path`` (``saved``):
    the same, or the same with arms added after the recorded ones (whose finished runs stay
    valid: nothing they ran changes). ValueError naming the entries that differ otherwise."""
    saved = {**RECORDED_BEFORE, **saved}
    recorded = saved.get("arms", [])
    if {**given, "arms": given["arms"][: len(recorded)]} == saved:
        return
    differ = sorted(key for key in saved.keys() | given.keys() if key != "arms" and saved.get(key) != given.get(key))
    changed = [a.get("name", "?") for a, b in zip(recorded, given["arms"]) if a != b]
    if changed or len(given["arms"]) < len(recorded):
        differ.append("arms (" + ", ".join(map(repr, changed)) + " changed)" if changed else "arms (some removed)")
    raise ValueError(
        f"{path.parent} holds an experiment with another specification ({path}): {', '.join(differ)} differ; "
        "only arms added after the recorded ones continue it (use another --out for the rest)"
    )


@dataclass
class Member:
    """One network of an arm: ``genotype`` (None for a baseline, and for a searched member until
    its search in ``search_dir`` has finished) and where it came from."""

    arm: Arm
    name: str
    genotype: Optional[Genotype] = None
    search_dir: Optional[Path] = None
    search_seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.arm.name}/{self.name}"

    def ready(self) -> bool:
        """Whether the network is known (its search, if any, has finished)."""
        return self.search_dir is None or (self.search_dir / SEARCH_DONE).is_file()


def machine(device: str) -> dict[str, Optional[str]]:
    """What a finished run records of what ran it: the code's commit, the device (a CPU's model
    and vector unit too: float rounding, and so a run's last digits, differ between machines)
    and torch's version. Taken when the process starts (:class:`Experiment`), since a commit made
    while it runs changes the checkout but not the code it has loaded."""
    return {"code": code_version(), "device": device_name(resolve_device(device)), "torch": torch.__version__}


SEARCH_DONE, TRAIN_DONE = "result.json", "record.json"  # a run directory holding it has finished
REFERENCE_SCORES = "reference_scores.json"  # a search's selector's scores of the references


def references(members: list[Member]) -> list[Member]:
    """The members whose genotypes no search chose (the random ones and the control): the
    networks that judge every search's selector alike."""
    return [m for m in members if m.search_dir is None and m.genotype is not None]


def retrained_means(out_dir: PathLike, field: str = "valid_loss") -> dict[tuple[str, str], float]:
    """``{(arm name, member name): mean of field}`` of the experiment in ``out_dir``: a number its
    trainings record (``valid_loss``, the validation loss; ``d_model``, the width it was sized
    to), averaged over the member's finished trainings (``train/ARM/MEMBER-seedS/`` holding
    TRAIN_DONE), whatever their seeds."""
    values: dict[tuple[str, str], list[float]] = {}
    for record in sorted(Path(out_dir).glob(f"train/*/*/{TRAIN_DONE}")):
        member = record.parent.name.rsplit("-seed", 1)[0]
        values.setdefault((record.parent.parent.name, member), []).append(json.loads(record.read_text())[field])
    return {key: statistics.mean(numbers) for key, numbers in values.items()}


POLL_SECONDS = 30.0  # how often a process with nothing left to start looks at what others hold


@dataclass
class Task:
    """One search (``search``) or training of the experiment: ``member()`` (known once
    ``ready()``) with ``seed``; ``label`` names it before it is known."""

    member: Callable[[], Member]
    seed: int
    search: bool = False
    ready: Callable[[], bool] = lambda: True
    label: str = ""


class Experiment:
    """Runs ``spec`` in ``out_dir`` (see the module docstring); :meth:`run` returns the summary
    (None when ``max_minutes`` ended it first: run it again to continue).

    Several processes may run one experiment directory together (the same command started
    twice, e.g. one thread each on two cores): each search and training is locked by the process
    that runs it (``locks/``), the others take the next one, and wait when everything left is held
    or waits for held runs."""

    def __init__(
        self, spec: ExperimentSpec, out_dir: PathLike, data_dir: Optional[PathLike] = None, device: str = "auto"
    ) -> None:
        self.spec, self.out_dir, self.data_dir, self.device = spec, Path(out_dir), data_dir, device
        self.ranks = Ranks.from_environment(device)  # under torchrun every run is shared out; rank 0 writes
        saved = self.out_dir / "spec.json"
        if saved.is_file():
            _check_continues(json.loads(saved.read_text()), json.loads(json.dumps(spec.to_dict())), saved)
        self.clock = RunClock()
        self.machine = machine(device)

    def _write(self, path: Path, text: str) -> None:
        """Write ``path`` (rank 0), and let every process go on once it is there."""
        if self.ranks.main:
            write_atomic(path, text)
        self.ranks.barrier()

    def run(self, max_minutes: Optional[float] = None) -> Optional[dict]:
        """Run or continue the experiment: the data's files are checked to be there (the
        training, validation and test splits of the pair) before spec.json is written."""
        self.deadline = None if max_minutes is None else 60.0 * max_minutes
        for split in ("train", "val", self.spec.split):
            multi30k_files(self.spec.pair, split, self.data_dir)
        self._write(self.out_dir / "spec.json", json.dumps(self.spec.to_dict(), indent=1))
        data = prepare_data(self.spec.pair, ("train", "val"), self.data_dir, vocab_size=self.spec.vocab_size)
        members = self.members
        if not self._run_tasks(self._tasks(members), data):
            return None
        scored = self._scored_runs(members, self._finalists(members))
        while True:  # one process reports at a time; the next finds the report made
            with self._hold("report") as mine:
                if mine:
                    return self._report(scored, self._selector_check(members))
            time.sleep(POLL_SECONDS)

    def status(self) -> list[str]:
        """One line per search and training, in the order they run: done (steps of a search; the
        validation loss of a training), running in another process (its last logged step),
        started (a checkpoint to continue from), waiting for other runs, or to do; then a count,
        with the time the trainings left would take at the finished ones' mean; then the table of
        the finished trainings (:func:`report.validation_table`: validation only, never the test)
        and, once the references are trained, each search's selector against them
        (:meth:`_selector_check`)."""
        lines, finished = [], []
        members = self.members
        for task in self._tasks(members):
            what = "search" if task.search else "train"
            if not task.ready():
                lines.append(f"{what:6} {task.label} seed {task.seed}: waits for other runs")
                continue
            member = task.member()
            if not task.search and self._done(task):
                record = self._record(member, task.seed)
                finished.append({"arm": member.arm.name, "member": member.name, **record})
                state = f"done, validation loss {record['valid_loss']:.3f} ({record['minutes']:.0f} minutes)"
            else:
                state = self._state(task, self._run_dir(task))
            lines.append(f"{what:6} {member.key} seed {task.seed}: {state}")
        done, running = (sum(f": {state}" in line for line in lines) for state in ("done", "running"))
        count = f"{done} of {len(lines)} runs done, {running} running"
        trainings_left = sum(line.startswith("train") and ": done" not in line for line in lines)
        if finished and trainings_left:
            hours = trainings_left * statistics.mean(run["minutes"] for run in finished) / 60
            count += f"; {trainings_left} trainings left, about {hours:.1f} hours of one process at their mean so far"
        checks = selector_lines(self._selector_check(members))
        return [
            *lines,
            count,
            *([""] + validation_table(finished).splitlines() if finished else []),
            *([""] + checks if checks else []),
        ]

    def _state(self, task: Task, run_dir: Path) -> str:
        """The state of a search, or of a training not finished (see :meth:`status`)."""
        if self._done(task):
            return f"done, {json.loads((run_dir / SEARCH_DONE).read_text())['steps']} steps"
        log = JsonLog(run_dir / (SEARCH_LOG if task.search else LOG_FILE), writes=False)
        steps = [record["step"] for record in log.read()]
        where = f" (step {steps[-1]})" if steps else ""
        with self._hold(self._lock(run_dir)) as mine:
            if not mine:
                return "running in another process" + where
        checkpoint = run_dir / (SEARCH_CHECKPOINT if task.search else LAST_FILE)
        return "started, to continue" + where if checkpoint.is_file() else "to do"

    def _time_left(self) -> bool:
        """Whether to start another search, training or scoring (one answer for every process)."""
        over = self.deadline is not None and self.clock.seconds() >= self.deadline
        return not self.ranks.any(over)

    @functools.cached_property
    def members(self) -> list[Member]:
        """Every network to train (a searched one's genotype is read once its search is done),
        built once: their genotypes are written to genotypes/ as they are known."""
        space = searched_space(preset(self.spec.search_preset), self.spec.search_settings().parameter_free)
        members = []
        for arm in self.spec.arms:
            if arm.searches:
                searches = self.out_dir / "searches" / arm.name
                members += [Member(arm, f"seed{s}", None, searches / f"seed{s}", s) for s in arm.seeds]
            elif arm.kind == "random":
                members += [Member(arm, f"g{i}", random_genotype(space, i)) for i in range(arm.count)]
            elif arm.kind == "control":
                members.append(Member(arm, "control", control_genotype(space)))
            else:
                members.append(Member(arm, arm.kind))
        for member in members:
            if member.genotype is not None and self.ranks.main:
                member.genotype.save(self.out_dir / "genotypes" / f"{member.arm.name}-{member.name}.json")
        return members

    def _tasks(self, members: list[Member]) -> list[Task]:
        """Every search and training, in the order to start them: the searches, each network with
        the first training seed, the other seeds of the finalists outside the random arms, and
        those of the random finalists (known once every random network has its first training)."""

        def of(member: Member, seed: int, **fields) -> Task:
            return Task(lambda: member, seed, label=member.key, **fields)

        def randoms_trained() -> bool:
            return all((self._train_dir(m, first) / TRAIN_DONE).is_file() for m in randoms)

        first, *others = self.spec.train_seeds
        randoms = [m for m in members if m.arm.kind == "random"]
        tasks = [of(m, m.search_seed, search=True) for m in members if m.search_dir is not None]
        tasks += [of(m, first, ready=m.ready) for m in members]
        tasks += [of(m, seed, ready=m.ready) for m in members if m.arm.kind != "random" for seed in others]
        for rank in range(min(self.spec.random_finalists, len(randoms))):
            finalist = functools.partial(self._random_finalist, randoms, rank)
            label = f"random finalist {rank + 1} (best on validation after its first training)"
            tasks += [Task(finalist, seed, ready=randoms_trained, label=label) for seed in others]
        return tasks

    def _train_dir(self, member: Member, seed: int) -> Path:
        return self.out_dir / "train" / member.arm.name / f"{member.name}-seed{seed}"

    def _run_dir(self, task: Task) -> Path:
        member = task.member()
        return member.search_dir if task.search else self._train_dir(member, task.seed)

    def _done(self, task: Task) -> bool:
        return task.ready() and (self._run_dir(task) / (SEARCH_DONE if task.search else TRAIN_DONE)).is_file()

    def _run_tasks(self, tasks: list[Task], data: PreparedData) -> bool:
        """Run every task not done yet, the first ready one not held by another process first;
        False when out of time or stopped by a signal."""
        waiting = False
        while True:
            pending = [task for task in tasks if not self._done(task)]
            if not pending:
                return True
            if not self._time_left():
                return False
            for task in (task for task in pending if task.ready()):
                run_dir = self._run_dir(task)
                with self._hold(self._lock(run_dir)) as mine:
                    if mine and not self._done(task):
                        if self.ranks.main:
                            what = "search" if task.search else "train"
                            print(
                                f"experiment: {what} {task.member().key} seed {task.seed} in {run_dir}", file=sys.stderr
                            )
                        if not (self._search(task, data) if task.search else self._train(task, data)):
                            return False
                        waiting = False
                        break
            else:
                if not waiting and self.ranks.main:
                    print(f"waiting for {len(pending)} runs that other processes hold or wait for", file=sys.stderr)
                waiting = True
                time.sleep(POLL_SECONDS)

    def _lock(self, run_dir: Path) -> str:
        """The name of the lock of ``run_dir`` (see :meth:`_hold`)."""
        return "--".join(run_dir.relative_to(self.out_dir).parts)

    @contextlib.contextmanager
    def _hold(self, name: str) -> Iterator[bool]:
        """Take the lock ``name`` for this process (rank 0 takes it for all ranks): whether it got it."""
        lock = self.out_dir / "locks" / f"{name}.lock"
        with exclusive(lock) if self.ranks.main else contextlib.nullcontext(False) as mine:
            yield self.ranks.any(mine)

    def _search(self, task: Task, data: PreparedData) -> bool:
        """Run (or continue) a search; False when a signal stopped it."""
        member, run_dir = task.member(), self._run_dir(task)
        settings, method, selector = self.spec.search_parts(member.arm, task.seed)
        resume = (run_dir / SEARCH_CHECKPOINT).is_file()  # else what a kill left goes
        config = self.spec.search_model_config(member.arm)
        result = Searcher(
            config, data, settings, run_dir, method=method, selector=selector, resume=resume, overwrite=not resume
        ).run()
        if result.stopped_by in SIGNAL_NAMES:
            return False
        self._score_references(member)
        self._write(run_dir / SEARCH_DONE, json.dumps({"steps": result.steps, **self.machine}, indent=1))
        return True

    def _score_references(self, member: Member) -> None:
        """Score the references (:func:`references`: genotypes no search chose, whose retrains
        judge a selector without leaning its way) with ``member``'s own selector and settings on
        its trained supernet, into REFERENCE_SCORES beside its search: ``{"selector", "score"
        (its name), "higher_is_better", "scores": {member key: score}}``. Done as the search
        ends, while its checkpoint is there; :meth:`_selector_check` sets the scores against the
        retrains. Rank 0 scores; the other processes of a torchrun wait for it."""
        from .search.reselect import TrainedSupernet

        if self.ranks.main:
            chosen = references(self.members)
            trained = TrainedSupernet(member.search_dir, resolve_device(self.device))
            for reference in chosen:
                reference.genotype.validate(trained.config)
            data = prepare_data(self.spec.pair, ("val",), self.data_dir, tokenizer=Tokenizer(trained.tokenizer))
            select_settings = self.spec.search_parts(member.arm, member.search_seed)[2]
            name = trained.settings.select
            selector, scores = trained.score(name, select_settings, [m.genotype for m in chosen], data)
            record = {
                "selector": name,
                "score": selector.score_name,
                "higher_is_better": selector.higher_is_better,
                "scores": {m.key: score for m, score in zip(chosen, scores)},
            }
            write_atomic(member.search_dir / REFERENCE_SCORES, json.dumps(record, indent=1))
        self.ranks.barrier()

    def _selector_check(self, members: list[Member]) -> list[dict]:
        """Per finished search with reference scores: Spearman's correlation between its
        selector's score of the references (turned so that better is higher) and minus their
        retrained validation loss (the mean over their finished trainings), once every reference
        has finished its first training: +1 means the selector orders them as their retrains
        do. Validation only. A last row (arm None, selector ``sized_width``) is the baseline
        that needs no search: the d_model each reference was sized to, wider ranked better (a
        network of cheap ops is retrained wider); a selector earns its search by beating it."""
        chosen = references(members)
        if not chosen or not all((self._train_dir(m, self.spec.train_seeds[0]) / TRAIN_DONE).is_file() for m in chosen):
            return []
        retrained = retrained_means(self.out_dir)
        losses = {m.key: retrained[(m.arm.name, m.name)] for m in chosen}
        keys = [m.key for m in chosen]
        scored = [m for m in members if m.search_dir is not None and (m.search_dir / REFERENCE_SCORES).is_file()]
        rows = []
        for member in scored:
            record = json.loads((member.search_dir / REFERENCE_SCORES).read_text())
            sign = 1.0 if record["higher_is_better"] else -1.0
            rho = spearman([sign * record["scores"][k] for k in keys], [-losses[k] for k in keys])
            row = {"arm": member.arm.name, "member": member.name, "selector": record["selector"], "spearman": rho}
            rows.append({**row, "references": len(keys)})
        if rows:  # the baseline no search needs: the width each reference was sized to, wider better
            widths = retrained_means(self.out_dir, "d_model")
            rho = spearman([widths[(m.arm.name, m.name)] for m in chosen], [-losses[k] for k in keys])
            row = {"arm": None, "member": None, "selector": "sized_width", "spearman": rho}
            rows.append({**row, "references": len(keys)})
        return rows

    def _genotype(self, member: Member) -> Optional[Genotype]:
        """``member``'s genotype, read from its finished search (and copied to genotypes/) if need be."""
        if member.genotype is None and member.search_dir is not None:
            member.genotype = Genotype.load(member.search_dir / GENOTYPE_FILE)
            if self.ranks.main:
                member.genotype.save(self.out_dir / "genotypes" / f"{member.arm.name}-{member.name}.json")
        return member.genotype

    def _size(self, member: Member) -> tuple[Architecture, ModelConfig]:
        """``member``'s architecture and its config at the experiment's size: the size its first
        training recorded, if done (every seed trains the same network), else
        :func:`~mdarts.sizing.sized_config`'s from the training preset (a baseline) or
        :meth:`ExperimentSpec.model_config` (a genotype)."""
        baseline = member.arm.kind in BASELINES
        arch = member.arm.kind if baseline else self._genotype(member)
        base = preset(self.spec.train_preset, training=True) if baseline else self.spec.model_config()
        first = self._train_dir(member, self.spec.train_seeds[0]) / TRAIN_DONE
        if first.is_file():
            record = json.loads(first.read_text())
            return arch, base.replace(d_model=record["d_model"], embed_dim=record["embed_dim"])
        if baseline:
            return arch, sized_config(arch, base, self.spec.params, self.spec.vocab_size)
        return arch, self.spec.size_genotype(arch, base)

    def _train(self, task: Task, data: PreparedData) -> bool:
        """Train a network (or continue it) and write its record; False when a signal stopped it."""
        member, run_dir = task.member(), self._run_dir(task)
        arch, config = self._size(member)
        build = builder(arch, self.spec.vocab_size)
        settings = self.spec.train_config(task.seed).replace(device=self.device)
        resume = (run_dir / LAST_FILE).is_file()  # else what a kill left goes
        result = Trainer(lambda: build(config), data, settings, run_dir, resume=resume, overwrite=not resume).run()
        if result.stopped_by in SIGNAL_NAMES:
            return False
        self._translate_test(member, task.seed)  # again after a resume: the translation must be this training's
        total, non_embedding = count_parameters(build, config)
        record = {
            "seed": task.seed,
            "params": total,
            "non_embedding_params": non_embedding,
            "d_model": config.d_model,
            "embed_dim": config.embed_dim,
            "valid_loss": result.details["best_valid_loss"],
            "minutes": load_checkpoint(run_dir / LAST_FILE)["train_seconds"] / 60.0,
            **self.machine,
        }
        self._write(run_dir / TRAIN_DONE, json.dumps(record, indent=1))
        return True

    def _record(self, member: Member, seed: int) -> dict:
        return json.loads((self._train_dir(member, seed) / TRAIN_DONE).read_text())

    def _random_finalist(self, randoms: list[Member], rank: int) -> Member:
        """The random network ranked ``rank`` on validation loss after its first training."""
        return sorted(randoms, key=lambda m: self._record(m, self.spec.train_seeds[0])["valid_loss"])[rank]

    def _finalists(self, members: list[Member]) -> list[Member]:
        """Every member outside the random arms, and the best random ones on validation loss."""
        randoms = [m for m in members if m.arm.kind == "random"]
        best = [self._random_finalist(randoms, r) for r in range(min(self.spec.random_finalists, len(randoms)))]
        return [m for m in members if m.arm.kind != "random"] + best

    def _scored_runs(self, members: list[Member], finalists: list[Member]) -> list[tuple[Member, int, bool]]:
        """(member, training seed, whether a finalist) of every run the report scores, arm by arm."""
        finals = {m.key for m in finalists}
        return [
            (member, seed, member.key in finals)
            for arm in self.spec.arms
            for member in members
            if member.arm is arm
            for seed in (self.spec.train_seeds if member.key in finals else self.spec.train_seeds[:1])
        ]

    def _test_corpus(self):
        """The test split (its first ``limit`` pairs when set) and its tokenised references (or None)."""
        from .data import load_pair
        from .evaluate import load_tok_references

        corpus = load_pair(self.spec.pair, self.spec.split, self.data_dir)
        tok_refs = load_tok_references(self.data_dir, self.spec.split, corpus.tgt_lang) if self.data_dir else None
        if self.spec.limit:
            corpus.src, corpus.tgt = corpus.src[: self.spec.limit], corpus.tgt[: self.spec.limit]
            tok_refs = None if tok_refs is None else tok_refs[: self.spec.limit]
        return corpus, tok_refs

    def _translation_path(self, member: Member, seed: int) -> Path:
        return self.out_dir / "translations" / member.arm.name / f"{member.name}-seed{seed}.txt"

    def _translate_test(self, member: Member, seed: int) -> None:
        """Translate the test split with a finished run's best checkpoint into
        translations/<arm>/<member>-seed<seed>.txt (one detokenised line a sentence, as
        ``mdarts translate`` writes it: :func:`~mdarts.translate.translate_lines`). The lines
        are scored only by the report, once every run has its translation. Rank 0 translates;
        the other processes of a torchrun wait for it."""
        if not self.ranks.main:
            self.ranks.barrier()
            return
        device = resolve_device(self.device)
        loaded = load_model(self._train_dir(member, seed) / BEST_FILE, device)
        corpus, _ = self._test_corpus()
        lines = translate_lines(loaded.model, loaded.tokenizer, corpus.src, beam_size=self.spec.beam, device=device)
        write_atomic(self._translation_path(member, seed), "".join(f"{line}\n" for line in lines))
        self.ranks.barrier()

    def _report(self, scored: list[tuple[Member, int, bool]], selectors: list[dict]) -> dict:
        """Write summary.json, table.md and bleu.png from the scores of ``scored`` and the
        selectors' check (:meth:`_selector_check`; rank 0, the other processes return an empty
        summary)."""
        if not self.ranks.main:
            return {}
        from .data import read_lines
        from .evaluate import score

        corpus, tok_refs = self._test_corpus()
        arms, signatures = [], {}
        for arm in self.spec.arms:
            runs_of_arm = []
            for member, seed, finalist in (entry for entry in scored if entry[0].arm is arm):
                hypotheses = read_lines(self._translation_path(member, seed))
                scored_run = score(hypotheses, corpus.tgt, corpus.tgt_lang, tok_refs)
                scores = {name: entry["score"] for name, entry in scored_run.items()}
                signatures = {entry["label"]: entry["signature"] for entry in scored_run.values()}
                runs_of_arm.append(
                    {
                        "member": member.name,
                        **self._record(member, seed),
                        "bleu": scores["bleu"],
                        "lc_bleu": scores["bleu_lc_tok"],
                        "chrf": scores["chrf"],
                        "finalist": finalist,
                        "genotype": None if self._genotype(member) is None else member.genotype.summary(),
                    }
                )
            searches = {entry[0].search_dir for entry in scored if entry[0].arm is arm and entry[0].search_dir}
            trainings = [self._record(m, seed)["minutes"] for m, seed, _ in scored if m.arm is arm]  # all it ran
            arms.append(
                {
                    "name": arm.name,
                    "kind": arm.kind,
                    "search_minutes": sum(map(_search_minutes, sorted(searches))),
                    "train_minutes": sum(trainings),
                    "runs": runs_of_arm,
                }
            )
        summary = {
            "name": self.spec.name,
            "pair": self.spec.pair,
            "split": self.spec.split,
            "train_seeds": list(self.spec.train_seeds),
            "signatures": signatures,
            "arms": arms,
            **({"selectors": selectors} if selectors else {}),
        }
        write_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=1))
        write_report(summary, self.out_dir)
        return summary

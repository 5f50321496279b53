"""Choosing again from a finished search (``mdarts derive RUN --select NAME``): the trained
supernet rebuilt from the run's checkpoint, any selector run on it without searching again,
or any selector's score of given genotypes (``--score``).

A re-choice is written beside the run's own genotype: ``genotype-NAME.json`` and
``selection-NAME.jsonl`` (one line per scored genotype: its summary and score).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import load_checkpoint
from ..config import ModelConfig, SearchSettings, Settings
from ..files import RunDirectory, RunLock, write_atomic
from ..genotype import Genotype
from ..model import Supernet
from ..prepare import PreparedData
from .parts import SELECTORS, check_parts
from .run import selection_context


class TrainedSupernet:
    """The supernet of the search run in ``run_dir`` as its checkpoint left it (eval mode, on
    ``device``), the run's settings, and what its data was (``data``: the checkpoint's record
    of the pair and tokenizer)."""

    def __init__(self, run_dir: Path, device: torch.device) -> None:
        self.run_dir = Path(run_dir)
        checkpoint = load_checkpoint(RunDirectory(run_dir, "search").checkpoint, kind="search")
        self.settings = SearchSettings.from_dict(checkpoint["settings"])
        self.config = ModelConfig.from_dict(checkpoint["config"])
        self.tokenizer = checkpoint["tokenizer"]
        self.data: dict[str, str] = checkpoint.get("data") or {}
        self.model = Supernet(self.config, checkpoint["vocab_size"])
        state = checkpoint["searcher"]
        self.model.load_state_dict(state["model"])
        self.model.set_dropped(state.get("dropped", [[] for _ in self.model.dropped]))
        self.model.to(device).eval()
        self.device = device

    def selector(self, name: str, settings: Optional[Settings], has_validation: bool):
        """Selector ``name`` (with ``settings``, else its defaults), checked against this run's method."""
        check_parts(self.settings.method, name, has_validation)
        cls = SELECTORS[name]
        return cls(settings if settings is not None else cls.Settings())

    def select(self, name: str, settings: Optional[Settings], data: Optional[PreparedData]) -> Genotype:
        """Choose with selector ``name``; writes ``genotype-NAME.json`` and ``selection-NAME.jsonl``
        into the run directory and returns the genotype. Holds the run's lock while it does (a
        search still writing the run, or another choice, is refused: RunDirectoryBusy)."""
        selector = self.selector(name, settings, data is not None and "val" in data.splits)
        lock = RunLock(self.run_dir, option="RUN")
        lock.acquire()
        try:
            genotype, records = selector.select(selection_context(self.model, self.settings, data, self.device))
            genotype.save(self.run_dir / f"genotype-{name}.json")
            lines = "".join(json.dumps({"selector": name, **record}) + "\n" for record in records)
            write_atomic(self.run_dir / f"selection-{name}.jsonl", lines)
        finally:
            lock.release()
        return genotype

    def score(
        self, name: str, settings: Optional[Settings], genotypes: list[Genotype], data: Optional[PreparedData]
    ) -> tuple[Any, list[float]]:
        """Selector ``name``'s score of each of ``genotypes`` (and the selector, which says the
                score's name and direction). The genotypes must be of this supernet's space (the caller checks,
        ``Genotype.validate(self.config)``)."""
        selector = self.selector(name, settings, data is not None and "val" in data.splits)
        context = selection_context(self.model, self.settings, data, self.device)
        return selector, selector.score(context, genotypes)

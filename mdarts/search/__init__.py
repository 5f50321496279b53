"""Architecture search (docs/design.md 1.1, 2.4): a supernet method trains the supernet, a
selector chooses the genotype, and :class:`Searcher` runs the two.

Modules: :mod:`~mdarts.search.run` (the run of a search), :mod:`~mdarts.search.parts` (the
method and selector interfaces and their registries), :mod:`~mdarts.search.weights` (the
weights' update every method shares), the methods :mod:`~mdarts.search.darts`,
:mod:`~mdarts.search.gdas` and :mod:`~mdarts.search.single_path`, the selectors
:mod:`~mdarts.search.argmax`, :mod:`~mdarts.search.ranked_paths`,
:mod:`~mdarts.search.evolution` and :mod:`~mdarts.search.perturbation`,
:mod:`~mdarts.search.reselect` (choosing again from a finished search) and
:mod:`~mdarts.search.reporting`. Importing this package registers the built-in parts.
"""

from . import argmax, darts, evolution, gdas, perturbation, ranked_paths, single_path  # noqa: F401  (registers the built-in parts)
from .parts import (
    METHODS,
    SELECTORS,
    SelectionContext,
    Selector,
    SupernetMethod,
    check_parts,
    parts_of_table,
    split_values,
)
from .reporting import argmax_stability, collapse_message, plot_alpha_history
from .run import Searcher, searched_space, selection_context, split_corpus

__all__ = [
    "METHODS",
    "SELECTORS",
    "Searcher",
    "SelectionContext",
    "Selector",
    "SupernetMethod",
    "argmax_stability",
    "check_parts",
    "parts_of_table",
    "collapse_message",
    "plot_alpha_history",
    "searched_space",
    "selection_context",
    "split_corpus",
    "split_values",
]

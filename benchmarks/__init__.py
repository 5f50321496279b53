"""Benchmarks of mdarts and mdarts_kernels, run from the repository root as modules:

    python -m benchmarks.kernels      # fused ops against the eager reference (time, extra peak)
    python -m benchmarks.dropout      # seeded_dropout against F.dropout (time)
    python -m benchmarks.reversible   # ReversibleSequence against depth, per memory mode
    python -m benchmarks.memory       # one supernet training step per memory mode, with the planner
    python -m benchmarks.search_width # a search step of the tiny supernet against the retrained network's
    python -m benchmarks.selectors    # how a selector ranks genotypes already retrained (Spearman)

Each takes ``--help``; results go under results/. Shared helpers live in
:mod:`benchmarks.common`; memory is measured with :mod:`mdarts.memory`.
"""

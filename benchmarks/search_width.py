"""What searching the network that is retrained costs: one DARTS search step (a weight update,
then an architecture update), and one GDAS step (the same on one Gumbel-drawn path), of the
``tiny`` supernet the experiments searched (d 96, e 64,
2 + 2 layers, FFN 4x, dropout 0.1) against the supernet of the retrained networks
(``search_network = "retrain"`` of an experiment: d 192, e 213, 4 + 4 layers, FFN 2x, dropout
0.3, 4 heads, at 2,349,568 parameters), both on the same real Multi30k En-De batches of the
search preset's 2,048 padded positions, round-robin in one process (medians of --repeats
steps, process CPU time, one thread, memory mode store).

Prints, and writes to --table, each supernet and method's parameters, milliseconds and steps per minute,
the ratio, and the CPU-hours of a 1,500-step search (the experiments' budget).

    OMP_NUM_THREADS=1 python -m benchmarks.search_width --data-dir ../shared/data/multi30k
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import interleaved_medians, write_markdown
from mdarts.batching import TokenBatches
from mdarts.config import search_preset
from mdarts.experiment import ExperimentSpec
from mdarts.model import Supernet
from mdarts.prepare import prepare_data
from mdarts.processes import device_name
from mdarts.search import searched_space
from mdarts.search.darts import DartsSearcher, DartsSettings
from mdarts.search.gdas import Gdas, GdasSettings

SPEC = Path("experiments/en-de.toml")
BUDGET_STEPS = 1500


def supernets(spec: ExperimentSpec) -> dict[str, object]:
    """The two supernets' configs (zero and identity left out, as a search does), memory mode store."""
    retrain = dataclasses.replace(spec, search_network="retrain").search_model_config()
    tiny = dataclasses.replace(spec, search_network="preset").search_model_config()
    return {
        "tiny (searched so far)": searched_space(tiny, False).replace(memory_mode="store"),
        "retrain (the network retrained)": searched_space(retrain, False).replace(memory_mode="store"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search_width", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="folder of the raw Multi30k files")
    parser.add_argument("--repeats", type=int, default=9, help="timed steps per supernet (median reported)")
    parser.add_argument("--table", type=Path, default=Path("results/search-width.md"), help="markdown, overwritten")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = ExperimentSpec.load(SPEC)
    data = prepare_data(spec.pair, ("train",), args.data_dir, vocab_size=spec.vocab_size)
    run = search_preset(spec.search_preset).replace(max_steps=BUDGET_STEPS, device="cpu")
    train = data["train"]
    batches = TokenBatches(train.src_ids, train.tgt_ids, run.max_tokens, seed=0, shuffle=True, max_positions=128)
    fixed = [batches[i] for i in range(8)]
    fns, params = {}, {}
    methods = {"darts": (DartsSearcher, DartsSettings), "gdas": (Gdas, GdasSettings)}
    for (supernet, config), (method, (cls, settings)) in itertools.product(supernets(spec).items(), methods.items()):
        torch.manual_seed(0)
        model = Supernet(config, data.tokenizer.vocab_size)
        searcher = cls(model, run, settings(weights_only_fraction=0.0))
        stream = itertools.cycle(fixed)
        name = f"{supernet}, {method}"
        fns[name] = lambda searcher=searcher, stream=stream: searcher.step(lambda part: next(stream))
        params[name] = model.num_parameters()
    medians = interleaved_medians(fns, torch.device("cpu"), args.repeats, warmup=1, clock=time.process_time)
    small, small_gdas, large, large_gdas = list(medians)
    lines = [
        "# One search step: the tiny supernet against the retrained network's, DARTS and GDAS",
        "",
        f"Command: `{' '.join(['python -m benchmarks.search_width', *(argv if argv is not None else sys.argv[1:])])}`"
        f" on {device_name(torch.device('cpu'))}; a weight and an architecture update on real En-De batches of "
        f"{run.max_tokens} padded positions (GDAS: each on one path drawn from alpha), "
        f"medians of {args.repeats} round-robin steps (process CPU time).",
        "",
        f"| supernet, method | parameters | ms a step | steps a minute | CPU-hours for {BUDGET_STEPS:,} steps |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {params[name]:,} | {ms:.0f} | {60_000 / ms:.1f} | {BUDGET_STEPS * ms / 3.6e6:.2f} |"
            for name, ms in medians.items()
        ),
        "",
        f"The retrained network's supernet costs {medians[large] / medians[small]:.1f}x the tiny one's per DARTS step;"
        f" a GDAS step costs {medians[small_gdas] / medians[small]:.2f}x a DARTS step on the tiny supernet,"
        f" {medians[large_gdas] / medians[large]:.2f}x on the retrained network's.",
    ]
    write_markdown(args.table, lines)


if __name__ == "__main__":
    main()

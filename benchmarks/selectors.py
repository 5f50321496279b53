"""How well a selector ranks networks that were already retrained, before it picks one.

For every genotype an experiment retrained (``EXPERIMENT/genotypes/*.json``; the baselines
have none), its retrained validation loss (the mean over its training seeds, from each
training's ``record.json``) against each selector's score of it on a finished search's
supernet (``mdarts derive RUN --select NAME --score ...``). Prints, per search run and
selector, Spearman's rank correlation between the score (turned so that better is higher)
and the negated validation loss: +1 means the selector orders the genotypes exactly as their
retrains do. Validation data only; test BLEU plays no part.

``--sized-width`` adds the baseline that needs no supernet: each genotype scored by the
d_model it was retrained at (sized to the experiment's parameter count, the mean over its
trainings; wider is better), which is how much its ops' parameters cost the network. With it,
each selector's Spearman is also given within each width (genotypes retrained at the same
d_model, where there are at least 3): what the selector sees that the width does not.

    OMP_NUM_THREADS=1 python -m benchmarks.selectors results/en-de-2.35M [RUN ...] [--sized-width] \\
        --data-dir ../shared/data/multi30k [--select argmax ranked_paths] [--out results/selectors.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from mdarts.experiment import retrained_means
from mdarts.genotype import Genotype
from mdarts.prepare import prepare_data
from mdarts.report import spearman
from mdarts.search import METHODS, SELECTORS
from mdarts.search.reselect import TrainedSupernet
from mdarts.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path, help="an experiment directory (genotypes/, train/)")
    parser.add_argument("runs", type=Path, nargs="*", help="finished search run directories")
    parser.add_argument("--sized-width", action="store_true", help="also score each genotype by its retrained d_model")
    parser.add_argument("--data-dir", type=Path, help="folder of the raw Multi30k files")
    parser.add_argument("--select", nargs="+", default=list(SELECTORS.names()), choices=SELECTORS.names())
    parser.add_argument("--out", type=Path, help="append one JSON line per run and selector here")
    args = parser.parse_args()
    if not args.runs and not args.sized_width:
        parser.error("give search run directories, --sized-width or both")
    # keyed as the genotype files are named: ARM-MEMBER.json
    losses = {f"{arm}-{member}": loss for (arm, member), loss in retrained_means(args.experiment).items()}
    files = {path.stem: path for path in sorted((args.experiment / "genotypes").glob("*.json"))}
    names = [name for name in files if name in losses]
    genotypes = [Genotype.load(files[name]) for name in names]
    widths = None
    if args.sized_width:
        widths = {f"{arm}-{member}": d for (arm, member), d in retrained_means(args.experiment, "d_model").items()}
        report(args.out, args.experiment, None, None, "sized_width", names, [widths[n] for n in names], True, losses)
    for run in args.runs:
        trained = TrainedSupernet(run, torch.device("cpu"))
        pair = trained.data.get("pair")
        data = prepare_data(pair, ("val",), args.data_dir, tokenizer=Tokenizer(trained.tokenizer))
        for name in args.select:
            if SELECTORS[name].needs_alpha and not METHODS[trained.settings.method].trains_alpha:
                print(f"{run} {name}: skipped (method {trained.settings.method} trains no alpha)")
                continue
            selector, scores = trained.score(name, None, genotypes, data)
            method, better = trained.settings.method, selector.higher_is_better
            report(args.out, args.experiment, run, method, name, names, scores, better, losses, widths)


def report(
    out: Optional[Path],
    experiment: Path,
    run: Optional[Path],
    method: Optional[str],
    name: str,
    names: list[str],
    scores: list[float],
    higher_is_better: bool,
    losses: dict[str, float],
    widths: Optional[dict[str, float]] = None,
) -> None:
    """Print the Spearman of ``scores`` (one per genotype of ``names``) against minus the retrained
    ``losses`` of ``experiment``, and with ``widths`` (d_model by name) the same within each width
    held by at least 3 genotypes; with ``out``, append its JSON line (run and method None: no
    supernet)."""
    better = scores if higher_is_better else [-s for s in scores]
    rho = spearman(better, [-losses[n] for n in names])
    source = f"{run} ({method})" if run is not None else "no supernet"
    print(f"{source} {name}: Spearman {rho:+.2f} over {len(names)} genotypes")
    within = {}
    for width in sorted(set(widths.values()) if widths else (), reverse=True):
        group = [i for i, n in enumerate(names) if widths[n] == width]
        if len(group) >= 3:
            within[width] = spearman([better[i] for i in group], [-losses[names[i]] for i in group])
            print(f"    within d_model {width:g}: Spearman {within[width]:+.2f} over {len(group)} genotypes")
    if out:
        line = {"experiment": str(experiment), "run": str(run) if run is not None else None, "method": method}
        line |= {"select": name, "spearman": rho}
        if within:
            line["within_width"] = {f"{width:g}": value for width, value in within.items()}
        line["genotypes"] = [{"name": n, "score": s, "valid_loss": losses[n]} for n, s in zip(names, scores)]
        with out.open("a") as handle:
            handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

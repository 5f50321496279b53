"""How well a selector ranks networks that were already retrained, before it picks one.

For every genotype an experiment retrained (``EXPERIMENT/genotypes/*.json``; the baselines
have none), its retrained validation loss (the mean over its training seeds, from each
training's ``record.json``) against each selector's score of it on a finished search's
supernet (``mdarts derive RUN --select NAME --score ...``). Prints, per search run and
selector, Spearman's rank correlation between the score (turned so that better is higher)
and the negated validation loss: +1 means the selector orders the genotypes exactly as their
retrains do. Validation data only; test BLEU plays no part.

    OMP_NUM_THREADS=1 python -m benchmarks.selectors results/en-de-2.35M RUN [RUN ...] \\
        --data-dir ../shared/data/multi30k [--select argmax ranked_paths] [--out results/selectors.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mdarts.experiment import retrained_losses
from mdarts.genotype import Genotype
from mdarts.prepare import prepare_data
from mdarts.report import spearman
from mdarts.search import METHODS, SELECTORS
from mdarts.search.reselect import TrainedSupernet
from mdarts.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path, help="an experiment directory (genotypes/, train/)")
    parser.add_argument("runs", type=Path, nargs="+", help="finished search run directories")
    parser.add_argument("--data-dir", type=Path, help="folder of the raw Multi30k files")
    parser.add_argument("--select", nargs="+", default=list(SELECTORS.names()), choices=SELECTORS.names())
    parser.add_argument("--out", type=Path, help="append one JSON line per run and selector here")
    args = parser.parse_args()
    # keyed as the genotype files are named: ARM-MEMBER.json
    losses = {f"{arm}-{member}": loss for (arm, member), loss in retrained_losses(args.experiment).items()}
    files = {path.stem: path for path in sorted((args.experiment / "genotypes").glob("*.json"))}
    names = [name for name in files if name in losses]
    genotypes = [Genotype.load(files[name]) for name in names]
    for run in args.runs:
        trained = TrainedSupernet(run, torch.device("cpu"))
        pair = trained.data.get("pair")
        data = prepare_data(pair, ("val",), args.data_dir, tokenizer=Tokenizer(trained.tokenizer))
        for name in args.select:
            if SELECTORS[name].needs_alpha and not METHODS[trained.settings.method].trains_alpha:
                print(f"{run} {name}: skipped (method {trained.settings.method} trains no alpha)")
                continue
            selector, scores = trained.score(name, None, genotypes, data)
            better = scores if selector.higher_is_better else [-s for s in scores]
            rho = spearman(better, [-losses[n] for n in names])
            print(f"{run} ({trained.settings.method}) {name}: Spearman {rho:+.2f} over {len(names)} genotypes")
            if args.out:
                line = {"run": str(run), "method": trained.settings.method, "select": name, "spearman": rho}
                line["genotypes"] = [{"name": n, "score": s, "valid_loss": losses[n]} for n, s in zip(names, scores)]
                with args.out.open("a") as handle:
                    handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

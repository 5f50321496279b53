"""Training throughput with 1 and with N processes (torchrun, gloo on the CPU, one thread each).

    python -m benchmarks.distributed [--processes 2] [--steps 30] [--repeats 3]

Runs the same short ``mdarts train`` (the Transformer of the tiny preset on the first 2000
pairs of Multi30k En-De, as generic files) alternately with 1 and with N processes, each in a
fresh ``torchrun``, and prints the median of the target tokens per second (over all
processes: the run's last log line) and of the updates per second. With N processes a step
holds N batches, so tokens per second is the figure to compare.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MDARTS_DATA", REPO_ROOT.parent / "shared" / "data" / "multi30k"))


def write_corpus(data_dir: Path, folder: Path, pairs: int) -> list[str]:
    """The first ``pairs`` training and 100 validation pairs of En-De as files; their options."""
    options = []
    for split, name, count in (("train", "train", pairs), ("val", "valid", 100)):
        for lang, side in (("en", "src"), ("de", "tgt")):
            with gzip.open(data_dir / f"{split}.{lang}.gz", "rt", encoding="utf-8") as handle:
                lines = [next(handle) for _ in range(count)]
            path = folder / f"{split}.{lang}.gz"
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                handle.writelines(lines)
            options += [f"--{name}-{side}", str(path)]
    return options


def run(processes: int, steps: int, corpus: list[str], folder: Path) -> dict:
    out = folder / f"run-{processes}-{time.monotonic_ns()}"
    launch = f"-m torch.distributed.run --nproc-per-node {processes} -m mdarts train --arch transformer --preset tiny"
    budget = f"--max-steps {steps} --valid-interval {10 * steps} --log-interval {steps} --max-tokens 2048"
    cache = f"--vocab-size 2000 --tokenizer-cache {folder / 'spm'} --device cpu"
    command = [sys.executable, *launch.split(), "--out", str(out), *budget.split(), *cache.split(), *corpus]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"train"' in line][-1]
    return {"tokens_per_s": last["tokens_per_s"], "steps_per_s": steps / wall}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="N, compared with 1 (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="updates a run (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternated (default 3)")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="Multi30k raw files (default $MDARTS_DATA)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = write_corpus(args.data_dir, folder, 2000)
        results: dict[int, list[dict]] = {1: [], args.processes: []}
        for _ in range(args.repeats):
            for processes in results:
                results[processes].append(run(processes, args.steps, corpus, folder))
    for processes, measured in results.items():
        tokens = statistics.median(m["tokens_per_s"] for m in measured)
        steps = statistics.median(m["steps_per_s"] for m in measured)
        shown = f"{tokens:,.0f} target tokens/s, {steps:.2f} updates/s"
        print(f"{processes} process(es): {shown} (medians of {len(measured)})")


if __name__ == "__main__":
    main()

"""A training step of the Multi30k Transformer (2.35M parameters): float32 against bf16
autocast, the full logits against the output layer in blocks of 256 target tokens.

Times the forward and backward of ``mdarts.loss.sequence_loss`` (what ``Trainer`` runs each
update) on a batch of random tokens shaped like a Multi30k batch of the retrains (--batch
sentences, --length subwords each side, about 4,000 positions), round-robin in one process
(medians of --repeats runs; on the CPU the process CPU time, on CUDA the wall time). On a CPU
without fast bfloat16 (AVX2 only; the device name says which) bf16 autocast is emulated and
slower than float32. Prints a markdown table and writes it to --table.

    python -m benchmarks.train_step
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import interleaved_medians, write_markdown
from mdarts.config import preset
from mdarts.loss import sequence_loss
from mdarts.processes import device_name
from mdarts.sizing import BASELINES

VOCAB = 8000
VARIANTS = {  # name -> (bf16, chunk_rows)
    "float32, full logits": (False, 0),
    "float32, blocks of 256": (False, 256),
    "bf16, full logits": (True, 0),
    "bf16, blocks of 256": (True, 256),
}


def measure(args: argparse.Namespace, device: torch.device) -> tuple[int, dict[str, float]]:
    """(parameters of the network, variant -> median ms of a forward + backward)."""
    torch.manual_seed(0)
    model = BASELINES["transformer"](preset("multi30k-base", training=True), VOCAB).to(device).train()
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (args.batch, args.length), generator=gen).to(device)
    tgt = torch.randint(4, VOCAB, (args.batch, args.length + 1), generator=gen).to(device)

    def step(bf16: bool, rows: int) -> None:
        model.zero_grad(set_to_none=True)
        loss = sequence_loss(model, src, tgt[:, :-1], tgt[:, 1:], 0.1, rows, bf16)[0]
        loss.backward()

    fns = {name: lambda bf16=bf16, rows=rows: step(bf16, rows) for name, (bf16, rows) in VARIANTS.items()}
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    medians = interleaved_medians(fns, device, args.repeats, warmup=1, clock=clock)
    return sum(p.numel() for p in model.parameters()), medians


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128, help="sentences of the batch")
    parser.add_argument("--length", type=int, default=16, help="subwords of each source and target sentence")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--table", type=Path, default=Path("results/train-step.md"), help="markdown table, overwritten")
    args = parser.parse_args(argv)
    for name in ("batch", "length", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    params, medians = measure(args, device)
    base = medians["float32, full logits"]
    lines = [
        f"# A training step of the Multi30k Transformer ({params:,} parameters, {args.batch} x {args.length} "
        "subwords a side)",
        "",
        f"Command: `{' '.join(['python -m benchmarks.train_step', *(argv if argv is not None else sys.argv[1:])])}` "
        f"on {device_name(device)}; forward + backward, medians of {args.repeats} round-robin runs.",
        "",
        "| variant | ms | speed-up over float32, full logits |",
        "|---|---:|---:|",
        *(f"| {name} | {ms:.0f} | {base / ms:.2f}x |" for name, ms in medians.items()),
    ]
    write_markdown(args.table, lines)


if __name__ == "__main__":
    main()

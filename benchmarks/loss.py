"""The output layer and loss: full logits against float32 blocks (``chunked_output_loss``).

Times a forward and backward of ``label_smoothed_loss(features @ weight.T)`` (the full
(tokens x vocab) logits, under bf16 autocast as a bf16 run makes them, and in float32) against
``chunked_output_loss`` with blocks of several sizes, round-robin in one process (medians of
--repeats runs; on the CPU the process CPU time, on CUDA the wall time). Twice: with the
output layer trained (a weight step) and frozen (an architecture step, which needs only the
features' gradient). Prints a markdown table and writes it to --table.

    python -m benchmarks.loss                        # 1,900 tokens, e 64, 8,000 words (tiny search)
    python -m benchmarks.loss --tokens 4000 --embed 128 --blocks 256 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import interleaved_medians, write_markdown
from mdarts.loss import chunked_output_loss, label_smoothed_loss
from mdarts.processes import device_name


def variants(blocks: list[int], device: torch.device) -> dict[str, object]:
    """name -> loss(features, weight, target) returning the summed loss."""

    def full(bf16: bool):
        def run(features, weight, target):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = features @ weight.t()
            return label_smoothed_loss(logits, target, 0)[0]

        return run

    found = {"full logits, bf16": full(True), "full logits, float32": full(False)}
    for rows in blocks:
        found[f"blocks of {rows}"] = lambda f, w, t, rows=rows: chunked_output_loss(f, w, t, 0, 0.1, rows)[0]
    return found


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per (output layer trained or frozen, variant): median ms of forward + backward."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(args.tokens, args.embed, generator=gen).to(device).requires_grad_(True)
    weight = (0.1 * torch.randn(args.vocab, args.embed, generator=gen)).to(device)
    target = torch.randint(1, args.vocab, (args.tokens,), generator=gen).to(device)
    rows = []
    for trained in (True, False):
        weight.requires_grad_(trained)
        inputs = [features, weight] if trained else [features]
        fns = {
            name: lambda fn=fn, inputs=inputs: torch.autograd.grad(fn(features, weight, target), inputs)
            for name, fn in variants(args.blocks, device).items()
        }
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        medians = interleaved_medians(fns, device, args.repeats, clock=clock)
        base = medians["full logits, bf16"]
        layer = "trained" if trained else "frozen"
        rows += [dict(layer=layer, variant=name, ms=ms, speedup=base / ms) for name, ms in medians.items()]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=1900, help="target tokens of the batch")
    parser.add_argument("--embed", type=int, default=64, help="e, the output layer's input width")
    parser.add_argument("--vocab", type=int, default=8000, help="words of the vocabulary")
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512, 1024], help="block rows timed")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--table", type=Path, default=Path("results/loss.md"), help="markdown table, overwritten")
    args = parser.parse_args(argv)
    for name in ("tokens", "embed", "vocab", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if min(args.blocks) < 1:
        parser.error(f"--blocks: expected positive row counts, got {args.blocks}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rows = measure(args, device)
    lines = [
        f"# Output layer and loss: full logits against blocks ({args.tokens:,} tokens, e {args.embed}, "
        f"{args.vocab:,} words)",
        "",
        f"Command: `{' '.join(['python -m benchmarks.loss', *(argv if argv is not None else sys.argv[1:])])}` on "
        f"{device_name(device)}, {torch.get_num_threads()} thread(s); forward + backward, medians of "
        f"{args.repeats} round-robin runs.",
        "",
        "| output layer | variant | ms | speed-up over full logits, bf16 |",
        "|---|---|---:|---:|",
        *(f"| {r['layer']} | {r['variant']} | {r['ms']:.1f} | {r['speedup']:.2f}x |" for r in rows),
    ]
    write_markdown(args.table, lines)


if __name__ == "__main__":
    main()

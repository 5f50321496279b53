"""seeded_dropout against torch's dropout: median time of the forward and of forward+backward.

Every variant runs round-robin in one process (medians of --repeats runs; on the CPU the
process CPU time, on CUDA the wall time): ``F.dropout`` (torch's Bernoulli mask, saved for
the backward) and ``mk.seeded_dropout`` on each backend timed on the device (the mask a
hash of seed and index, rebuilt in the backward), with a new seed per call as the model
draws it. Prints a markdown table and writes it to --table.

    python -m benchmarks.dropout                       # 65536 and 4194304 elements, float32
    python -m benchmarks.dropout --sizes 1048576 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mdarts_kernels as mk
from benchmarks.common import backends_for, interleaved_medians, write_markdown
from mdarts.processes import device_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def variants(device: torch.device) -> dict[str, object]:
    """name -> dropout(x, p): torch's, and seeded_dropout on every backend timed here."""
    found = {"F.dropout": lambda x, p: F.dropout(x, p, True)}
    for backend in backends_for(device):

        def seeded(x, p, backend=backend):
            with mk.use_backend(backend):
                return mk.seeded_dropout(x, p, mk.draw_seed())

        found[f"seeded_dropout ({backend})"] = seeded
    return found


def measure(device: torch.device, numel: int, dtype: torch.dtype, p: float, repeats: int) -> list[dict]:
    """One row per (pass, variant): median ms."""
    x = torch.randn(numel, device=device).to(dtype).requires_grad_(True)
    grad = torch.randn_like(x)
    rows = []
    for pass_ in ("forward", "forward+backward"):
        fns = {}
        for name, fn in variants(device).items():
            if pass_ == "forward":
                fns[name] = lambda fn=fn: fn(x.detach(), p)
            else:
                fns[name] = lambda fn=fn: torch.autograd.grad(fn(x, p), x, grad)
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        medians = interleaved_medians(fns, device, repeats, clock=clock)
        base = medians["F.dropout"]
        rows += [
            dict(
                numel=numel,
                dtype=str(dtype).removeprefix("torch."),
                pass_=pass_,
                variant=name,
                ms=ms,
                speedup=base / ms,
            )
            for name, ms in medians.items()
        ]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dropout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 4194304], help="elements per tensor")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"])
    parser.add_argument("--p", type=float, default=0.1, help="drop probability")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--table", type=Path, default=Path("results/dropout.md"), help="markdown table, overwritten")
    args = parser.parse_args(argv)
    for size in args.sizes:
        if size < 1:
            parser.error(f"--sizes: expected positive element counts, got {size}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rows = [
        row
        for size in args.sizes
        for dtype in args.dtypes
        for row in measure(device, size, DTYPES[dtype], args.p, args.repeats)
    ]
    lines = [
        f"# Dropout: seeded_dropout against F.dropout (p {args.p})",
        "",
        f"Command: `{' '.join(['python -m benchmarks.dropout', *(argv if argv is not None else sys.argv[1:])])}` on "
        f"{device_name(device)}, {torch.get_num_threads()} thread(s); medians of {args.repeats} round-robin runs.",
        "",
        "| elements | dtype | pass | variant | ms | speed-up over F.dropout |",
        "|---:|---|---|---|---:|---:|",
        *(
            f"| {r['numel']:,} | {r['dtype']} | {r['pass_']} | {r['variant']} | {r['ms']:.3f} | {r['speedup']:.1f}x |"
            for r in rows
        ),
    ]
    write_markdown(args.table, lines)


if __name__ == "__main__":
    main()

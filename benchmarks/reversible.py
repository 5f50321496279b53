"""Peak memory and step time of a ReversibleSequence against depth, for the three memory modes.

Each configuration (mode, depth) runs in a fresh Python process started with
``MALLOC_MMAP_THRESHOLD_=65536`` (docs/design.md 4), which builds the stack, sets up the gradient
buffers and the Adam state, then times whole training steps (forward, backward, optimizer
step) on a batch of ``--batch x --time`` tokens of width ``--d``. Every fn is a pre-LayerNorm
feed-forward block ``Dropout(Linear(GELU(Linear(LayerNorm(h)))))`` on d / n features, so
activations, not weights, dominate the memory.

Per configuration it prints and appends to ``--out`` one JSON line with:
    benchmark, mode, depth, splits, d, hidden, tokens, device, dtype, torch,
    peak_bytes    peak memory of the training steps above the memory after set-up (which
                  holds the weights, their gradient buffers and the Adam state). CPU: peak
                  resident set (VmHWM, reset after set-up) minus the resident set after set-up; CUDA:
                  ``max_memory_allocated`` minus ``memory_allocated`` after set-up.
    saved_bytes   bytes autograd keeps for the backward after one forward pass, counted with
                  ``saved_tensors_hooks``, each storage once, parameters not counted.
    state_bytes   weights + gradients + optimizer state (the set-up memory).
    median_ms     median wall time of the timed steps.
    median_cpu_ms median CPU time of the process over the timed steps (steadier than wall
                  time on a shared machine; with --threads 1 it is the compute time).
    interleaved_ms median wall time of a step with every mode of that depth built in the
                  main process and timed round-robin (the fair comparison of modes).
and at the end a summary of the two targets: reconstruct peak(depth 32) / peak(depth 4)
<= 1.15, and reconstruct / store step time <= 1.4.

Run:  python -m benchmarks.reversible [--depths 1 2 4 8 16 32] [--modes ...] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import interleaved_medians, run_child
from mdarts.memory import peak_above, saved_tensor_bytes
from mdarts.processes import device_name
from mdarts.reversible import MODES, ReversibleLayer, ReversibleSequence

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FeedForward(nn.Module):
    """h (batch, time, dim) -> Dropout(Linear(GELU(Linear(LayerNorm(h))))), hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.inner = nn.Linear(dim, hidden)
        self.outer = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.dropout(self.outer(F.gelu(self.inner(self.norm(h)))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reversible", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--depths", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--d", type=int, default=512, help="model width (default 512)")
    parser.add_argument("--splits", type=int, default=2, help="splits n per layer (default 2)")
    parser.add_argument("--hidden", type=int, default=None, help="FFN hidden width per split (default 2 * d / n)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=256, help="sequence length (batch * time tokens)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps, after one warm-up step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="autocast dtype (float32: no autocast)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/reversible.jsonl"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def set_up(config: dict[str, Any]):
    """The stack of one configuration with its gradient buffers and Adam state allocated,
    and a function running one training step (forward, backward, Adam) on a fixed batch."""
    device = torch.device(config["device"])
    if config["threads"] is not None:
        torch.set_num_threads(config["threads"])
    dtype = DTYPES[config["dtype"]]
    n, d = config["splits"], config["d"]
    torch.manual_seed(0)
    model = ReversibleSequence(
        [
            ReversibleLayer([FeedForward(d // n, config["hidden"], config["dropout"]) for _ in range(n)])
            for _ in range(config["depth"])
        ],
        mode=config["mode"],
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(config["batch"], config["time"], d, device=device)
    # set-up: gradient buffers and Adam state exist before the measured steps (a step on zero
    # gradients allocates the state and leaves the weights unchanged)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = model(x)
        y.float().square().mean().backward()
        optimizer.step()

    return model, x, step


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process: set up, then config["steps"] + 1 training steps."""
    device = torch.device(config["device"])
    dtype = DTYPES[config["dtype"]]
    n, d = config["splits"], config["d"]
    model, x, step = set_up(config)
    state_bytes = sum(p.numel() * p.element_size() * 4 for p in model.parameters())
    times, cpu_times = [], []

    def timed_steps() -> None:
        for i in range(config["steps"] + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)

    _, peak = peak_above(timed_steps, device)  # the import's transient peak does not count
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        saved = saved_tensor_bytes(lambda: model(x), exclude=model.parameters())
    return {
        "benchmark": "reversible",
        "mode": config["mode"],
        "depth": config["depth"],
        "splits": n,
        "d": d,
        "hidden": config["hidden"],
        "tokens": config["batch"] * config["time"],
        "device": device.type,
        "device_name": device_name(device),
        "dtype": config["dtype"],
        "peak_bytes": peak,
        "saved_bytes": saved,
        "state_bytes": state_bytes,
        "median_ms": 1000 * statistics.median(times),
        "median_cpu_ms": 1000 * statistics.median(cpu_times),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def interleaved_step_ms(configs: list[dict[str, Any]], repeats: int) -> dict[str, float]:
    """Median wall ms of a training step of each mode, all built in this process and timed
    round-robin, so that a busy machine slows every mode alike."""
    steps = {config["mode"]: set_up(config)[2] for config in configs}
    return interleaved_medians(steps, torch.device(configs[0]["device"]), repeats)


def ratio(results: list[dict[str, Any]], field: str, a: tuple[str, int], b: tuple[str, int]) -> float | None:
    """results[a][field] / results[b][field], keys (mode, depth); None when one is missing."""
    by_key = {(r["mode"], r["depth"]): r[field] for r in results}
    if a not in by_key or b not in by_key or not by_key[b]:
        return None
    return by_key[a] / by_key[b]


def summarise(results: list[dict[str, Any]]) -> None:
    """Print the two targets: reconstruct peak(32) / peak(4) <= 1.15; reconstruct / store time <= 1.4."""
    memory = ratio(results, "peak_bytes", ("reconstruct", 32), ("reconstruct", 4))
    if memory is not None:
        print(
            f"target: reconstruct peak(depth 32) / peak(depth 4) = {memory:.3f} "
            f"(<= 1.15: {'met' if memory <= 1.15 else 'MISSED'})"
        )
    for depth in sorted({r["depth"] for r in results}):
        for field in ("interleaved_ms", "median_cpu_ms"):
            slowdown = ratio(results, field, ("reconstruct", depth), ("store", depth))
            if slowdown is not None:
                verdict = "met" if slowdown <= 1.4 else "MISSED"
                print(
                    f"target: reconstruct / store step time ({field}) at depth {depth} = {slowdown:.3f} "
                    f"(<= 1.4: {verdict})"
                )


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    if args.d % args.splits:
        raise SystemExit(f"--d {args.d} is not divisible by --splits {args.splits}")
    hidden = args.hidden or 2 * args.d // args.splits
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with args.out.open("a") as out:
        for depth in args.depths:
            configs = []
            for mode in args.modes:
                config = {
                    "mode": mode,
                    "depth": depth,
                    "splits": args.splits,
                    "d": args.d,
                    "hidden": hidden,
                    "batch": args.batch,
                    "time": args.time,
                    "dropout": args.dropout,
                    "steps": args.steps,
                    "threads": args.threads,
                    "device": args.device,
                    "dtype": args.dtype,
                }
                configs.append(config)
                results.append(run_child("benchmarks.reversible", ["--worker", json.dumps(config)]))
            for result, (_mode, ms) in zip(results[-len(configs) :], interleaved_step_ms(configs, args.steps).items()):
                result["interleaved_ms"] = ms
                line = json.dumps(result)
                print(line, flush=True)
                out.write(line + "\n")
    summarise(results)


if __name__ == "__main__":
    main()

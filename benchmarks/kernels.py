"""Fused ops against the eager PyTorch reference: median time and extra peak memory.

For each op (mixed_sum, mixed_ln_sum), pass (forward, forward+backward), K, rows x D and
dtype, every backend that runs on the device is timed round-robin in one process (medians
of --repeats runs). Peak memory is measured per configuration in a fresh process: on the
CPU the peak resident set above the resident size after set-up (glibc's mmap threshold
lowered so RSS follows live tensors), on CUDA ``torch.cuda.max_memory_allocated`` above the
allocation after set-up. The "extra" peak subtracts what the step returns (the output, or
the input gradients, the same for every backend): it is the op's workspace plus what it
saves for backward. On CUDA the forward's achieved GB/s is also reported,
as a fraction of a measured device-to-device copy.

    python -m benchmarks.kernels                      # full sweep, writes results/kernels.*
    python -m benchmarks.kernels --ks 14 --shapes 8192x512 --dtypes float32

Writes one JSON line per measurement to --out and a markdown table to --table.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

import mdarts_kernels as mk
from benchmarks.common import append_json_lines, backends_for, interleaved_medians, run_child, versions
from mdarts.memory import peak_above
from mdarts.processes import device_name

OPS = ("mixed_sum", "mixed_ln_sum")
PASSES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_inputs(op: str, K: int, rows: int, dim: int, dtype: torch.dtype, device: torch.device, grad: bool):
    """Leaf tensors for one call: (rows, dim) data, (K,) weights, (K, dim) LayerNorm params."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device, dt).requires_grad_(grad)

    outs = [leaf(rows, dim) for _ in range(K)]
    weights = torch.softmax(torch.randn(K, generator=gen), 0).to(device).requires_grad_(grad)
    if op == "mixed_sum":
        return dict(outs=outs, weights=weights)
    return dict(
        h=leaf(rows, dim),
        outs=outs,
        weights=weights,
        ln_weight=leaf(K, dim, dt=torch.float32),
        ln_bias=leaf(K, dim, dt=torch.float32),
        residual=leaf(rows, dim),
    )


def call(op: str, inputs: dict) -> torch.Tensor:
    return getattr(mk, op)(**inputs)


def leaves_of(inputs: dict) -> list[torch.Tensor]:
    flat = []
    for value in inputs.values():
        flat.extend(value if isinstance(value, list) else [value])
    return flat


def step(op: str, pass_: str, backend: str, inputs: dict, grad_out: torch.Tensor):
    """One forward (no autograd) or forward+backward (gradients of every input) under backend."""
    with mk.use_backend(backend):
        if pass_ == "forward":
            with torch.no_grad():
                return call(op, inputs)
        out = call(op, inputs)
        return torch.autograd.grad(out, leaves_of(inputs), grad_out)


def result_bytes(result) -> int:
    tensors = result if isinstance(result, (tuple, list)) else [result]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def measure_memory(config: dict) -> dict:
    """Peak bytes of one step of one configuration above the set-up, measured in this (fresh)
    process, and the extra peak: that minus the bytes of what the step returns (the output, or
    the gradients), i.e. the workspace and saved activations of the op."""
    device = torch.device(config["device"])
    dtype = DTYPES[config["dtype"]]
    grad = config["pass"] != "forward"
    small = make_inputs(config["op"], config["K"], 8, 16, dtype, device, grad)  # warm up code paths
    step(config["op"], config["pass"], config["backend"], small, torch.ones(8, 16, dtype=dtype, device=device))
    inputs = make_inputs(config["op"], config["K"], config["rows"], config["dim"], dtype, device, grad)
    grad_out = torch.ones(config["rows"], config["dim"], dtype=dtype, device=device)
    result, peak = peak_above(lambda: step(config["op"], config["pass"], config["backend"], inputs, grad_out), device)
    return {"peak_bytes": peak, "extra_peak_bytes": max(0, peak - result_bytes(result))}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Achieved GB/s of a device-to-device copy (read + write) of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = interleaved_medians({"copy": lambda: dst.copy_(src)}, device, repeats=20)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def moved_bytes(op: str, K: int, rows: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes a forward must read and write at least: K inputs (+ h and residual) and the output."""
    tensors = K + 1 if op == "mixed_sum" else K + 3
    return tensors * rows * dim * torch.finfo(dtype).bits // 8


def run_sweep(args) -> list[dict]:
    device = torch.device(args.device)
    common = dict(device_name=device_name(device), **versions())
    copy_gbps = copy_bandwidth(device) if device.type == "cuda" else None
    rows_out = []
    for op in OPS:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for K in args.ks:
                for rows, dim in args.shapes:
                    for pass_ in PASSES:
                        grad = pass_ != "forward"
                        inputs = make_inputs(op, K, rows, dim, dtype, device, grad)
                        grad_out = torch.ones(rows, dim, dtype=dtype, device=device)
                        backends = backends_for(device)
                        times = interleaved_medians(
                            {b: functools.partial(step, op, pass_, b, inputs, grad_out) for b in backends},
                            device,
                            args.repeats,
                        )
                        for backend in backends:
                            config = dict(
                                op=op, pass_=pass_, backend=backend, dtype=dtype_name, K=K, rows=rows, dim=dim
                            )
                            child = dict(config, device=args.device)
                            child["pass"] = child.pop("pass_")
                            memory = run_child("benchmarks.kernels", ["--measure-memory", json.dumps(child)])
                            row = dict(
                                benchmark="kernels",
                                op=op,
                                backend=backend,
                                dtype=dtype_name,
                                K=K,
                                shape=[rows, dim],
                                median_ms=round(times[backend], 4),
                                **memory,
                                device=args.device,
                                **common,
                            )
                            row["pass"] = pass_
                            if copy_gbps and pass_ == "forward":
                                gbps = moved_bytes(op, K, rows, dim, dtype) / (times[backend] * 1e-3) / 1e9
                                row.update(
                                    gbps=round(gbps, 1),
                                    copy_gbps=round(copy_gbps, 1),
                                    fraction_of_copy=round(gbps / copy_gbps, 3),
                                )
                            rows_out.append(row)
                            print(json.dumps(row), flush=True)
    return rows_out


def markdown_table(rows: list[dict]) -> str:
    """One line per (op, pass, dtype, K, shape): each backend's time and extra peak, against the reference."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["op"], row["pass"], row["dtype"], row["K"], tuple(row["shape"]))
        groups.setdefault(key, {})[row["backend"]] = row
    backends = [b for b in ("cpp", "triton") if any(b in g for g in groups.values())]
    head = "| op | pass | dtype | K | rows x D | reference ms | " + " | ".join(
        f"{b} ms | {b} speed-up | reference extra MiB | {b} extra MiB | {b} extra / reference" for b in backends
    )
    lines = [head + " |", "|" + "---|" * (6 + 5 * len(backends))]
    for (op, pass_, dtype, K, shape), group in groups.items():
        ref = group["reference"]
        cells = [op, pass_, dtype, str(K), f"{shape[0]} x {shape[1]}", f"{ref['median_ms']:.2f}"]
        for b in backends:
            row = group.get(b)
            if row is None:
                cells += ["-"] * 5
                continue
            ratio = row["extra_peak_bytes"] / ref["extra_peak_bytes"] if ref["extra_peak_bytes"] else float("nan")
            cells += [
                f"{row['median_ms']:.2f}",
                f"{ref['median_ms'] / row['median_ms']:.2f}x",
                f"{ref['extra_peak_bytes'] / 2**20:.1f}",
                f"{row['extra_peak_bytes'] / 2**20:.1f}",
                f"{ratio:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, dim = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected ROWSxD such as 8192x512, got {text!r}") from None
    if rows < 1 or dim < 1:
        raise argparse.ArgumentTypeError(f"--shapes: rows and D must be >= 1, got {text!r}")
    return rows, dim


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 14], help="numbers of candidate ops K")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(8192, 512), (4096, 960)], help="ROWSxD")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per backend (median reported)")
    parser.add_argument("--out", type=Path, default=Path("results/kernels.jsonl"), help="JSON lines, appended")
    parser.add_argument("--table", type=Path, default=Path("results/kernels.md"), help="markdown table, overwritten")
    parser.add_argument("--measure-memory", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        print(json.dumps(measure_memory(json.loads(args.measure_memory))))
        return
    if args.repeats < 1:
        parser.error("--repeats: expected at least 1")
    rows = run_sweep(args)
    append_json_lines(args.out, rows)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(markdown_table(rows))
    print(f"\nwrote {len(rows)} rows to {args.out} and the table to {args.table}\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

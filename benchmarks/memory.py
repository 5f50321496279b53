"""Peak memory of one supernet training step in the three memory modes, against the planner.

Each configuration and mode is measured in a fresh Python process (``run_child``, glibc's
mmap threshold at 4 KiB so that freed blocks go back to the system and the resident set
follows the live tensors, docs/design.md 4) that builds a :class:`mdarts.model.Supernet`,
allocates the gradient buffers and the Adam state of the weights and of the architecture
logits (set-up), resets the peak, then runs two training steps: forward and label-smoothed
loss (full logits, or the chunked output loss), backward, Adam step on the weights, Adam
step on the alphas (first-order DARTS on the same batch). The step time is measured apart:
one more fresh process (malloc as usual) builds the configuration in every mode and times
``--steps`` steps of each round-robin, so that a busy machine slows every mode alike (CPU time
of the process on the CPU, which also leaves out waiting for a core; wall time on CUDA). Per
configuration and mode one JSON line (``--out``) with:

    sweep, mode, layers_per_side, d, ops (candidates per encoder node), tokens, seq_len,
    vocab, chunk_rows, device, threads,
    peak_bytes       CPU: peak resident set (VmHWM, reset after set-up) minus the resident
                     set after set-up; CUDA: max_memory_allocated minus memory_allocated
    saved_bytes      bytes saved for backward by one forward + loss (saved_tensors_hooks,
                     each storage once, parameters excluded)
    setup_bytes      weights + gradients + Adam state (4 x parameters, float32)
    median_ms        median time of a step, modes timed round-robin in one process (CPU:
                     process CPU time, with --threads 1 the compute time; CUDA: wall time)
    predicted_peak_bytes, predicted_saved_bytes, predicted_setup_bytes   mdarts.plan
    plan_error       predicted / measured peak - 1

Depth is given as total layers, split evenly: ``--depths 2 4 8`` means 1+1, 2+2, 4+4 layers.
Sweeps: depth, d, ops (4, 8, all candidates per node), tokens, loss (full vs chunked) and
target (the full-size 12+12 layers, all ops configuration, chunked loss, and 2+2 beside it;
--quick shrinks it to d 96 and 512 tokens, since plain DARTS at d 528 and 4096 tokens needs
about 19 GiB and minutes per step on a CPU; ``--target-d`` and ``--target-tokens`` choose
other sizes). Then PNG plots, a markdown table with the largest d that fits ``--budget-gb``
per mode, and the targets: the peak and step-time ratios are judged at the 12+12 target row.

Run:  python -m benchmarks.memory [--quick] [--sweeps depth d ops tokens loss target]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.common import append_json_lines, interleaved_medians, run_child
from mdarts.config import MEMORY_MODES, ModelConfig
from mdarts.memory import peak_above, saved_tensor_bytes
from mdarts.ops import DECODER_CANDIDATES, ENCODER_CANDIDATES
from mdarts.plan import largest_d, predict_memory
from mdarts.processes import device_name

SWEEPS = ("depth", "d", "ops", "tokens", "loss", "target")
# candidate subsets: zero and identity plus parametric ops; cross_attention stays in the decoder
OP_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "4": (("zero", "identity", "conv3", "ffn"), ("zero", "identity", "conv3", "cross_attention")),
    "8": (
        ("zero", "identity", "conv3", "conv7", "dynconv7", "attention", "ffn", "glu"),
        ("zero", "identity", "conv3", "dynconv7", "attention", "ffn", "glu", "cross_attention"),
    ),
    "all": (ENCODER_CANDIDATES, DECODER_CANDIDATES),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=SWEEPS)
    parser.add_argument("--modes", nargs="+", default=list(MEMORY_MODES), choices=MEMORY_MODES)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes (a CPU run of minutes); the target sweep shrinks d and tokens",
    )
    parser.add_argument(
        "--depths", nargs="+", type=int, default=[2, 4, 8, 16, 32], help="total layers, split evenly encoder/decoder"
    )
    parser.add_argument(
        "--ds",
        nargs="+",
        type=int,
        default=None,
        help="widths of the d sweep (default 128 192 384 576 768 1008; 128 shows the invalid-width message)",
    )
    parser.add_argument("--ops", nargs="+", default=list(OP_SETS), choices=list(OP_SETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=None, help="tokens per batch of the tokens sweep")
    parser.add_argument("--d", type=int, default=None, help="width of the other sweeps (default 192, quick 96)")
    parser.add_argument(
        "--base-tokens", type=int, default=None, help="tokens per batch of the other sweeps (default 1024, quick 512)"
    )
    parser.add_argument("--target-d", type=int, default=None, help="width of the target sweep (default 528, quick 96)")
    parser.add_argument(
        "--target-tokens", type=int, default=None, help="tokens per batch of the target sweep (default 4096, quick 512)"
    )
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (source and target)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--chunk-rows", type=int, default=256, help="rows per chunk of the chunked loss (loss sweep)")
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per mode (round-robin, after two warm-up rounds)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in each child (1: steady on a shared CPU)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-gb", type=float, default=16.0, help="memory budget of the largest-d table (GiB)")
    parser.add_argument("--out", type=Path, default=Path("results/memory.jsonl"))
    parser.add_argument("--results-dir", type=Path, default=None, help="plots and table (default: the folder of --out)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help=(
            "measure nothing: rebuild memory.md and the plots from the JSON lines in --out, "
            "with the planner's predictions recomputed"
        ),
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the measured child --------------------------------------------------------------------


MMAP_THRESHOLD = 4096  # bytes: glibc maps every block from 4 KiB up on its own (see run_child)


def build(spec: dict[str, Any], config: ModelConfig):
    """Set up one configuration in this process: the supernet, its gradient buffers and
    Adam states (weights and alphas), a random batch. Returns (model, step, forward_and_loss):
    step() runs one training step, forward_and_loss() only the forward and the loss."""
    from mdarts.loss import sequence_loss
    from mdarts.model import Supernet

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = Supernet(config, spec["vocab"]).to(device).train()
    weight_opt = torch.optim.Adam(model.weight_parameters(), lr=1e-4)
    arch_opt = torch.optim.Adam(model.arch_parameters(), lr=3e-4, betas=(0.5, 0.999))
    batch = spec["tokens"] // spec["seq_len"]
    src = torch.randint(1, spec["vocab"], (batch, spec["seq_len"]), device=device)
    tgt = torch.randint(1, spec["vocab"], (batch, spec["seq_len"] + 1), device=device)
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    # set-up: gradient buffers and Adam state exist before measuring (steps on zero gradients)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weight_opt.step()
    arch_opt.step()

    def step() -> None:
        weight_opt.zero_grad(set_to_none=False)
        arch_opt.zero_grad(set_to_none=False)
        loss, _, ntokens = sequence_loss(model, src, tgt_in, tgt_out, 0.1, spec["chunk_rows"])
        (loss / ntokens).backward()
        weight_opt.step()
        arch_opt.step()

    def forward_and_loss():
        return sequence_loss(model, src, tgt_in, tgt_out, 0.1, spec["chunk_rows"])

    return model, step, forward_and_loss


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory of one configuration in this process: the peak over two training steps above
    the set-up, and the bytes saved for backward."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, step, forward_and_loss = build(spec, ModelConfig.from_dict(spec["config"]))

    def two_steps() -> None:
        for _ in range(2):
            step()

    _, peak = peak_above(two_steps, device)
    saved = saved_tensor_bytes(forward_and_loss, exclude=model.parameters())
    return {
        "peak_bytes": peak,
        "saved_bytes": saved,
        "setup_bytes": 4 * 4 * sum(p.numel() for p in model.parameters()),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def time_modes(spec: dict[str, Any]) -> dict[str, float]:
    """Median ms of a training step of one configuration in each mode of spec["configs"]
    (mode -> config dict), all built in this process and timed round-robin: CPU time of the
    process on the CPU (steady when other processes share the cores), wall time on CUDA."""
    torch.set_num_threads(spec["threads"])
    steps = {mode: build(spec, ModelConfig.from_dict(config))[1] for mode, config in spec["configs"].items()}
    device = torch.device(spec["device"])
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    return interleaved_medians(steps, device, spec["steps"], clock=clock)


# --- the sweeps ----------------------------------------------------------------------------


def make_config(args: argparse.Namespace, layers_per_side: int, d: int, ops: str, mode: str) -> ModelConfig:
    """The supernet of one configuration; ValueError (naming the field) when it is invalid."""
    encoder, decoder = OP_SETS[ops]
    config = ModelConfig(
        d_model=d,
        embed_dim=min(d, 256),
        encoder_layers=layers_per_side,
        decoder_layers=layers_per_side,
        unit_layers=min(2, layers_per_side),
        heads=args.heads,
        memory_mode=mode,
        max_positions=max(256, args.seq_len + 1),
        encoder_candidates=encoder,
        decoder_candidates=decoder,
    )
    config.check_splits()
    return config


def plan_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration of the chosen sweeps: dicts with sweep, layers_per_side, d, ops,
    tokens, chunk_rows (the mode is added per run)."""
    d = args.d or (96 if args.quick else 192)
    tokens = args.base_tokens or (512 if args.quick else 1024)
    ds = args.ds or ([128, 96, 192, 384] if args.quick else [128, 192, 384, 576, 768, 1008])
    token_list = args.tokens or ([256, 512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096])
    specs = []
    base = {"layers_per_side": 2, "d": d, "ops": "8", "tokens": tokens, "chunk_rows": 0}
    if "depth" in args.sweeps:
        for depth in args.depths:
            if depth < 2 or depth % 2:
                print(
                    f"depth sweep: skipping {depth} total layers: "
                    "expected an even count >= 2 (split evenly encoder/decoder)"
                )
                continue
            specs.append({**base, "sweep": "depth", "layers_per_side": depth // 2, "ops": "4"})
    if "d" in args.sweeps:
        specs += [{**base, "sweep": "d", "d": width, "ops": "4", "tokens": min(tokens, 512)} for width in ds]
    if "ops" in args.sweeps:
        specs += [{**base, "sweep": "ops", "ops": ops} for ops in args.ops]
    if "tokens" in args.sweeps:
        specs += [{**base, "sweep": "tokens", "tokens": n} for n in token_list]
    if "loss" in args.sweeps:
        specs += [
            {**base, "sweep": "loss", "ops": "4", "tokens": 2 * tokens, "chunk_rows": chunk}
            for chunk in (0, args.chunk_rows)
        ]
    if "target" in args.sweeps:
        # the full-size target: 12+12 layers, d 512 (invalid with 3 decoder splits: 528), all ops, 4096
        # tokens, with the chunked loss (the full logits would dominate every mode alike)
        target_d = args.target_d or (96 if args.quick else 528)
        target_tokens = args.target_tokens or (512 if args.quick else 4096)
        target = {
            "sweep": "target",
            "ops": "all",
            "chunk_rows": args.chunk_rows,
            "d": target_d,
            "tokens": target_tokens,
        }
        specs += [{**target, "layers_per_side": 12}, {**target, "layers_per_side": 2}]
    return specs


def attach_plan(args: argparse.Namespace, row: dict[str, Any]) -> None:
    """Set the planner's prediction for the configuration of a measured row (in place)."""
    config = make_config(args, row["layers_per_side"], row["d"], row["ops"], row["mode"])
    plan = predict_memory(
        config,
        row["vocab"],
        row["tokens"],
        row["mode"],
        row["chunk_rows"],
        seq_len=row["seq_len"],
        device=row["device"],
    )
    row["predicted_peak_bytes"] = plan["peak_above_setup"]
    row["predicted_saved_bytes"] = plan["activations"]
    row["predicted_setup_bytes"] = plan["setup"]
    row["plan_error"] = plan["peak_above_setup"] / max(row["peak_bytes"], 1) - 1


def run_spec(args: argparse.Namespace, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure one configuration in every mode of ``args.modes`` (memory: a fresh process per
    mode; time: one more process, modes round-robin) and attach the planner's prediction.
    A mode that cannot form a valid supernet or fails is skipped after a message naming the
    value; the others still run."""
    where = f"{spec['sweep']} sweep: d={spec['d']}, {2 * spec['layers_per_side']} layers, {spec['tokens']} tokens"
    child = {
        "vocab": args.vocab,
        "tokens": spec["tokens"],
        "seq_len": args.seq_len,
        "chunk_rows": spec["chunk_rows"],
        "threads": args.threads,
        "device": args.device,
    }
    rows: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        try:
            config = make_config(args, spec["layers_per_side"], spec["d"], spec["ops"], mode)
            if spec["tokens"] % args.seq_len or spec["tokens"] < args.seq_len:
                raise ValueError(f"tokens: {spec['tokens']} is not a positive multiple of --seq-len {args.seq_len}")
        except ValueError as error:
            print(f"{where} ({mode}): skipped: {error}")
            continue
        try:
            measured = run_child(
                "benchmarks.memory", ["--worker", json.dumps({**child, "config": config.to_dict()})], MMAP_THRESHOLD
            )
        except RuntimeError as error:  # e.g. out of memory: report it, run the others
            print(f"{where} ({mode}) failed: {str(error).splitlines()[-1]}")
            continue
        configs[mode] = config.to_dict()
        rows[mode] = {
            "benchmark": "memory",
            **spec,
            "mode": mode,
            "seq_len": args.seq_len,
            "vocab": args.vocab,
            "device": args.device,
            **measured,
        }
        attach_plan(args, rows[mode])
    if rows:
        try:
            medians = run_child(
                "benchmarks.memory",
                ["--time-worker", json.dumps({**child, "configs": configs, "steps": args.steps})],
                None,
            )
        except RuntimeError as error:
            print(f"{where}: timing failed: {str(error).splitlines()[-1]}")
            medians = {}
        for mode, row in rows.items():
            row["median_ms"] = medians.get(mode)
    return list(rows.values())


# --- report --------------------------------------------------------------------------------


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


def find(results: list[dict], **keys: Any) -> Optional[dict]:
    for row in results:
        if all(row.get(k) == v for k, v in keys.items()):
            return row
    return None


def _target(what: str, ratio: Optional[float], limit: float, shown: str, missing: str, digits: int = 3) -> str:
    """``"what: ratio (<= shown: met)"`` (or MISSED), or ``missing`` when ``ratio`` is None."""
    if ratio is None:
        return missing
    return f"{what}: {ratio:.{digits}f} (<= {shown}: {'met' if ratio <= limit else 'MISSED'})"


def targets(results: list[dict]) -> list[str]:
    """The four targets (peak ratio, depth growth, step-time ratio, plan error), each met / MISSED / not measured."""
    deep = max((r["layers_per_side"] for r in results if r["sweep"] == "target"), default=None)
    recon = find(results, sweep="target", mode="reconstruct", layers_per_side=deep)
    store = find(results, sweep="target", mode="store", layers_per_side=deep)
    shallow = find(results, sweep="depth", mode="reconstruct", layers_per_side=2)
    deepest = find(results, sweep="depth", mode="reconstruct", layers_per_side=16)
    timed = recon and store and recon.get("median_ms") and store.get("median_ms")
    where = f"at {deep}+{deep} layers, d {recon['d']}, all ops, {recon['tokens']} tokens" if recon else ""
    lines = [
        _target(
            f"reconstruct peak / store peak {where}",
            recon["peak_bytes"] / store["peak_bytes"] if recon and store else None,
            0.125,
            "1/8 = 0.125",
            "reconstruct / store peak at 12+12 layers: not measured (run the target sweep in both modes)",
        ),
        _target(
            "reconstruct peak at 32 layers / at 4 layers",
            deepest["peak_bytes"] / shallow["peak_bytes"] if shallow and deepest else None,
            1.15,
            "1.15",
            "reconstruct peak at 32 / 4 layers: not measured (depth sweep with 4 and 32)",
        ),
        _target(
            f"reconstruct / store step time {where} (round-robin in one process)",
            recon["median_ms"] / store["median_ms"] if timed else None,
            1.4,
            "1.4",
            "reconstruct / store step time at 12+12 layers: not measured (run the target sweep in both modes)",
            digits=2,
        ),
    ]
    pairs = [
        (
            r,
            find(
                results,
                **{k: r[k] for k in ("sweep", "layers_per_side", "d", "ops", "tokens", "chunk_rows")},
                mode="store",
            ),
        )
        for r in results
        if r["mode"] == "reconstruct"
    ]
    ratios = [r["median_ms"] / s["median_ms"] for r, s in pairs if s and r.get("median_ms") and s.get("median_ms")]
    if ratios:
        within = sum(x <= 1.4 for x in ratios)
        lines.append(
            "reconstruct / store step time over every measured configuration: "
            f"median {statistics.median(ratios):.2f} over "
            f"{len(ratios)}, best {min(ratios):.2f}, worst {max(ratios):.2f}, <= 1.4 on {within}/{len(ratios)}"
        )
    errors = [abs(r["plan_error"]) for r in results]
    if errors:
        bad = sum(e > 0.15 for e in errors)
        lines.append(
            f"plan within 15% of the measured peak: {len(errors) - bad}/{len(errors)} configurations, "
            f"worst {100 * max(errors):.1f}% "
            f"({'met' if not bad else 'MISSED'})"
        )
    return lines


def plot(results: list[dict], folder: Path) -> None:
    """memory_vs_depth.png, memory_vs_d.png and step_time_ratio.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for sweep, key, name, label in (
        ("depth", "layers_per_side", "memory_vs_depth.png", "total layers"),
        ("d", "d", "memory_vs_d.png", "d_model"),
    ):
        if not any(r["sweep"] == sweep for r in results):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in MEMORY_MODES:
            rows = sorted((r for r in results if r["sweep"] == sweep and r["mode"] == mode), key=lambda r: r[key])
            if not rows:
                continue
            xs = [r[key] * (2 if sweep == "depth" else 1) for r in rows]
            (line,) = ax.plot(xs, [r["peak_bytes"] / 2**20 for r in rows], "o-", label=f"{mode} measured")
            ax.plot(
                xs,
                [r["predicted_peak_bytes"] / 2**20 for r in rows],
                "x--",
                color=line.get_color(),
                label=f"{mode} plan",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("peak above set-up (MiB)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"one supernet training step, {sweep} sweep")
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    labels, values = [], []
    for r in results:
        if r["mode"] == "store":
            continue
        store = find(
            results, **{k: r[k] for k in ("sweep", "layers_per_side", "d", "ops", "tokens", "chunk_rows")}, mode="store"
        )
        if store and r.get("median_ms") and store.get("median_ms"):
            labels.append(
                f"{r['mode'][:5]} {r['sweep']} L{2 * r['layers_per_side']} d{r['d']} {r['ops']} "
                f"T{r['tokens']}{' ch' if r['chunk_rows'] else ''}"
            )
            values.append(r["median_ms"] / store["median_ms"])
    ax.barh(range(len(values)), values)
    ax.axvline(1.4, color="red", linestyle="--", label="target 1.4")
    ax.set_yticks(range(len(values)), labels, fontsize=5)
    ax.set_xlabel("step time / store (modes round-robin in one process)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "step_time_ratio.png", dpi=120)
    plt.close(fig)


def table(args: argparse.Namespace, results: list[dict], target_lines: list[str]) -> str:
    """The markdown report: every configuration, the largest d per mode, the targets."""
    lines = [
        "# Peak memory of one supernet training step",
        "",
        f"Command: `python -m benchmarks.memory {' '.join(a for a in args.argv if a != '--report-only')}`".rstrip()
        + f" on {results[0]['device_name'] if results else args.device}, "
        f"vocab {args.vocab}, {args.seq_len} tokens per sequence, {args.threads} thread(s). MiB above the set-up "
        "(weights, gradients and Adam state allocated before measuring).",
        "",
        "| sweep | mode | layers | d | ops | tokens | loss | peak | plan | plan error | saved | plan saved "
        "| set-up | step ms |",
        "|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['sweep']} | {r['mode']} | {r['layers_per_side']}+{r['layers_per_side']} | {r['d']} | {r['ops']} "
            f"| {r['tokens']} | "
            f"{'chunked ' + str(r['chunk_rows']) if r['chunk_rows'] else 'full'} | {_mib(r['peak_bytes'])} "
            f"| {_mib(r['predicted_peak_bytes'])} | "
            f"{100 * r['plan_error']:+.1f}% | {_mib(r['saved_bytes'])} | {_mib(r['predicted_saved_bytes'])} "
            f"| {_mib(r['setup_bytes'])} | "
            f"{_ms(r.get('median_ms'))} |"
        )
    budget = int(args.budget_gb * 2**30)
    lines += [
        "",
        f"## Largest d that fits {args.budget_gb:g} GiB (planner; 12+12 layers, all ops, 4096 tokens, full logits)",
        "",
        "| mode | largest d | checked against measurements |",
        "|---|---:|---|",
    ]
    config = make_config(args, 12, 528, "all", "reconstruct")
    for mode in args.modes:
        best = largest_d(budget, config, args.vocab, 4096, mode, seq_len=args.seq_len, device=args.device)
        measured = [r for r in results if r["mode"] == mode]
        agree = sum(
            (r["setup_bytes"] + r["peak_bytes"] <= budget)
            == (r["predicted_setup_bytes"] + r["predicted_peak_bytes"] <= budget)
            for r in measured
        )
        check = (
            f"fits / does not fit agrees on {agree}/{len(measured)} measured configurations"
            if measured
            else "not measured"
        )
        lines.append(f"| {mode} | {best if best is not None else 'none fits'} | {check} |")
        if best is None:
            print(f"budget {args.budget_gb:g} GiB: no valid d fits in {mode} mode (12+12 layers, all ops, 4096 tokens)")
    lines += ["", "## Targets", "", *(f"- {line}" for line in target_lines)]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """Run the sweeps (or, with the hidden --worker, one measurement); returns an exit status."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    args.argv = raw
    if args.worker is not None:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    if args.time_worker is not None:
        print(json.dumps(time_modes(json.loads(args.time_worker))))
        return 0
    if args.budget_gb <= 0:
        raise SystemExit(f"--budget-gb: expected a positive size, got {args.budget_gb}")
    folder = args.results_dir or args.out.parent
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    if args.report_only:
        if not args.out.is_file():
            raise SystemExit(f"--report-only: {args.out} does not exist (run the benchmark first)")
        results = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        for row in results:  # the planner of this code, on the stored measurements
            attach_plan(args, row)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in results))
        tmp.replace(args.out)
    for spec in [] if args.report_only else plan_specs(args):
        rows = run_spec(args, spec)
        for row in rows:
            print(
                f"{row['sweep']:6} {row['mode']:11} {row['layers_per_side']:2}+{row['layers_per_side']:<2} "
                f"d {row['d']:4} ops {row['ops']:3} "
                f"tokens {row['tokens']:5} {'chunked' if row['chunk_rows'] else 'full   '} "
                f"peak {_mib(row['peak_bytes']):>8} MiB "
                f"plan {_mib(row['predicted_peak_bytes']):>8} MiB ({100 * row['plan_error']:+.1f}%) "
                f"saved {_mib(row['saved_bytes']):>8} MiB "
                f"step {_ms(row['median_ms'])} ms",
                flush=True,
            )
        append_json_lines(args.out, rows)
        results += rows
    if not results:
        print("no configuration ran")
        return 1
    target_lines = targets(results)
    (folder / "memory.md").write_text(table(args, results, target_lines))
    plot(results, folder)
    print("\n".join(["targets:", *target_lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

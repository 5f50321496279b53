"""Does a longer retrain rank the networks of an experiment as its 1,000 updates do?

Trains networks of a finished experiment again, each as the experiment trained it (its
specification's training settings and seed, the size its record gives), for ``--steps``
updates with validation every ``--valid-interval``. The learning-rate schedule (inverse square
root after the warm-up) does not depend on the budget, so the first 1,000 updates are the
experiment's run: its validation loss there is printed beside the committed one as a check.
Checkpoints stay in ``--runs`` (a longer budget continues them); the log and a record of each
finished network go to ``--out``. ``--report`` prints the validation loss of every network at
every validation, the ranks at the experiment's budget against the longest, and how each
validation's ranking agrees with the longest budget's (Spearman, pairs in the same order).

A short protocol is tested the same way: ``--steps 1000 --cooldown 0.2`` trains the networks with
the last fifth of the budget ramping the learning rate to zero (``TrainConfig.cooldown_fraction``),
and ``--report --against OUT`` ranks them against the longest budget of the same networks in
another ``--out``, beside the plain 1,000 updates' ranking of them. ``--embed-dim 128`` trains
a reversible network sized again as an experiment with ``embed_dim = 128`` sizes it
(:meth:`mdarts.experiment.ExperimentSpec.size_genotype`: the layers get what a narrow table
leaves), to see whether the sizing rule holds a network back at a longer budget. A run that is
continued keeps the size it started with.

    OMP_NUM_THREADS=1 python -m benchmarks.budget results/en-de-2.35M "Transformer/transformer" \\
        --data-dir ../shared/data/multi30k --out results/budget-en-de
    python -m benchmarks.budget results/en-de-2.35M --report --out results/budget-en-de
    OMP_NUM_THREADS=1 python -m benchmarks.budget results/en-de-2.35M "Transformer/transformer" \\
        --steps 1000 --cooldown 0.2 --data-dir ../shared/data/multi30k --out results/budget-en-de-cooldown
    python -m benchmarks.budget results/en-de-2.35M --report --out results/budget-en-de-cooldown \\
        --against results/budget-en-de
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Optional

from mdarts.checkpoint import load_checkpoint
from mdarts.config import preset
from mdarts.experiment import TRAIN_DONE, ExperimentSpec
from mdarts.genotype import Genotype
from mdarts.prepare import prepare_data
from mdarts.report import spearman
from mdarts.sizing import BASELINES, builder
from mdarts.train import CURVES_FILE, LAST_FILE, LOG_FILE, Trainer, read_log


def network(experiment: Path, spec: ExperimentSpec, name: str, seed: int, embed_dim: Optional[int] = None):
    """``(build, config, committed record)`` of network ``ARM/MEMBER`` as the experiment trained it
    (with ``embed_dim``: sized again to the experiment's parameters from that embedding width)."""
    arm_name, member = name.split("/", 1)
    arms = {arm.name: arm for arm in spec.arms}
    if arm_name not in arms:
        raise SystemExit(f"network {name!r}: no arm {arm_name!r} in {experiment} (arms: {', '.join(arms)})")
    record_file = experiment / "train" / arm_name / f"{member}-seed{seed}" / TRAIN_DONE
    if not record_file.is_file():
        raise SystemExit(f"network {name!r}: {record_file} not found (a finished training at seed {seed})")
    record = json.loads(record_file.read_text())
    kind = arms[arm_name].kind
    if kind in BASELINES:
        arch, base = kind, preset(spec.train_preset, training=True)
    else:
        arch, base = Genotype.load(experiment / "genotypes" / f"{arm_name}-{member}.json"), spec.model_config()
    if embed_dim is None:
        config = base.replace(d_model=record["d_model"], embed_dim=record["embed_dim"])
    elif kind in BASELINES:
        raise SystemExit(f"--embed-dim: sizes the reversible networks only, as experiments do; {name!r} is a {kind}")
    else:
        config = dataclasses.replace(spec, embed_dim=embed_dim).size_genotype(arch, base)
    return builder(arch, spec.vocab_size), config, record


def train(args: argparse.Namespace, spec: ExperimentSpec) -> None:
    data = prepare_data(spec.pair, ("train", "val"), args.data_dir, vocab_size=spec.vocab_size)
    for name in args.networks:
        build, config, record = network(args.experiment, spec, name, args.seed, args.embed_dim)
        run_dir = args.runs / name
        settings = spec.train_config(args.seed).replace(
            max_steps=args.steps, valid_interval=args.valid_interval, device="cpu", cooldown_fraction=args.cooldown
        )
        resume = (run_dir / LAST_FILE).is_file()
        if resume:  # a run continues the network it started, whatever the sizing rule says today
            started = load_checkpoint(run_dir / LAST_FILE, kind="train")["spec"]["config"]
            config = config.replace(d_model=started["d_model"], embed_dim=started["embed_dim"])
        make = functools.partial(build, config)
        result = Trainer(make, data, settings, run_dir, resume=resume, overwrite=not resume).run()
        if result.stopped_by != "max_steps":
            raise SystemExit(f"{name}: stopped by {result.stopped_by}; run the command again to continue")
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        for file in (LOG_FILE, CURVES_FILE):
            shutil.copyfile(run_dir / file, out / file)
        valid = {e["step"]: e["loss"] for e in read_log(run_dir) if e["event"] == "valid"}
        summary = {"network": name, "seed": args.seed, "steps": args.steps, "cooldown_fraction": args.cooldown}
        summary |= {"d_model": config.d_model, "embed_dim": config.embed_dim}
        summary["valid_loss"] = valid
        summary["committed_valid_loss"] = {spec.train["max_steps"]: record["valid_loss"]}
        (out / "record.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{name}: validation loss {valid}")


def report(args: argparse.Namespace, spec: ExperimentSpec) -> None:
    records = [json.loads(p.read_text()) for p in sorted(args.out.glob("*/*/record.json"))]
    if not records:
        raise SystemExit(f"--out {args.out}: no finished network (*/*/record.json)")
    steps = sorted({int(s) for r in records for s in r["valid_loss"]})
    short = spec.train["max_steps"]
    print("validation loss (label-smoothed nats/token) after N updates, training seed", records[0]["seed"])
    print("| network | " + " | ".join(str(s) for s in steps) + f" | committed at {short} |")
    print("|---|" + "---|" * (len(steps) + 1))
    for r in records:
        cells = [f"{r['valid_loss'].get(str(s), float('nan')):.3f}" for s in steps]
        print(f"| {r['network']} | " + " | ".join(cells) + f" | {r['committed_valid_loss'][str(short)]:.3f} |")
    longest = max(steps)
    whole = [r for r in records if str(longest) in r["valid_loss"]]
    if len(whole) >= 2:
        at_short = [r["valid_loss"][str(short)] for r in whole]
        at_long = [r["valid_loss"][str(longest)] for r in whole]
        order = lambda losses: [r["network"] for _, r in sorted(zip(losses, whole), key=lambda x: x[0])]  # noqa: E731
        print(f"best first at {short}: {order(at_short)}")
        print(f"best first at {longest}: {order(at_long)}")
        if len(steps) >= 2:
            print(f"\neach budget's ranking of the {len(whole)} networks against the ranking at {longest} updates")
            print(f"| updates | Spearman | pairs ordered as at {longest} |")
            print("|---:|---:|---:|")
            for s in steps[:-1]:
                losses = [r["valid_loss"][str(s)] for r in whole]
                agree, pairs = ordered_pairs(losses, at_long)
                print(f"| {s} | {spearman(losses, at_long):+.2f} | {agree} of {pairs} |")
    if args.against:
        against(records, args.against, spec)


def ordered_pairs(losses: list[float], reference: list[float]) -> tuple[int, int]:
    """(pairs of networks that ``losses`` order as ``reference`` does, all pairs)."""
    pairs = [(i, j) for i in range(len(losses)) for j in range(i + 1, len(losses))]
    agree = sum((losses[i] < losses[j]) == (reference[i] < reference[j]) for i, j in pairs)
    return agree, len(pairs)


def against(records: list[dict], reference: Path, spec: ExperimentSpec) -> None:
    """How the final validation losses of ``records`` rank the networks against the longest budget
    of the same networks in ``reference`` (another ``--out``), and against the experiment's budget
    there: does a protocol (e.g. a cool-down) predict the longer retrain better than the plain one?"""
    longer = {r["network"]: r for r in map(json.loads, map(Path.read_text, reference.glob("*/*/record.json")))}
    both = [r for r in records if r["network"] in longer]
    if len(both) < 3:
        print(f"--against {reference}: {len(both)} network(s) in both, too few to rank")
        return
    final = [r["valid_loss"][str(r["steps"])] for r in both]
    long_steps = {longer[r["network"]]["steps"] for r in both}
    if len(long_steps) != 1:
        raise SystemExit(f"--against {reference}: the networks ran different budgets {sorted(long_steps)}")
    (steps,) = long_steps
    at_long = [longer[r["network"]]["valid_loss"][str(steps)] for r in both]
    at_short = [longer[r["network"]]["valid_loss"][str(spec.train["max_steps"])] for r in both]
    label = f"{both[0]['steps']} updates, cool-down {both[0].get('cooldown_fraction', 0)}"
    print(f"against {reference} ({len(both)} networks):")
    print(f"  Spearman, {label} against {steps} updates: {spearman(final, at_long):+.2f}")
    plain = spearman(at_short, at_long)
    print(f"  Spearman, {spec.train['max_steps']} updates plain against {steps} updates: {plain:+.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path, help="a finished experiment directory (spec.json, train/)")
    parser.add_argument("networks", nargs="*", help="networks to train, as ARM/MEMBER (e.g. Transformer/transformer)")
    parser.add_argument("--data-dir", type=Path, help="folder of the raw Multi30k files")
    parser.add_argument("--steps", type=int, default=4000, help="updates per network (default 4000)")
    parser.add_argument("--valid-interval", type=int, default=500, help="updates between validations (default 500)")
    parser.add_argument("--seed", type=int, default=1, help="training seed (default 1, the experiment's first)")
    parser.add_argument(
        "--cooldown",
        type=float,
        default=0.0,
        help="train with this cooldown_fraction: the last fraction of --steps ramps the rate to zero (default 0)",
    )
    parser.add_argument(
        "--embed-dim",
        type=int,
        help="size each network again to the experiment's parameters from this embedding width (default: as trained)",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        help="run directories, checkpoints (default runs/budget, runs/budget-cooldownF or runs/budget-eE)",
    )
    parser.add_argument("--out", type=Path, required=True, help="where each finished network's log and record go")
    parser.add_argument("--report", action="store_true", help="print the table of the finished networks")
    parser.add_argument(
        "--against", type=Path, help="with --report: rank the networks against the longest budget in this --out"
    )
    args = parser.parse_args()
    if args.runs is None:
        suffix = (f"-cooldown{args.cooldown:g}" if args.cooldown else "") + (
            f"-e{args.embed_dim}" if args.embed_dim else ""
        )
        args.runs = Path("runs/budget" + suffix)
    spec = ExperimentSpec.recorded(args.experiment / "spec.json")
    if args.steps < spec.train["max_steps"] or args.steps % args.valid_interval:
        raise SystemExit(f"--steps {args.steps}: expected a multiple of --valid-interval at least the experiment's")
    if args.report:
        report(args, spec)
    else:
        train(args, spec)


if __name__ == "__main__":
    main()

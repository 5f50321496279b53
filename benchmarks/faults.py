"""Fault injection: tiny ``mdarts train`` and ``mdarts search`` jobs killed at random steps, resumed,
and compared with runs that were never interrupted.

Each kill is one job, a real process (``python -m mdarts ...``, one thread): it is started afresh,
sent SIGKILL, SIGINT or SIGTERM (the three mixed, train and search alternating) once its log
reaches a step drawn from --seed (plus a random fraction of a step), then resumed with its resume
command (the one a stopped run prints; the same words with --resume after SIGKILL) until it
finishes. A job passes when

* the kill left a directory that resumes (a resume that fails counts as an unusable directory);
* SIGINT / SIGTERM stopped it with status 130 / 143 and a printed resume command;
* every tensor of its final checkpoint (weights, optimiser state, random state) equals, by
  torch.equal, that of the uninterrupted run of the same command;
* its logs equal the uninterrupted run's, record for record, except the wall-clock fields
  (tokens_per_s, elapsed_s, peak_memory_bytes, seconds_per_step) and the start / resume / end
  records of the search (a resumed search has one more of each); a search's alpha_history.jsonl
  and genotype.json too.

SIGKILL falls after the first checkpoint (a run killed before any checkpoint has nothing to
resume from: its resume is refused with "nothing to resume", by design); SIGINT and SIGTERM fall
at any step (the run writes its checkpoint when it stops). Stale temporary files (a SIGKILL
during an atomic write) are reported, not counted as failures.

The jobs are tiny: the tiny preset on 200 training and 20 validation pairs of Multi30k En-De
(from --data-dir, $MDARTS_DATA or ../shared/data/multi30k) written as generic files, a
200-piece tokenizer, on the CPU; a job takes seconds, mostly process start-up.

    python -m benchmarks.faults                    # 20 kills, seed 0
    python -m benchmarks.faults --kills 6 --seed 3 --keep
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "multi30k"
WALL_CLOCK = ("tokens_per_s", "elapsed_s", "peak_memory_bytes", "seconds_per_step")
RUN_EVENTS = ("start", "resume", "end")
SIGNALS = ("SIGKILL", "SIGINT", "SIGTERM")
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Job:
    """One kind of run: its command (without --out), where it logs, its checkpoint, its budget."""

    name: str
    argv: list[str]
    log: str
    checkpoint: str
    steps: int
    first_checkpoint: int  # the first step with a checkpoint (a SIGKILL falls after it)
    compared: tuple[str, ...]  # JSON-lines files compared record by record
    same_text: tuple[str, ...] = ()  # files compared whole

    def command(self, out: Path) -> list[str]:
        return [self.argv[0], "--out", str(out), *self.argv[1:]]


def jobs(data: list[str]) -> dict[str, Job]:
    train = Job(
        "train",
        ["train", "--arch", "transformer", "--preset", "tiny", "--max-steps", "24", "--warmup-steps", "5"]
        + ["--lr", "2e-3", "--valid-interval", "5", "--log-interval", "2", "--keep-last", "2", "--max-tokens", "256"]
        + data,
        log="log.jsonl",
        checkpoint="checkpoint_last.pt",
        steps=24,
        first_checkpoint=5,
        compared=("log.jsonl",),
    )
    search = Job(
        "search",
        ["search", "--max-steps", "8", "--warmup-steps", "4", "--eval-interval", "3", "--valid-interval", "3"]
        + ["--checkpoint-interval", "2", "--max-tokens", "128", "--memory-mode", "reconstruct"]
        + data,
        log="search_log.jsonl",
        checkpoint="search_checkpoint.pt",
        steps=8,
        first_checkpoint=2,
        compared=("search_log.jsonl", "alpha_history.jsonl"),
        same_text=("genotype.json",),
    )
    return {"train": train, "search": search}


# ----------------------------------------------------------------------------- data


def write_corpus(data_dir: Path, folder: Path) -> list[str]:
    """200 training and 20 validation pairs of Multi30k En-De as gzip files in ``folder``; the
    command-line data options that use them."""
    args = []
    for split, option, count in (("train", "train", 200), ("val", "valid", 20)):
        for lang, side in (("en", "src"), ("de", "tgt")):
            with gzip.open(data_dir / f"{split}.{lang}.gz", "rt", encoding="utf-8") as handle:
                lines = [next(handle).rstrip("\n") for _ in range(count)]
            path = folder / f"{split}.{lang}.gz"
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
            args += [f"--{option}-{side}", str(path)]
    return [*args, "--vocab-size", "200", "--tokenizer-cache", str(folder / "spm"), "--device", "cpu"]


# ----------------------------------------------------------------------------- processes


def start(argv: list[str], folder: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """``python -m mdarts ARGV`` with stdout and stderr in files ``folder/name.{out,err}``."""
    err = folder / f"{name}.err"
    with open(folder / f"{name}.out", "wb") as out, open(err, "wb") as error:
        child = subprocess.Popen(
            [sys.executable, "-m", "mdarts", *argv], cwd=REPO_ROOT, env=CHILD_ENV, stdout=out, stderr=error
        )
    return child, err


def run(argv: list[str], folder: Path, name: str, timeout: float = 600.0) -> tuple[int, str]:
    child, err = start(argv, folder, name)
    try:
        status = child.wait(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return status, err.read_text(errors="replace")


def last_step(log: Path) -> int:
    """The last step ``log`` records (0 when none yet; a line being written does not count)."""
    if not log.is_file():
        return 0
    step = 0
    for line in log.read_text().splitlines():
        try:
            step = max(step, json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return step


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records if r["event"] not in RUN_EVENTS]


def tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside ``value`` (dicts, lists, tuples), by path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    found: dict[str, torch.Tensor] = {}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return found
    for key, item in items:
        found.update(tensors(item, f"{prefix}.{key}" if prefix else str(key)))
    return found


def differences(job: Job, run_dir: Path, reference: Path) -> list[str]:
    """What differs between a finished run and the uninterrupted one (empty: identical)."""
    from mdarts.checkpoint import load_checkpoint

    found = []
    ours, theirs = (tensors(load_checkpoint(d / job.checkpoint)) for d in (run_dir, reference))
    if ours.keys() != theirs.keys():
        found.append(f"checkpoint tensors {sorted(set(ours) ^ set(theirs))[:3]} in one run only")
    unequal = [k for k in ours.keys() & theirs.keys() if not torch.equal(ours[k], theirs[k])]
    if unequal:
        found.append(f"{len(unequal)} of {len(ours)} tensors differ ({', '.join(sorted(unequal)[:3])})")
    for name in job.compared:
        a, b = comparable(read_jsonl(run_dir / name)), comparable(read_jsonl(reference / name))
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            found.append(f"{name} differs from record {first} ({len(a)} vs {len(b)} records)")
    for name in job.same_text:
        if (run_dir / name).read_bytes() != (reference / name).read_bytes():
            found.append(f"{name} differs")
    return found


# ----------------------------------------------------------------------------- one kill


@dataclass
class Outcome:
    line: str
    identical: bool = False
    unusable: bool = False
    notes: list[str] = field(default_factory=list)


def kill_and_resume(
    number: int, total: int, job: Job, signame: str, target: int, delay: float, work: Path, reference: Path
) -> Outcome:
    """Start ``job`` afresh, send ``signame`` once its log reaches ``target`` (and ``delay``
    seconds more), resume it until it is done, compare it with ``reference``."""
    folder = work / f"kill{number:02d}-{job.name}-{signame}"
    folder.mkdir()
    out = folder / "run"
    argv = job.command(out)
    head = f"kill {number:2d}/{total} {job.name:<6} {signame:<7} at step {target:2d}:"
    child, err = start(argv, folder, "killed")
    needs_checkpoint = signame == "SIGKILL"
    try:
        deadline = time.monotonic() + 300
        while child.poll() is None and time.monotonic() < deadline:
            if last_step(out / job.log) >= target and (not needs_checkpoint or (out / job.checkpoint).is_file()):
                break
            time.sleep(0.01)
        time.sleep(delay)
        seen = last_step(out / job.log)
        if child.poll() is None:
            child.send_signal(getattr(signal, signame))
        status = child.wait(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    stderr = err.read_text(errors="replace")
    expected = {"SIGKILL": -signal.SIGKILL, "SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}[signame]
    notes = []
    if status == 0:
        notes.append("finished before the signal")
    elif status != expected:
        notes.append(f"exit status {status}, expected {expected}: {stderr.strip().splitlines()[-1:]}")
    resume = argv + ["--resume"]
    if signame != "SIGKILL" and status == expected:
        lines = stderr.strip().splitlines()
        printed = shlex.split(lines[-1]) if lines and "--resume" in lines[-1] else None
        if printed is None or "after step" not in stderr:
            notes.append("no resume command printed")
        else:
            resume = printed[1:]
    stale = sorted(p.name for p in out.glob(".*.tmp"))
    if stale:
        notes.append(f"stale temporary file(s) {', '.join(stale)}")
    where = f"stopped after step {seen}" if status != 0 else "not stopped"
    try:
        from mdarts.checkpoint import load_checkpoint

        saved = load_checkpoint(out / job.checkpoint)
        start_step = saved["step"] if "step" in saved else saved["searcher"]["steps"]
        where += f", checkpoint of step {start_step}"
    except (FileNotFoundError, ValueError) as error:
        where += f", no usable checkpoint ({error})"
    resumes = 0
    while True:
        resumes += 1
        code, resume_err = run(resume, folder, f"resume{resumes}")
        if code == 0:
            break
        if code not in (128 + signal.SIGINT, 128 + signal.SIGTERM) or resumes >= 3:
            last = resume_err.strip().splitlines()[-1:] or ["(no message)"]
            return Outcome(
                f"{head} {where}; resume {resumes} failed, exit {code}: {last[0]}", unusable=True, notes=notes
            )
    left = sorted(p.name for p in out.glob(".*.tmp"))
    if left:
        notes.append(f"temporary file(s) still there after the resume: {', '.join(left)}")
    found = differences(job, out, reference)
    verdict = "identical" if not found else "DIFFERENT: " + "; ".join(found)
    if notes:
        verdict += " [" + "; ".join(notes) + "]"
    return Outcome(f"{head} {where}; resumed in {resumes} run(s): {verdict}", identical=not found, notes=notes)


# ----------------------------------------------------------------------------- main


def plan(kills: int, seed: int, all_jobs: dict[str, Job]) -> list[tuple[Job, str, int, float]]:
    """(job, signal, target step, extra delay) of each kill: train and search alternate, the
    signals cycle through a shuffled order, the steps and delays are drawn from ``seed``."""
    rng = random.Random(seed)
    names = list(all_jobs)
    signals = [SIGNALS[i % len(SIGNALS)] for i in range(kills)]
    rng.shuffle(signals)
    planned = []
    for i in range(kills):
        job = all_jobs[names[i % len(names)]]
        lowest = job.first_checkpoint + 1 if signals[i] == "SIGKILL" else 1
        planned.append((job, signals[i], rng.randint(lowest, job.steps - 1), rng.uniform(0.0, 0.3)))
    return planned


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.faults",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=20, help="kills in all, train and search alternating (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="draws the signals, steps and delays (default 0)")
    parser.add_argument(
        "--data-dir", type=Path, help="Multi30k raw files (default $MDARTS_DATA, else ../shared/data/multi30k)"
    )
    parser.add_argument("--work", type=Path, help="empty folder for the runs, kept (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (default: deleted at the end)")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills: expected a positive number")
    data_dir = args.data_dir or Path(os.environ.get("MDARTS_DATA") or DEFAULT_DATA)
    if not (data_dir / "train.en.gz").is_file():
        parser.error(f"--data-dir: no Multi30k train.en.gz in {data_dir}")
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work: {args.work} is not empty")
    work = args.work or Path(tempfile.mkdtemp(prefix="mdarts-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        all_jobs = jobs(write_corpus(data_dir, work))
        references = {}
        for name, job in all_jobs.items():  # uninterrupted runs (the first also trains the tokenizer)
            references[name] = work / f"reference-{name}"
            status, err = run(job.command(references[name]), work, f"reference-{name}")
            if status != 0:
                print(f"the uninterrupted {name} run failed (exit {status}): {err.strip()[-500:]}", file=sys.stderr)
                return 1
            print(f"uninterrupted {name}: {job.steps} steps, {time.perf_counter() - began:.0f} s so far", flush=True)
        outcomes = []
        planned = plan(args.kills, args.seed, all_jobs)
        for number, (job, signame, target, delay) in enumerate(planned, 1):
            outcome = kill_and_resume(number, len(planned), job, signame, target, delay, work, references[job.name])
            print(outcome.line, flush=True)
            outcomes.append(outcome)
        identical = sum(o.identical for o in outcomes)
        unusable = sum(o.unusable for o in outcomes)
        print(
            f"{identical}/{len(outcomes)} identical, {unusable} directories unusable "
            f"(seed {args.seed}, {time.perf_counter() - began:.0f} s)"
        )
        return 0 if identical == len(outcomes) else 1
    finally:
        if args.keep or args.work is not None:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

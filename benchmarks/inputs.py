"""The input-and-fault suite: a case for every class of damage a user can do to a run, each a
real ``python -m mdarts`` process (one thread) on tiny runs of real Multi30k data.

Classes: (1) every check before the first byte changes (``--overwrite`` refused by a later
check leaves the old run whole); (2) one writer per run directory (a second process refused,
a dead one's lock taken over); (3) damaged checkpoints refused (overwritten bytes, truncation,
non-finite weights; a resume names the newest whole checkpoint); (4) input checked before
anything runs (experiment specifications, numbers out of range, data that makes no batch);
(5) bounded work (absurd beams, depths and sizes refused with the limit named); (6) honest
messages (a run stopped before its first checkpoint, a model trained on files evaluated,
unreadable files named); (7) claims that hold (2 processes and 1 process with
``--update-freq 2`` make the same updates, dropout on).

A case passes when the command ends as it should: refused with exit status 2, one line on
stderr and no traceback (and, where it matters, every file of the run it was pointed at
unchanged), or done with the right result; and within ``--limit-seconds``.

    python -m benchmarks.inputs                  # prints one line a case and the tally per class
    python -m benchmarks.inputs --only 3 5 --keep
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks.faults import CHILD_ENV, DEFAULT_DATA, REPO_ROOT, last_step, start, write_corpus

CLASSES = {
    1: "checks before the first byte changes",
    2: "one writer per run directory",
    3: "damaged checkpoints refused",
    4: "input checked before anything runs",
    5: "bounded work",
    6: "honest messages",
    7: "claims that hold",
}
TRAIN = ["--arch", "transformer", "--preset", "tiny", "--warmup-steps", "2", "--max-tokens", "256", "--device", "cpu"]


@dataclass
class Result:
    status: int
    err: str
    seconds: float

    def refused(self, *words: str) -> Optional[str]:
        """None when the command was refused cleanly (exit 2, one line, no traceback, naming
        ``words``), else what went wrong."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        if self.status != 2:
            return f"exit {self.status}, expected 2: {self.err.strip()[-300:]}"
        if "Traceback" in self.err or len(lines) != 1:
            return f"{len(lines)} lines on stderr, expected one: {self.err.strip()[-300:]}"
        missing = [w for w in words if w.lower() not in self.err.lower()]
        return f"the message lacks {missing}: {lines[0]}" if missing else None


class Suite:
    """The runs the cases share (a corpus, a finished training, a finished search) and how a
    command is run."""

    def __init__(self, work: Path, data_dir: Path, limit: float) -> None:
        self.work, self.limit = work, limit
        self.data = write_corpus(data_dir, work)
        self.count = 0

    def run(self, *argv: str, env: Optional[dict] = None) -> Result:
        self.count += 1
        name = f"cmd{self.count:03d}"
        began = time.perf_counter()
        child, err = start(list(argv), self.work, name) if env is None else self._start(argv, name, env)
        try:
            status = child.wait(timeout=self.limit)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            status = -9
        return Result(status, err.read_text(errors="replace"), time.perf_counter() - began)

    def _start(self, argv, name: str, env: dict):
        err = self.work / f"{name}.err"
        with open(self.work / f"{name}.out", "wb") as out, open(err, "wb") as error:
            child = subprocess.Popen(
                [sys.executable, "-m", "mdarts", *argv], cwd=REPO_ROOT, env=env, stdout=out, stderr=error
            )
        return child, err

    def option(self, name: str) -> str:
        """The value of data option ``name`` (e.g. "--valid-src")."""
        return self.data[self.data.index(name) + 1]

    def test_files(self) -> list[str]:
        """evaluate's options that score the validation files."""
        return ["--test-src", self.option("--valid-src"), "--test-tgt", self.option("--valid-tgt")]

    def train(self, out: Path, *extra: str) -> Result:
        return self.run("train", "--out", str(out), *TRAIN, *self.data, *extra)

    def finished_training(self, name: str) -> Path:
        out = self.work / name
        result = self.train(out, "--max-steps", "6", "--valid-interval", "2", "--keep-last", "2")
        if result.status != 0:
            raise RuntimeError(f"the training every case starts from failed: {result.err[-500:]}")
        return out

    def search(self, out: Path, *extra: str) -> Result:
        argv = ["search", "--out", str(out), "--max-steps", "4", "--warmup-steps", "2", "--max-tokens", "128"]
        return self.run(*argv, "--checkpoint-interval", "2", *self.data, *extra)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` (the lock file aside)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "run.lock"
    }


def unchanged(folder: Path, before: dict[str, str]) -> Optional[str]:
    after = digest(folder)
    return None if after == before else f"{folder.name} changed: {sorted(set(before) ^ set(after)) or 'contents'}"


def first_problem(*problems: Optional[str]) -> Optional[str]:
    return next((p for p in problems if p), None)


CASES: list[tuple[int, str, Callable[[Suite], Optional[str]]]] = []


def case(klass: int, name: str):
    def register(fn: Callable[[Suite], Optional[str]]):
        CASES.append((klass, name, fn))
        return fn

    return register


# ----------------------------------------------------------------------------- 1: checks first


@case(1, "train --overwrite, no validation pair fits --max-tokens 5: the finished run stays")
def overwrite_train_late_check(suite: Suite) -> Optional[str]:
    out = suite.finished_training("ow-train")
    before = digest(out)
    result = suite.train(out, "--max-steps", "6", "--overwrite", "--max-tokens", "5")
    return first_problem(result.refused("max-tokens"), unchanged(out, before))


@case(1, "search --overwrite, no validation pair fits --max-tokens 5: the finished search stays")
def overwrite_search_late_check(suite: Suite) -> Optional[str]:
    out = suite.work / "ow-search"
    if suite.search(out).status != 0:
        return "the search to overwrite failed"
    before = digest(out)
    result = suite.search(out, "--overwrite", "--max-tokens", "5")
    return first_problem(result.refused("max-tokens"), unchanged(out, before))


@case(1, "train --overwrite --arch of a missing genotype file: the finished run stays")
def overwrite_train_bad_arch(suite: Suite) -> Optional[str]:
    out = suite.finished_training("ow-arch")
    before = digest(out)
    argv = [a if a != "transformer" else str(suite.work / "missing.json") for a in TRAIN]
    result = suite.run("train", "--out", str(out), *argv, *suite.data, "--max-steps", "6", "--overwrite")
    return first_problem(result.refused("missing.json"), unchanged(out, before))


# ----------------------------------------------------------------------------- 2: one writer


def _running(suite: Suite, argv: list[str], log: Path, name: str):
    """A run started in the background, returned once its log has a step (or it ended)."""
    child, _ = start(argv, suite.work, name)
    deadline = time.perf_counter() + suite.limit
    while last_step(log) < 1 and child.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.2)
    return child


@case(2, "a second search, and an --overwrite one, into a directory a search is writing")
def two_searches(suite: Suite) -> Optional[str]:
    out = suite.work / "two-searches"
    argv = ["search", "--out", str(out), "--max-steps", "40", "--warmup-steps", "2", "--max-tokens", "128", *suite.data]
    first = _running(suite, argv, out / "search_log.jsonl", "first-search")
    second, third = suite.run(*argv), suite.run(*argv, "--overwrite")
    status = first.wait(timeout=suite.limit)
    steps = [
        r["step"] for r in map(json.loads, (out / "search_log.jsonl").read_text().splitlines()) if r["event"] == "step"
    ]
    duplicated = (
        None if steps == sorted(set(steps)) and status == 0 else f"first run exit {status}, steps {steps[:8]}..."
    )
    return first_problem(second.refused("another process", "pid"), third.refused("another process"), duplicated)


@case(2, "train --resume beside the training that writes the directory")
def resume_beside_running(suite: Suite) -> Optional[str]:
    out = suite.work / "resume-beside"
    argv = ["train", "--out", str(out), *TRAIN, *suite.data, "--max-steps", "60", "--valid-interval", "2"]
    first = _running(suite, argv, out / "log.jsonl", "first-train")
    while not (out / "checkpoint_last.pt").is_file() and first.poll() is None:
        time.sleep(0.2)
    second = suite.run(*argv, "--resume")
    first.wait(timeout=suite.limit)
    return second.refused("another process")


@case(2, "a lock left by a process that died is taken over, with a message")
def stale_lock(suite: Suite) -> Optional[str]:
    out = suite.work / "stale-lock"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "earlier"}))
    result = suite.train(out, "--max-steps", "2", "--valid-interval", "2")
    if result.status != 0:
        return f"exit {result.status}: {result.err[-300:]}"
    return None if "taking over" in result.err else f"no message about the stale lock: {result.err[-300:]}"


# ----------------------------------------------------------------------------- 3: damaged checkpoints


def _overwritten(source: Path, target: Path, size: int = 400_000) -> Path:
    """A copy of ``source`` with ``size`` bytes (at most a third of it) from its middle replaced."""
    data = bytearray(source.read_bytes())
    size = min(size, len(data) // 3)
    start_at = len(data) // 2 - size // 2
    data[start_at : start_at + size] = os.urandom(size)
    target.write_bytes(bytes(data))
    return target


@case(3, "translate and evaluate a checkpoint with overwritten bytes")
def damaged_translate(suite: Suite) -> Optional[str]:
    base = suite.finished_training("damaged")
    bad = _overwritten(base / "checkpoint_last.pt", suite.work / "bad.pt")
    translated = suite.run("translate", "--checkpoint", str(bad), "--input", suite.option("--valid-src"))
    test = suite.test_files()
    evaluated = suite.run("evaluate", "--checkpoint", str(bad), *test, "--device", "cpu")
    return first_problem(translated.refused("bad.pt", "damaged"), evaluated.refused("bad.pt", "damaged"))


@case(3, "--resume from a damaged checkpoint_last.pt names the newest whole one")
def damaged_resume(suite: Suite) -> Optional[str]:
    out = suite.finished_training("damaged-resume")
    _overwritten(out / "checkpoint_last.pt", out / "checkpoint_last.pt")
    result = suite.train(out, "--max-steps", "8", "--valid-interval", "2", "--keep-last", "2", "--resume")
    return result.refused("checkpoint_last.pt", "damaged", "whole")


@case(3, "a truncated checkpoint and one with NaN weights")
def truncated_and_nan(suite: Suite) -> Optional[str]:
    base = suite.finished_training("truncated")
    source = base / "checkpoint_last.pt"
    cut = suite.work / "cut.pt"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    state = torch.load(source, map_location="cpu", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    nan = suite.work / "nan.pt"
    torch.save(state, nan)
    text = suite.option("--valid-src")
    first = suite.run("translate", "--checkpoint", str(cut), "--input", text)
    second = suite.run("translate", "--checkpoint", str(nan), "--input", text)
    return first_problem(first.refused("cut.pt"), second.refused("nan.pt", "non-finite"))


# ----------------------------------------------------------------------------- 4: input checked first


def _spec(suite: Suite, name: str, text: str) -> Path:
    path = suite.work / f"{name}.toml"
    head = 'name = "x"\npair = "en-de"\nparams = 2349568\n'
    path.write_text(head + text + '\n[[arms]]\nname = "T"\nkind = "transformer"\n')
    return path


@case(
    4, "experiment specifications: unknown key, list for a table, string for a number, unknown preset, impossible size"
)
def bad_specs(suite: Suite) -> Optional[str]:
    specs = {
        "unknown key in [train]": ("[train]\nmax_step = 10\n", "max_step"),
        "a list where a table belongs": ("search = [1, 2]\n", "search"),
        "a string where a number belongs": ('[train]\nlr = "fast"\n', "lr"),
        "an unknown preset": ('train_preset = "huge"\n', "huge"),
        "an impossible size": ("[train]\nmax_steps = 10\n", "params"),
    }
    for what, (text, word) in specs.items():
        path = _spec(suite, what.replace(" ", "-"), text)
        if what == "an impossible size":
            path.write_text(path.read_text().replace("params = 2349568", "params = 10"))
        out = suite.work / f"x-{what.replace(' ', '-')}"
        result = suite.run("experiment", str(path), "--out", str(out), "--data-dir", str(suite.work / "raw"))
        problem = result.refused(word) or (f"{out}/spec.json written" if (out / "spec.json").exists() else None)
        if problem:
            return f"{what}: {problem}"
    return None


@case(4, "numbers out of range: --limit -5, --lr -1, --max-steps 0, --params 1, --params 1e11")
def bad_numbers(suite: Suite) -> Optional[str]:
    base = suite.finished_training("numbers")
    test = suite.test_files()
    checks = [
        (suite.run("evaluate", "--checkpoint", str(base / "checkpoint_last.pt"), *test, "--limit", "-5"), "--limit"),
        (suite.train(suite.work / "n1", "--max-steps", "2", "--lr", "-1"), "lr"),
        (suite.train(suite.work / "n2", "--max-steps", "0"), "max"),
        (suite.train(suite.work / "n3", "--max-steps", "2", "--params", "1"), "--params"),
        (suite.train(suite.work / "n4", "--max-steps", "2", "--params", "100000000000"), "--params"),
    ]
    return first_problem(*(result.refused(word) for result, word in checks))


@case(4, "validation data that makes no batch is refused before the first update")
def no_validation_batch(suite: Suite) -> Optional[str]:
    out = suite.work / "no-batch"
    result = suite.train(out, "--max-steps", "1000", "--max-tokens", "5")
    return first_problem(
        result.refused("max-tokens"), None if not (out / "log.jsonl").exists() else "a log was written"
    )


# ----------------------------------------------------------------------------- 5: bounded work


@case(5, "an absurd beam, a plan for 5,000 layers, a size no network reaches: refused in seconds")
def bounded(suite: Suite) -> Optional[str]:
    base = suite.finished_training("bounded")
    text = suite.option("--valid-src")
    checks = [
        (
            suite.run(
                "translate", "--checkpoint", str(base / "checkpoint_last.pt"), "--input", text, "--beam", "100000"
            ),
            "beam",
        ),
        (suite.run("plan", "--layers", "5000"), "layers"),
        (suite.train(suite.work / "b1", "--max-steps", "2", "--params", "1000000000"), "--params"),
    ]
    slow = next((f"{r.seconds:.0f} s" for r, _ in checks if r.seconds > 30), None)
    return first_problem(*(result.refused(word) for result, word in checks), slow)


# ----------------------------------------------------------------------------- 6: honest messages


@case(6, "a training stopped (Ctrl-C twice) before its first checkpoint says nothing was saved and how to start again")
def stopped_before_checkpoint(suite: Suite) -> Optional[str]:
    for attempt in range(3):  # the second signal must come before the first one's checkpoint is written
        out = suite.work / f"early-stop{attempt}"
        argv = ["train", "--out", str(out), *TRAIN, *suite.data, "--max-steps", "200", "--valid-interval", "150"]
        child = _running(suite, argv, out / "log.jsonl", f"early-stop{attempt}")
        child.send_signal(2)
        time.sleep(0.01)
        child.send_signal(2)
        status = child.wait(timeout=suite.limit)
        if not (out / "checkpoint_last.pt").exists():
            break
    else:
        return "every attempt wrote its checkpoint before the second signal: nothing tested"
    err = (suite.work / f"early-stop{attempt}.err").read_text()
    if status != 130 or "nothing was saved" not in err or "--resume" in err or "Traceback" in err:
        return f"exit {status}: {err.strip()[-300:]}"
    again = suite.run(*argv, "--overwrite")
    return None if again.status == 0 else f"the command it gives failed: {again.err[-300:]}"


@case(6, "a model trained from --train-src files is evaluated on files; a missing file is named")
def evaluate_files(suite: Suite) -> Optional[str]:
    base = suite.finished_training("files")
    test = suite.test_files()
    scored = suite.run("evaluate", "--checkpoint", str(base / "checkpoint_last.pt"), *test, "--device", "cpu")
    missing = suite.run(
        "evaluate",
        "--checkpoint",
        str(base / "checkpoint_last.pt"),
        "--test-src",
        str(suite.work / "nope.en"),
        *test[2:],
    )
    ok = None if scored.status == 0 else f"evaluate exit {scored.status}: {scored.err[-300:]}"
    return first_problem(ok, missing.refused("nope.en"))


@case(6, "damaged gzip training data is named")
def damaged_data(suite: Suite) -> Optional[str]:
    source = Path(suite.option("--train-src"))
    bad = _overwritten(source, suite.work / "train-bad.en.gz", 2000)
    data = [str(bad) if a == str(source) else a for a in suite.data]
    result = suite.run("train", "--out", str(suite.work / "bad-data"), *TRAIN[:-2], *data, "--max-steps", "2")
    return result.refused("train-bad.en.gz")


# ----------------------------------------------------------------------------- 7: claims


@case(7, "2 processes and 1 process with --update-freq 2 make the same updates (tiny preset: dropout on)")
def layout_claim(suite: Suite) -> Optional[str]:
    common = [*TRAIN, *suite.data, "--max-steps", "3", "--valid-interval", "3", "--keep-last", "0"]
    one = suite.run("train", "--out", str(suite.work / "one"), *common, "--update-freq", "2")
    env = {**CHILD_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "WORLD_SIZE": "2"}
    children = []
    for rank in range(2):
        child, _ = suite._start(
            ["train", "--out", str(suite.work / "two"), *common],
            f"rank{rank}",
            {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        children.append(child)
    statuses = [c.wait(timeout=suite.limit) for c in children]
    if one.status != 0 or statuses != [0, 0]:
        return f"exit {one.status} / {statuses}: {one.err[-200:]}"
    a, b = (
        torch.load(suite.work / d / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
        for d in ("one", "two")
    )
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    return None if worst <= 1e-6 else f"weights differ by up to {worst:.2e}"


# ----------------------------------------------------------------------------- the run


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, nargs="+", choices=sorted(CLASSES), help="run only these classes")
    parser.add_argument(
        "--data-dir", type=Path, help="Multi30k raw files (default $MDARTS_DATA, else ../shared/data/multi30k)"
    )
    parser.add_argument(
        "--limit-seconds", type=float, default=120.0, help="a command running longer fails (default 120)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the folder of the runs")
    parser.add_argument("--out", type=Path, help="also write the lines printed to this file")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or Path(os.environ.get("MDARTS_DATA") or DEFAULT_DATA)
    if not (data_dir / "train.en.gz").is_file():
        parser.error(f"--data-dir: no Multi30k train.en.gz in {data_dir}")
    work = Path(tempfile.mkdtemp(prefix="mdarts-inputs-"))
    began, lines, tally = time.perf_counter(), [], {k: [0, 0] for k in CLASSES}
    try:
        suite = Suite(work, data_dir, args.limit_seconds)
        for klass, name, fn in CASES:
            if args.only and klass not in args.only:
                continue
            try:
                problem = fn(suite)
            except Exception as error:  # a case that cannot even be set up fails, and says why
                problem = f"{type(error).__name__}: {error}"
            tally[klass][0] += problem is None
            tally[klass][1] += 1
            lines.append(
                f"[{klass}] {'clean' if problem is None else 'FAILED'}: {name}" + (f": {problem}" if problem else "")
            )
            print(lines[-1], flush=True)
        lines.append("")
        lines += [f"class {k} ({CLASSES[k]}): {ok}/{n} clean" for k, (ok, n) in tally.items() if n]
        clean = sum(ok for ok, _ in tally.values())
        total = sum(n for _, n in tally.values())
        lines.append(f"{clean}/{total} cases clean, {suite.count} commands, {time.perf_counter() - began:.0f} s")
        print("\n".join(lines[-len([n for n in tally.values() if n[1]]) - 2 :]))
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return 0 if clean == total else 1
    finally:
        if args.keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

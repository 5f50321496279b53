"""Several processes (gloo, on the CPU): the gradient of a step shared out over two processes
is the gradient of one process holding the whole step, weights and architecture logits stay
identical across processes, only rank 0 writes, and a run resumes with another number of
processes. Each test starts two real processes."""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import search_config

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(worker, *args) -> None:
    """Run ``worker(rank, *args)`` in WORLD processes joined by gloo, as torchrun would."""
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=True)


def join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)


# ----------------------------------------------------------------------------- the gradient of a step


def gradient_worker(rank: int, port: int, out: str) -> None:
    """Each process, in each memory mode: its half of a batch through the weights' gradients
    (summed over the processes in buckets while the backward runs), the architecture gradient
    and the next alpha; and the whole batch in a one-process searcher. Saved for the test."""
    from mdarts.batching import collate
    from mdarts.config import SearchSettings
    from mdarts.model import Supernet
    from mdarts.processes import ONE_PROCESS, Ranks
    from mdarts.reduction import BucketedReduce
    from mdarts.search.darts import DartsSearcher, DartsSettings

    join(rank, port)
    try:
        ranks = Ranks.from_environment("cpu")
        rng = random.Random(7)  # the same eight pairs in every process
        sentence = lambda: [rng.randrange(4, 50) for _ in range(rng.randrange(3, 12))]
        pairs = [(sentence(), sentence()) for _ in range(8)]
        settings = SearchSettings(max_steps=10, device="cpu")
        results = {}
        for mode in MEMORY_MODES:
            for name, group, batch in (
                ("shared", ranks, collate(pairs[rank * 4 : rank * 4 + 4])),
                ("whole", ONE_PROCESS, collate(pairs)),
            ):
                torch.manual_seed(0)
                model = Supernet(search_config().replace(dropout=0.0, memory_mode=mode), 50)
                darts = DartsSearcher(model, settings, DartsSettings(), group)
                darts.weight_reduce = BucketedReduce(darts.weights, group, bucket_bytes=4_000)  # several buckets
                darts.weight_gradients(batch)
                grads = [p.grad.clone() for p in darts.weights]
                arch_grads = list(torch.autograd.grad(darts._loss(model, batch), darts.arch))
                group.reduce(arch_grads)
                darts.alpha_step(batch)  # the next alpha
                results[mode, name] = {
                    "grads": grads + arch_grads,
                    "alpha": [a.detach().clone() for a in darts.arch],
                    "buckets": (len(darts.weight_reduce.buckets), darts.weight_reduce.launched_before_end),
                }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        leave()


MEMORY_MODES = ("store", "checkpoint", "reconstruct")


def test_two_processes_give_the_gradient_and_next_alpha_of_one_process(tmp_path):
    start(gradient_worker, str(tmp_path))
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for mode in MEMORY_MODES:
            shared, whole = results[mode, "shared"], results[mode, "whole"]
            for got, want in zip(shared["grads"], whole["grads"], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            for got, want in zip(shared["alpha"], whole["alpha"], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            # the reduction overlapped the backward: a bucket went out before the next was ready
            buckets, sent_during_backward = shared["buckets"]
            assert buckets >= 3 and sent_during_backward >= 2, (mode, shared["buckets"])


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture
def corpus(multi30k_corpus, tmp_path) -> list[str]:
    """Command-line options of 200 training and 20 validation pairs as generic files."""
    options = []
    for split, name, count in (("train", "train", 200), ("val", "valid", 20)):
        corpus = multi30k_corpus[split].corpus
        for side, lines in (("src", corpus.src[:count]), ("tgt", corpus.tgt[:count])):
            path = tmp_path / f"{split}.{side}.gz"
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
            options += [f"--{name}-{side}", str(path)]
    return [*options, "--vocab-size", "200", "--tokenizer-cache", str(tmp_path / "spm"), "--device", "cpu"]


def cli_worker(rank: int, port: int, argv: list[str], out: str) -> None:
    """Each process runs ``mdarts argv``; then saves its own model weights for the test."""
    import mdarts.search as search_module
    import mdarts.train as train_module
    from mdarts.cli import main

    join(rank, port)
    kept = {}
    for module, cls in ((search_module, "Searcher"), (train_module, "Trainer")):
        original = getattr(module, cls).run

        def run(self, original=original):
            result = original(self)
            kept["state"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return result

        getattr(module, cls).run = run
    try:
        status = main(argv)
        torch.save({"status": status, "state": kept["state"]}, Path(out) / f"rank{rank}.pt")
    finally:
        leave()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_search_in_two_processes_keeps_every_rank_identical_and_writes_once(corpus, tmp_path):
    run = tmp_path / "search"
    argv = ["search", "--out", str(run), "--max-steps", "4", "--eval-interval", "2", "--max-tokens", "400"]
    argv += ["--weights-only-fraction", "0.25", *corpus]
    start(cli_worker, argv, str(tmp_path))
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert [s["status"] for s in states] == [0, 0]
    first, second = (s["state"] for s in states)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # weights and alpha alike, by construction
    assert any(k.startswith("alpha_") and not torch.equal(v, torch.zeros_like(v)) for k, v in first.items())
    log = records(run / "search_log.jsonl")
    assert [r["step"] for r in log if r["event"] == "step"] == [1, 2, 3, 4]  # one writer
    assert len(records(run / "alpha_history.jsonl")) == 2


def test_training_resumes_with_another_number_of_processes(corpus, tmp_path):
    from mdarts.cli import main

    run = tmp_path / "train"
    common = ["train", "--arch", "transformer", "--preset", "tiny", "--out", str(run), "--warmup-steps", "2"]
    common += ["--valid-interval", "2", "--log-interval", "1", "--max-tokens", "400", *corpus]
    start(cli_worker, [*common, "--max-steps", "4"], str(tmp_path))
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert all(torch.equal(states[0]["state"][k], states[1]["state"][k]) for k in states[0]["state"])
    assert main([*common, "--max-steps", "6", "--resume"]) == 0  # one process from step 4 on
    log = records(run / "log.jsonl")
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if r["event"] == "valid"] == [2, 4, 6]


def cli_worker_with_dropout(rank: int, port: int, argv: list[str], out: str, dropout: float) -> None:
    """:func:`cli_worker` with the tiny preset's dropout set to ``dropout``."""
    from mdarts.config import TRAIN_PRESETS

    TRAIN_PRESETS["tiny"] = TRAIN_PRESETS["tiny"].replace(dropout=dropout)
    cli_worker(rank, port, argv, out)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_two_processes_make_the_updates_of_one_process_accumulating_two_batches(corpus, tmp_path, monkeypatch, dropout):
    """With dropout too: a batch's masks depend on its place in the step (mdarts.runloop.batch_randomness),
    not on which process takes it."""
    from mdarts.checkpoint import load_checkpoint
    from mdarts.cli import main
    from mdarts.config import TRAIN_PRESETS

    def argv(run: Path) -> list[str]:
        common = ["train", "--arch", "transformer", "--preset", "tiny", "--out", str(run), "--warmup-steps", "2"]
        return [*common, "--max-steps", "4", "--valid-interval", "4", "--log-interval", "1", "--max-tokens", "400"]

    start(cli_worker_with_dropout, [*argv(tmp_path / "two"), *corpus], str(tmp_path), dropout)
    monkeypatch.setitem(TRAIN_PRESETS, "tiny", TRAIN_PRESETS["tiny"].replace(dropout=dropout))
    assert main([*argv(tmp_path / "one"), "--update-freq", "2", *corpus]) == 0
    two, one = (load_checkpoint(tmp_path / run / "checkpoint_last.pt")["model"] for run in ("two", "one"))
    assert two.keys() == one.keys()
    # atol: the key biases have no true gradient (softmax ignores them), and Adam turns the rounding
    # noise of another summation order into small steps of its own (about 3e-6 here)
    for name in two:
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-5, msg=name)
    losses = [
        [r["loss"] for r in records(tmp_path / run / "log.jsonl") if r["event"] == "train"] for run in ("two", "one")
    ]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def dying_worker(rank: int, port: int, argv: list[str], die_at: int) -> None:
    """Runs ``mdarts argv``; rank 1 is killed (SIGKILL) when it starts update ``die_at``."""
    import signal

    import mdarts.train as train_module
    from mdarts.cli import main

    join(rank, port)
    step = train_module.Trainer._train_step

    def train_step(self, batch):
        if rank == 1 and self.steps + 1 == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, batch)

    train_module.Trainer._train_step = train_step
    try:
        main(argv)
    finally:
        leave()


def test_a_killed_rank_leaves_the_last_checkpoint_whole_and_the_run_resumable(corpus, tmp_path):
    from mdarts.checkpoint import load_checkpoint
    from mdarts.cli import main

    run = tmp_path / "train"
    common = ["train", "--arch", "transformer", "--preset", "tiny", "--out", str(run), "--warmup-steps", "2"]
    common += ["--valid-interval", "2", "--max-tokens", "400", *corpus]
    with pytest.raises(mp.ProcessExitedException):  # the others are stopped with it
        start(dying_worker, [*common, "--max-steps", "6"], 4)
    assert load_checkpoint(run / "checkpoint_last.pt", "train")["step"] == 2
    assert main([*common, "--max-steps", "6", "--resume"]) == 0
    assert load_checkpoint(run / "checkpoint_last.pt", "train")["step"] == 6


def status_worker(rank: int, port: int, argvs: list[list[str]], out: str) -> None:
    """Rank r runs ``mdarts argvs[r]``; its exit status and error output are saved."""
    import contextlib
    import io

    from mdarts.cli import main

    join(rank, port)
    error = io.StringIO()
    try:
        with contextlib.redirect_stderr(error):
            status = main(argvs[rank])
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"status": status, "stderr": error.getvalue()}))
    finally:
        leave()


def test_processes_started_with_different_settings_all_stop_and_say_what_differs(corpus, tmp_path):
    run = tmp_path / "train"
    argv = ["train", "--arch", "transformer", "--preset", "tiny", "--out", str(run), "--max-steps", "2", *corpus]
    start(status_worker, [[*argv, "--lr", "1e-3"], [*argv, "--lr", "2e-3"]], str(tmp_path))
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["status"] == 2
        assert "processes were started with different settings (lr: [0.001, 0.002])" in result["stderr"]

"""Tests of training (mdarts.train): exact resume, learning on a slice of Multi30k,
checkpoints (atomic, corrupt, mismatched, averaged), settings and run-directory safety.

Tiny models (d 24, one layer each side) on the suite's slice of Multi30k En-De (the
``multi30k_corpus`` fixture) keep the whole file well under a minute on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY as BASE
from helpers import head, short_training

import mdarts.runloop as runs_module
import mdarts.train as train_module
from mdarts.checkpoint import (
    average_checkpoints,
    build_model_from_spec,
    load_checkpoint,
    load_model,
    model_spec,
    save_checkpoint,
    write_average_checkpoint,
)
from mdarts.config import ModelConfig, TrainConfig
from mdarts.genotype import Genotype
from mdarts.loss import evaluate_loss
from mdarts.model import DerivedNet, TransformerBaseline
from mdarts.prepare import PreparedData
from mdarts.tokenizer import Tokenizer
from mdarts.train import Trainer, read_log

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = BASE.replace(encoder_layers=1, decoder_layers=1, max_positions=128)
VALID_SENTENCES = 200


@pytest.fixture(scope="module")
def data(multi30k_corpus):
    """(train, valid, tokenizer): the suite's 2000 training pairs of Multi30k En-De, the first
    200 validation pairs, its 300-piece SentencePiece model."""
    return multi30k_corpus["train"], head(multi30k_corpus["val"], VALID_SENTENCES), multi30k_corpus.tokenizer


def _prepared(data, n_train: int, n_valid: int) -> PreparedData:
    """The first ``n_train`` / ``n_valid`` pairs of ``data`` as prepared data."""
    train, valid, tokenizer = data
    return PreparedData(tokenizer, {"train": head(train, n_train), "val": head(valid, n_valid)}, "en", "de")


def _model(tokenizer: Tokenizer, seed: int = 0, config: ModelConfig = TINY) -> TransformerBaseline:
    torch.manual_seed(seed)
    return TransformerBaseline(config, tokenizer.vocab_size)


def _trainer(
    data, out_dir: Path, config: TrainConfig, *, seed: int = 0, n_train: int = 300, n_valid: int = 60, **kwargs
) -> Trainer:
    train, valid, tokenizer = data
    model = _model(tokenizer, seed)
    return Trainer(lambda: model, _prepared(data, n_train, n_valid), config, out_dir, progress=False, **kwargs)


_short = short_training


# ---------------------------------------------------------------------------- exact resume


def test_resume_equals_uninterrupted(data, tmp_path):
    """2N steps in one go == N steps, a resume from checkpoint_last.pt, N more steps:
    the same logged losses (training and validation) and bit-identical parameters and
    optimizer state, with dropout on and the epoch boundary crossed after the resume."""
    n = 16
    config = _short(max_steps=2 * n, valid_interval=n, keep_last=0)
    whole = _trainer(data, tmp_path / "whole", config)
    assert n < len(whole.train_batches) < 2 * n  # resume mid-epoch, then start a new epoch
    assert whole.model.config.dropout > 0
    whole.run()

    _trainer(data, tmp_path / "split", dataclasses.replace(config, max_steps=n)).run()
    # another initialisation: everything must come from the checkpoint
    resumed = _trainer(data, tmp_path / "split", config, seed=123, resume=True)
    assert (resumed.steps, resumed.position) == (n, n)
    summary = resumed.run()
    assert summary.details["epochs"] == 1 and summary.steps == 2 * n

    fields = ("event", "step", "epoch", "loss", "nll", "grad_norm", "lr", "tokens")
    strip = lambda entries: [{k: e[k] for k in fields if k in e} for e in entries]
    assert strip(read_log(tmp_path / "split")) == strip(read_log(tmp_path / "whole"))
    assert len([e for e in read_log(tmp_path / "whole") if e["event"] == "train"]) == 2 * n

    a = load_checkpoint(tmp_path / "whole" / "checkpoint_last.pt", "train")
    b = load_checkpoint(tmp_path / "split" / "checkpoint_last.pt", "train")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    assert (a["epoch"], a["position"], a["best_loss"]) == (b["epoch"], b["position"], b["best_loss"])


def test_resume_log_is_cut_back_to_the_checkpoint(data, tmp_path):
    """Log lines written after the last checkpoint (a crash) are replaced, not duplicated."""
    _trainer(data, tmp_path, _short(max_steps=3, valid_interval=3)).run()
    with open(tmp_path / "log.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "train", "step": 4, "loss": 9.9}) + "\n")
    _trainer(data, tmp_path, _short(max_steps=4, valid_interval=3), resume=True).run()
    steps = [e["step"] for e in read_log(tmp_path) if e["event"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert all(e["loss"] != 9.9 for e in read_log(tmp_path))


def test_max_minutes_stops_and_counts_across_resumes(data, tmp_path, monkeypatch):
    """The minutes budget stops training, is written into the checkpoint, and a resume
    continues the count: a run whose budget is spent takes no further step."""
    clock = iter(range(0, 10_000, 10))  # every reading of the clock: 10 s later
    monkeypatch.setattr(runs_module, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    config = _short(max_steps=None, max_minutes=0.5, valid_interval=100)
    summary = _trainer(data, tmp_path, config).run()
    assert summary.stopped_by == "max_minutes"
    steps = summary.steps
    assert 1 <= steps < 6
    state = load_checkpoint(tmp_path / "checkpoint_last.pt", "train")
    assert state["train_seconds"] >= 30.0
    resumed = _trainer(data, tmp_path, config, resume=True)
    assert resumed.clock.before == state["train_seconds"]
    assert resumed.run().steps == steps
    more = _trainer(data, tmp_path, dataclasses.replace(config, max_minutes=5.0), resume=True).run()
    assert more.stopped_by == "max_minutes" and more.steps > steps


def test_resume_refuses_other_settings_or_model(data, tmp_path):
    _trainer(data, tmp_path, _short(max_steps=3)).run()
    with pytest.raises(ValueError, match=r"different settings: lr"):
        _trainer(data, tmp_path, _short(max_steps=6, lr=1e-3), resume=True)
    train, valid, tokenizer = data
    other = TransformerBaseline(TINY.replace(d_model=12), tokenizer.vocab_size)
    with pytest.raises(ValueError, match="another model"):
        Trainer(lambda: other, _prepared(data, 300, 60), _short(), tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no run to continue"):
        _trainer(data, tmp_path / "empty", _short(), resume=True)


# ---------------------------------------------------------------------------- learning


def test_a_few_hundred_steps_lower_the_validation_loss(data, tmp_path):
    """250 updates of a 60k-parameter Transformer (d 48) on 2000 pairs cut the validation
    loss (label-smoothed, 200 held-out pairs) by more than 30% and the NLL by more than
    40% from their initial values (observed: about 38% and 46%)."""
    train, valid, tokenizer = data
    config = _short(lr=1e-2, warmup_steps=30, max_tokens=1024, max_steps=250, valid_interval=125, log_interval=25)
    model = _model(tokenizer, config=TINY.replace(d_model=48, embed_dim=32))
    trainer = Trainer(lambda: model, _prepared(data, len(train), len(valid)), config, tmp_path, progress=False)
    initial = evaluate_loss(model, trainer.valid_batches, TINY.pad_id, 0.1, trainer.device)
    summary = trainer.run()

    final = summary.details["last_valid"]
    assert final["loss"] < 0.7 * initial["loss"], (initial, final)
    assert final["nll"] < 0.6 * initial["nll"], (initial, final)
    assert summary.stopped_by == "max_steps" and summary.steps == 250
    log = read_log(tmp_path)
    assert [e["step"] for e in log if e["event"] == "valid"] == [125, 250]
    assert len([e for e in log if e["event"] == "train"]) == 10
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.glob("checkpoint*.pt")) == [
        "checkpoint_avg.pt",
        "checkpoint_best.pt",
        "checkpoint_last.pt",
        "checkpoint_step125.pt",
        "checkpoint_step250.pt",
    ]
    # the best checkpoint alone rebuilds the model and the tokenizer
    model, loaded_tokenizer, spec, trained_on = load_model(tmp_path / "checkpoint_best.pt")
    assert trained_on["pair"] == "en-de"
    assert loaded_tokenizer.to_bytes() == tokenizer.to_bytes() and spec["kind"] == "transformer"
    again = evaluate_loss(model, trainer.valid_batches, TINY.pad_id, 0.1, torch.device("cpu"))["loss"]
    assert again == pytest.approx(summary.details["best_valid_loss"], rel=1e-6)


def test_early_stopping_and_best_checkpoint(data, tmp_path, monkeypatch):
    """Validation losses 3.0, 2.0, 2.5, 2.1: with patience 2 the run stops after the fourth
    validation; checkpoint_best.pt is the second's. The BLEU callback runs in eval mode."""
    losses = iter([3.0, 2.0, 2.5, 2.1, 1.0])
    scripted = lambda *args, **kwargs: {"loss": next(losses), "nll": 1.0, "ppl": 2.7, "tokens": 1}

    def bleu(model: torch.nn.Module) -> float:
        assert not model.training and not torch.is_grad_enabled()
        return 12.5

    monkeypatch.setattr(train_module, "evaluate_loss", scripted)
    summary = _trainer(data, tmp_path, _short(max_steps=100, valid_interval=2, patience=2), validate_bleu=bleu).run()
    assert summary.stopped_by == "patience" and summary.steps == 8
    assert summary.details["best_valid_loss"] == 2.0
    valid = [e for e in read_log(tmp_path) if e["event"] == "valid"]
    assert [(e["step"], e["bad_validations"], e["bleu"]) for e in valid] == [
        (2, 0, 12.5),
        (4, 0, 12.5),
        (6, 1, 12.5),
        (8, 2, 12.5),
    ]
    assert load_checkpoint(tmp_path / "checkpoint_best.pt")["step"] == 4


def test_bf16_autocast_trains_and_warns_where_the_cpu_would_emulate_it(data, tmp_path):
    import warnings

    from mdarts.processes import cpu_supports_bf16

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = _trainer(data, tmp_path, _short(max_steps=2, valid_interval=2, bf16=True)).run()
    assert summary.steps == 2 and torch.isfinite(torch.tensor(summary.details["last_valid"]["loss"]))
    slow = [w for w in caught if "has no fast bfloat16" in str(w.message)]
    assert len(slow) == (0 if cpu_supports_bf16() else 1)  # this machine's answer either way


def test_the_chunked_loss_trains_as_the_full_logits_do(data, tmp_path):
    """Same loss, same updates (to float32 rounding): the chunked output layer only changes
    how the loss is computed."""
    trainers, summaries = [], []
    for rows in (0, 7):  # each trainer seeds the RNG (dropout) when it is made: make each just before its run
        trainers.append(
            _trainer(data, tmp_path / str(rows), _short(max_steps=3, valid_interval=3, loss_chunk_rows=rows))
        )
        summaries.append(trainers[-1].run())
    assert summaries[0].details["last_valid"]["loss"] == pytest.approx(
        summaries[1].details["last_valid"]["loss"], rel=1e-5
    )
    for full, chunked in zip(trainers[0].model.parameters(), trainers[1].model.parameters(), strict=True):
        torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_atomic_and_corruption_is_named(data, tmp_path):
    run = tmp_path / "run"
    _trainer(data, run, _short()).run()
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*tmp"))
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_avg.pt"):
        load_model(run / name)

    broken = tmp_path / "broken.pt"
    content = (run / "checkpoint_last.pt").read_bytes()
    broken.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=r"broken\.pt: damaged \(not a whole zip archive"):
        load_model(broken)
    # a truncated checkpoint_last.pt stops a resume with the same message, and is kept
    shutil.copy(broken, run / "checkpoint_last.pt")
    with pytest.raises(ValueError, match=r"checkpoint_last\.pt: damaged \(not a whole zip archive"):
        _trainer(data, run, _short(max_steps=9), resume=True)
    assert (run / "checkpoint_last.pt").read_bytes() == broken.read_bytes()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")


def test_mismatched_checkpoint_says_which_keys_and_why(data, tmp_path):
    _trainer(data, tmp_path, _short(max_steps=3)).run()
    payload = load_checkpoint(tmp_path / "checkpoint_last.pt", "train")

    wider = dict(payload, spec={**payload["spec"], "config": TINY.replace(d_model=48).to_dict()})
    save_checkpoint(tmp_path / "wider.pt", wider)
    with pytest.raises(
        ValueError,
        match=r"wider\.pt: the weights do not fit the model \(TransformerBaseline\): "
        r"shape mismatch: src_embed\.project\.weight \(24, 16\) \(model has \(48, 16\)\)",
    ):
        load_model(tmp_path / "wider.pt")

    state = dict(payload["model"])
    removed = next(iter(state))
    del state[removed]
    state["extra.weight"] = torch.zeros(1)
    save_checkpoint(tmp_path / "keys.pt", dict(payload, model=state))
    with pytest.raises(ValueError, match=rf"keys\.pt.*missing key\(s\) {removed}; unexpected key\(s\) extra\.weight"):
        load_model(tmp_path / "keys.pt")

    save_checkpoint(tmp_path / "vocab.pt", dict(payload, spec={**payload["spec"], "vocab_size": 400}))
    with pytest.raises(ValueError, match=r"vocab\.pt: the tokenizer has 300 ids but the model 400"):
        load_model(tmp_path / "vocab.pt")

    save_checkpoint(tmp_path / "search.pt", {"kind": "search"})
    with pytest.raises(ValueError, match=r"search\.pt is a 'search' checkpoint"):
        load_model(tmp_path / "search.pt")


def test_average_of_identical_checkpoints_is_the_checkpoint(data, tmp_path):
    _trainer(data, tmp_path, _short(max_steps=3, keep_last=2)).run()
    last = tmp_path / "checkpoint_last.pt"
    state = load_checkpoint(last)["model"]
    averaged = average_checkpoints([last, last, last])
    assert averaged.keys() == state.keys()
    assert all(torch.equal(averaged[k], state[k]) and averaged[k].dtype == state[k].dtype for k in state)


def test_average_is_the_parameter_mean(data, tmp_path):
    _trainer(data, tmp_path, _short(max_steps=6, valid_interval=3, keep_last=2)).run()
    a = load_checkpoint(tmp_path / "checkpoint_step3.pt")["model"]
    b = load_checkpoint(tmp_path / "checkpoint_step6.pt")["model"]
    path = write_average_checkpoint(tmp_path)
    averaged = load_checkpoint(path, "average")
    assert averaged["averaged"] == ["checkpoint_step3.pt", "checkpoint_step6.pt"]
    for key in a:
        torch.testing.assert_close(averaged["model"][key], (a[key] + b[key]) / 2)
    model = load_model(path).model
    assert torch.equal(model.state_dict()["src_embed.table.weight"], averaged["model"]["src_embed.table.weight"])


def test_keep_last_prunes_step_checkpoints(data, tmp_path):
    _trainer(data, tmp_path, _short(max_steps=8, valid_interval=2, keep_last=3)).run()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_step*.pt")) == [
        "checkpoint_step4.pt",
        "checkpoint_step6.pt",
        "checkpoint_step8.pt",
    ]


def test_derived_spec_round_trip(data):
    _, _, tokenizer = data
    genotype = Genotype(
        [["ffn", "attention"]] * 2, [["conv3", "attention"]] * 2, TINY.encoder_candidates, TINY.decoder_candidates
    )
    model = DerivedNet(genotype, TINY, tokenizer.vocab_size)
    rebuilt = build_model_from_spec(model_spec(model))
    assert isinstance(rebuilt, DerivedNet) and rebuilt.genotype == genotype
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="kind must be one of"):
        build_model_from_spec({**model_spec(model), "kind": "lstm"})
    with pytest.raises(ValueError, match="needs its genotype"):
        build_model_from_spec({**model_spec(model), "genotype": None})


# ---------------------------------------------------------------------------- settings and run directories


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": None, "max_epochs": None}, "max_steps: give a budget"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"valid_interval": 0}, "valid_interval"),
        ({"max_epochs": 1.5}, "max_epochs"),
        ({"max_minutes": 0.0}, "max_minutes"),
        ({"max_minutes": float("inf")}, "max_minutes"),
        ({"patience": -1}, "patience"),
        ({"keep_last": -1}, "keep_last"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"device": "gpu0"}, "device"),
    ],
)
def test_bad_train_config_names_the_field(changes, field):
    settings = {"max_steps": 10, **changes}
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**settings)


def test_learning_rate_schedule():
    config = TrainConfig(lr=1e-3, warmup_steps=100, max_steps=1)
    assert config.learning_rate(1) == pytest.approx(1e-5)
    assert config.learning_rate(100) == pytest.approx(1e-3)
    assert config.learning_rate(400) == pytest.approx(5e-4)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_cooldown_ramps_the_last_updates_down_to_zero():
    plain = TrainConfig(lr=1e-3, warmup_steps=100, max_steps=1000)
    cooled = plain.replace(cooldown_fraction=0.2)  # the last 200 updates
    assert [cooled.learning_rate(s) for s in (1, 100, 800)] == [plain.learning_rate(s) for s in (1, 100, 800)]
    assert cooled.learning_rate(801) == pytest.approx(plain.learning_rate(801))  # 200/200 of it
    assert cooled.learning_rate(900) == pytest.approx(plain.learning_rate(900) * 101 / 200)
    assert cooled.learning_rate(1000) == pytest.approx(plain.learning_rate(1000) / 200)
    rates = [cooled.learning_rate(s) for s in range(801, 1001)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError, match="TrainConfig.cooldown_fraction: a cool-down needs the budget in updates"):
        TrainConfig(max_minutes=5.0, cooldown_fraction=0.2)
    with pytest.raises(ValueError, match="TrainConfig.cooldown_fraction"):
        TrainConfig(max_steps=10, cooldown_fraction=1.0)


def test_a_cooled_training_steps_with_the_cooled_rate(data, tmp_path):
    settings = _short(max_steps=4, cooldown_fraction=0.5)
    trainer = _trainer(data, tmp_path, settings)
    trainer.run()
    assert trainer.optimizer.param_groups[0]["lr"] == settings.learning_rate(4) == pytest.approx(2e-3 * 4 / 10 / 2)
    logged = [e["lr"] for e in read_log(tmp_path) if e["event"] == "train"]
    assert logged == [settings.learning_rate(s) for s in (1, 2, 3, 4)]


def test_existing_run_is_refused_without_resume_or_overwrite(data, tmp_path):
    _trainer(data, tmp_path, _short(max_steps=3)).run()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="already holds another training run.*resume.*overwrite"):
        _trainer(data, tmp_path, _short(max_steps=3))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing lost
    summary = _trainer(data, tmp_path, _short(max_steps=2, valid_interval=2), overwrite=True).run()
    assert summary.steps == 2
    assert not (tmp_path / "checkpoint_step3.pt").exists()
    assert [e["step"] for e in read_log(tmp_path) if e["event"] == "valid"] == [2]

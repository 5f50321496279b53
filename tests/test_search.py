"""The DARTS search engine (mdarts.search): a tiny search on Multi30k end to end, exact
resume, separation of the theta and alpha updates, the second-order finite differences."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from helpers import head, search_config
from torch import nn

from mdarts.checkpoint import load_checkpoint
from mdarts.config import SearchSettings
from mdarts.genotype import Genotype
from mdarts.model import Node, Supernet
from mdarts.prepare import PreparedData
from mdarts.runloop import BatchStream
from mdarts.search import Searcher, argmax_stability, collapse_message, split_corpus, split_values
from mdarts.search.darts import (
    DartsSearcher,
    DartsSettings,
    Schedule,
    finite_difference_hvp,
    loss_and_grads,
    unrolled_arch_gradients,
)
from mdarts.search.ranked_paths import RankedPathsSettings

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = search_config()


def tiny_settings(**changes) -> SearchSettings:
    values = {
        "max_steps": 8,
        "max_tokens": 600,
        "warmup_steps": 10,
        "eval_interval": 4,
        "checkpoint_interval": 4,
        "device": "cpu",
    }
    return SearchSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def data(multi30k_corpus) -> PreparedData:
    """400 training and 40 validation pairs of the suite's Multi30k En-De, its tokenizer."""
    splits = {"train": head(multi30k_corpus["train"], 400), "val": head(multi30k_corpus["val"], 40)}
    return PreparedData(multi30k_corpus.tokenizer, splits, "en", "de")


def search(data: PreparedData, settings: SearchSettings, out_dir, **options):
    """A search of CONFIG on ``data`` into ``out_dir`` (``resume``, ``overwrite``), without a progress bar."""
    return Searcher(CONFIG, data, settings, out_dir, progress=False, **options).run()


def search_crashing_after_step(step: int, monkeypatch, data, settings, out_dir, **options) -> None:
    """:func:`search` that crashes (KeyboardInterrupt) right after the checkpoint of ``step``."""
    with monkeypatch.context() as patch:
        save = Searcher.save

        def save_then_crash(searcher: Searcher) -> None:
            save(searcher)
            if searcher.steps == step:
                raise KeyboardInterrupt

        patch.setattr(Searcher, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            search(data, settings, out_dir, **options)


def step_losses(out_dir) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (out_dir / "search_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["theta_loss"], r["alpha_loss"]) for r in records if r["event"] == "step"]


def saved_alphas(out_dir) -> list[torch.Tensor]:
    state = load_checkpoint(out_dir / "search_checkpoint.pt", kind="search")["searcher"]["model"]
    return [state[name] for name in sorted(state) if name.startswith("alpha_")]


def test_tiny_search_writes_genotype_history_and_heatmap(data, tmp_path):
    out = tmp_path / "run"
    result = search(data, tiny_settings(max_steps=10, valid_interval=8), out)
    assert result.steps == 10 and result.peak_memory_bytes > 0
    genotype = Genotype.load(out / "genotype.json").validate(CONFIG)
    assert genotype == result.details["genotype"]
    history = [json.loads(line) for line in (out / "alpha_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [4, 8, 10]  # every eval_interval, and at the end
    for record in history:
        for node in (n for side in ("encoder", "decoder") for layer in record[side] for n in layer):
            assert sum(node) == pytest.approx(1.0, abs=1e-6)
    assert (out / "alpha_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [json.loads(line) for line in (out / "search_log.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["event"] == "eval"]
    assert evals[0]["argmax_stability"] is None and 0.0 <= evals[-1]["argmax_stability"] <= 1.0
    # the validation loss every valid_interval steps and at the end
    assert [r["step"] for r in evals if "val_loss" in r] == [8, 10]
    assert all(r["val_loss"] > 0 for r in evals if "val_loss" in r) and result.val_loss == evals[-1]["val_loss"]
    assert len(step_losses(out)) == 10


@pytest.mark.parametrize("second_order, shrink_to", [(False, ()), (True, ()), (False, (4, 2))])
def test_resume_gives_the_same_losses_and_alphas_as_an_uninterrupted_run(
    data, tmp_path, second_order, shrink_to, monkeypatch
):
    assert CONFIG.dropout > 0
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    # with shrinking: 7 alpha steps from step 2, cut into 3 stages; the first shrink (step 4) precedes the crash
    settings = tiny_settings(max_steps=8)
    darts = DartsSettings(second_order=second_order, shrink_to=shrink_to, weights_only_fraction=0.1)
    search(data, settings, straight, method=darts)
    search_crashing_after_step(4, monkeypatch, data, settings, parted, method=darts)
    with pytest.raises(FileExistsError, match="another search run"):
        search(data, settings, parted, method=darts)
    search(data, settings, parted, resume=True, method=darts)
    assert step_losses(parted) == step_losses(straight)
    for a, b in zip(saved_alphas(parted), saved_alphas(straight), strict=True):
        assert torch.equal(a, b)


def test_resume_refuses_other_settings(data, tmp_path):
    search(data, tiny_settings(max_steps=1), tmp_path)
    with pytest.raises(ValueError, match="split_ratio"):
        search(data, tiny_settings(max_steps=2, split_ratio=0.5), tmp_path, resume=True)


def make_searcher(
    data, darts: Optional[DartsSettings] = None, **changes
) -> tuple[DartsSearcher, BatchStream, BatchStream]:
    torch.manual_seed(0)
    settings = tiny_settings(**changes)
    theta_idx, alpha_idx = split_corpus(len(data["train"]), settings.split_ratio, settings.seed)
    train, limits = data["train"], {"max_positions": CONFIG.max_positions, "pad_id": CONFIG.pad_id}
    theta = BatchStream(
        [train.src_ids[i] for i in theta_idx],
        [train.tgt_ids[i] for i in theta_idx],
        settings.max_tokens,
        0,
        name="theta",
        **limits,
    )
    alpha = BatchStream(
        [train.src_ids[i] for i in alpha_idx],
        [train.tgt_ids[i] for i in alpha_idx],
        settings.max_tokens,
        1,
        name="alpha",
        **limits,
    )
    return DartsSearcher(Supernet(CONFIG, data.tokenizer.vocab_size), settings, darts or DartsSettings()), theta, alpha


@pytest.mark.parametrize("second_order", [False, True])
def test_theta_steps_change_no_alpha_and_alpha_steps_no_theta(data, second_order):
    searcher, theta, alpha = make_searcher(data, DartsSettings(second_order=second_order))
    searcher.steps = 5  # a non-zero learning rate
    held = list(searcher.model.parameters())
    weights = [p.detach().clone() for p in searcher.weights]
    arch = [p.detach().clone() for p in searcher.arch]
    theta_batch = theta.take()[0]
    searcher.theta_step(theta_batch)
    assert all(torch.equal(p, q) for p, q in zip(searcher.arch, arch))
    assert sum(not torch.equal(p, q) for p, q in zip(searcher.weights, weights)) > len(weights) // 2
    weights = [p.detach().clone() for p in searcher.weights]
    searcher.alpha_step(alpha.take()[0], theta_batch)
    assert all(torch.equal(p, q) for p, q in zip(searcher.weights, weights))
    assert all(not torch.equal(p, q) for p, q in zip(searcher.arch, arch))
    assert all(p.grad is None for p in [*searcher.weights, *searcher.arch])
    assert all(p is q for p, q in zip(searcher.model.parameters(), held, strict=True))


def test_collapse_warning_and_argmax_stability():
    assert collapse_message(["zero", "identity", "ffn", "attention"]) is None  # half is not most
    assert "3 of 4 nodes" in collapse_message(["zero", "identity", "identity", "attention"])
    assert argmax_stability(None, ["ffn"]) is None
    assert argmax_stability(["ffn", "conv3", "zero", "glu"], ["ffn", "conv5", "zero", "glu"]) == 0.75


def test_split_is_disjoint_and_deterministic():
    theta, alpha = split_corpus(100, 0.55, seed=3)
    assert len(theta) == 55 and len(alpha) == 45 and not set(theta) & set(alpha)
    assert sorted(theta + alpha) == list(range(100))
    assert split_corpus(100, 0.55, seed=3) == (theta, alpha) != split_corpus(100, 0.55, seed=4)


def test_functional_call_gradients_match_the_reversible_model_with_those_weights(data):
    """The reversible backward recomputes ops: it must see the tensors functional_call put in place."""
    searcher, theta, _ = make_searcher(data)
    model, batch = searcher.model, theta.take()[0]
    params = dict(model.named_parameters())
    moved = {name: (p.detach() + 0.05 * torch.randn_like(p)).requires_grad_() for name, p in params.items()}
    state = torch.get_rng_state()
    loss, grads = loss_and_grads(model, searcher._loss, moved, batch, list(moved))
    assert all(p is params[name] for name, p in model.named_parameters())  # all restored, tied ones too
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(moved[name])
    torch.set_rng_state(state)
    expected_loss = searcher._loss(model, batch)
    expected = torch.autograd.grad(expected_loss, list(params.values()), allow_unused=True)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    for name, got, want in zip(params, grads, expected):
        torch.testing.assert_close(
            got,
            torch.zeros_like(got) if want is None else want,
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}",
        )


class MixedLinear(nn.Module):
    """A two-candidate DARTS cell in plain PyTorch (double backward works): (batch, 5) -> (batch, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(5, 6), nn.Linear(5, 6), nn.Linear(6, 3)
        self.alpha = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.alpha, 0)
        return self.out(w[0] * torch.tanh(self.a(x)) + w[1] * torch.sigmoid(self.b(x)))


def mixed_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture
def mixed() -> tuple[MixedLinear, list[str], list[str], tuple, tuple]:
    torch.manual_seed(0)
    model = MixedLinear().double()
    weight_names = [n for n, _ in model.named_parameters() if n != "alpha"]
    batches = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(2)]
    return model, weight_names, ["alpha"], *batches


def test_finite_difference_hvp_matches_double_backward(mixed):
    model, weight_names, arch_names, train, _ = mixed
    params = dict(model.named_parameters())
    vector = [torch.randn_like(params[n]) for n in weight_names]
    eps = 0.01 / torch.linalg.vector_norm(torch.cat([v.flatten() for v in vector])).item()
    got = finite_difference_hvp(model, mixed_loss, params, weight_names, arch_names, vector, train, eps)
    grads = torch.autograd.grad(mixed_loss(model, train), [params[n] for n in weight_names], create_graph=True)
    (exact,) = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector)), params["alpha"])
    torch.testing.assert_close(got[0], exact, rtol=1e-4, atol=1e-10)


def test_unrolled_gradient_matches_the_exact_one(mixed):
    model, weight_names, arch_names, train, val = mixed
    xi = 0.5
    params = dict(model.named_parameters())
    _, got = unrolled_arch_gradients(model, mixed_loss, weight_names, arch_names, train, val, xi)
    grads = torch.autograd.grad(mixed_loss(model, train), [params[n] for n in weight_names], create_graph=True)
    unrolled = {n: params[n] - xi * g for n, g in zip(weight_names, grads)}
    val_loss = torch.func.functional_call(model, {**unrolled, "alpha": params["alpha"]}, (val[0],))
    (exact,) = torch.autograd.grad(F.cross_entropy(val_loss, val[1]), params["alpha"])
    torch.testing.assert_close(got[0], exact, rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": None, "max_minutes": 0}, "max_minutes"),
        ({"max_steps": None}, "max_steps"),
        ({"split_ratio": 0.0}, "split_ratio"),
        ({"split_ratio": 1.0}, "split_ratio"),
        ({"split_ratio": 1.5}, "split_ratio"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"eval_interval": 0}, "eval_interval"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_settings_raise_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"SearchSettings.{field}"):
        tiny_settings(**changes)


@pytest.mark.parametrize(
    "changes, field",
    [({"shrink_to": (3, 4)}, "shrink_to"), ({"shrink_to": (0,)}, "shrink_to"), ({"alpha_travel": 0}, "alpha_travel")],
)
def test_bad_darts_settings_raise_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"DartsSettings.{field}"):
        DartsSettings(**changes)


def test_a_setting_of_another_part_is_refused_naming_its_part():
    """Shrinking needs DARTS's weights; weight-sharing search has none."""
    with pytest.raises(ValueError, match="--shrink-to is a setting of method darts, not of single_path"):
        split_values({"shrink_to": (3,)}, "single_path", "ranked_paths")
    with pytest.raises(ValueError, match="--ranked-paths is a setting of selector ranked_paths, not of argmax"):
        split_values({"ranked_paths": 3}, "darts", "argmax")


@pytest.mark.filterwarnings("ignore:--bf16. this CPU")
def test_second_order_in_bfloat16_is_refused_before_the_run_starts(data, tmp_path):
    with pytest.raises(ValueError, match="--bf16: the second-order finite differences need float32"):
        search(data, tiny_settings(bf16=True), tmp_path / "run", method=DartsSettings(second_order=True))
    assert not (tmp_path / "run").exists()


def test_out_dir_of_another_run_is_refused_and_left_alone(data, tmp_path):
    (tmp_path / "genotype.json").write_text("earlier run")
    with pytest.raises(FileExistsError, match="another search run"):
        search(data, tiny_settings(max_steps=1), tmp_path)
    assert (tmp_path / "genotype.json").read_text() == "earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genotype.json"]
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        search(data, tiny_settings(max_steps=1), tmp_path, resume=True)
    result = search(data, tiny_settings(max_steps=1), tmp_path, overwrite=True)
    Genotype.load(result.out_dir / "genotype.json").validate(CONFIG)


# ----------------------------------------------------------------------------- the schedule


def test_schedule_is_relative_to_the_budget():
    settings = tiny_settings(max_steps=200, warmup_steps=None, warmup_fraction=0.1)
    darts = DartsSettings(weights_only_fraction=0.3)
    schedule = darts.schedule(settings, 200)
    assert (schedule.warmup_steps, schedule.alpha_start) == (20, 61)
    # alpha_travel spread over the 140 alpha steps: a consistent gradient sign moves a logit by it
    assert schedule.alpha_lr == pytest.approx(darts.alpha_travel / 140)
    assert darts.replace(alpha_lr=1e-3).schedule(settings, 200).alpha_lr == 1e-3
    short = darts.replace(weights_only_fraction=0.6)
    with pytest.raises(ValueError, match="1 steps leaves no architecture step.*give at least 3 steps"):
        short.check_budget(short.schedule(settings, 1))
    short.check_budget(short.schedule(settings, 3))


def test_alpha_is_frozen_in_the_weights_only_phase(data, tmp_path):
    settings = tiny_settings(max_steps=8, eval_interval=1, checkpoint_interval=8)
    search(data, settings, tmp_path, method=DartsSettings(weights_only_fraction=0.5))
    steps = [json.loads(line) for line in (tmp_path / "search_log.jsonl").read_text().splitlines()]
    alpha_losses = [r["alpha_loss"] for r in steps if r["event"] == "step"]
    assert alpha_losses[:4] == [None] * 4 and all(loss is not None for loss in alpha_losses[4:])
    history = [json.loads(line) for line in (tmp_path / "alpha_history.jsonl").read_text().splitlines()]
    assert all(h["encoder"] == history[0]["encoder"] for h in history[:4])  # steps 1-4: alpha untouched
    assert history[4]["encoder"] != history[3]["encoder"]


def test_the_chunked_loss_gives_the_full_logits_gradients(data):
    _, theta, alpha = make_searcher(data)
    theta_batch, alpha_batch = theta.take()[0], alpha.take()[0]
    results = []
    for chunk_rows in (0, 7):
        searcher, _, _ = make_searcher(data, loss_chunk_rows=chunk_rows)
        searcher.model.eval()  # no dropout: the two losses see the same network
        loss = searcher._loss(searcher.model, theta_batch)
        grads = torch.autograd.grad(loss, [*searcher.weights, *searcher.arch], allow_unused=True)
        unrolled = unrolled_arch_gradients(
            searcher.model, searcher._loss, searcher.weight_names, searcher.arch_names, theta_batch, alpha_batch, 0.1
        )
        results.append([loss, *grads, unrolled[0], *unrolled[1]])
    for full, chunked in zip(*results, strict=True):
        if full is None:
            assert chunked is None
        else:
            torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-6)


def test_alpha_step_computes_no_weight_gradient_and_drops_nothing(data):
    searcher, theta, alpha = make_searcher(data)
    batch = alpha.take()[0]
    before = [p.detach().clone() for p in searcher.weights]
    state = torch.get_rng_state()
    searcher.alpha_optimizer.param_groups[0]["lr"] = 0.0  # the loss must not depend on the RNG: no dropout
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(searcher.alpha_step(batch))
    torch.set_rng_state(state)
    assert losses[0] == losses[1]
    assert all(p.grad is None and p.requires_grad for p in searcher.weights)
    assert all(torch.equal(a, b) for a, b in zip(before, searcher.weights))
    assert searcher.model.training  # back in training mode


def test_search_space_and_affine_free_normalisation(data, tmp_path):
    from mdarts.model import iter_nodes

    searcher = Searcher(CONFIG, data, tiny_settings(max_steps=3), tmp_path, progress=False)
    assert searcher.config.encoder_candidates == ("conv3", "attention", "ffn")  # zero and identity left out
    assert searcher.memory_reason.startswith(f"{CONFIG.memory_mode}: as asked")
    searcher.run()
    for node in iter_nodes(searcher.model):
        if node.parametric:  # no gain or bias learned while searching
            assert torch.equal(node.ln_weight, torch.ones_like(node.ln_weight))
            assert torch.equal(node.ln_bias, torch.zeros_like(node.ln_bias))
    kept = Searcher(CONFIG, data, tiny_settings(max_steps=3, parameter_free=True), tmp_path / "free", progress=False)
    assert kept.config.encoder_candidates == CONFIG.encoder_candidates


def test_auto_memory_mode_picks_the_fastest_that_fits(data, tmp_path):
    config = CONFIG.replace(memory_mode="auto")
    roomy = Searcher(config, data, tiny_settings(max_steps=2), tmp_path / "roomy", progress=False)
    assert roomy.config.memory_mode == "store" and "fits the budget" in roomy.memory_reason
    tight = Searcher(
        config, data, tiny_settings(max_steps=2, memory_budget_gb=1e-4), tmp_path / "tight", progress=False
    )
    assert tight.config.memory_mode == "reconstruct" and "no mode is predicted to fit" in tight.memory_reason
    roomy.run()
    start = [json.loads(line) for line in (tmp_path / "roomy" / "search_log.jsonl").read_text().splitlines()][0]
    assert start["memory_mode"] == roomy.memory_reason and start["config"]["memory_mode"] == "store"


def test_a_stable_genotype_stops_the_search(data, tmp_path):
    settings = tiny_settings(max_steps=40, eval_interval=1, stable_evals=2)
    result = search(data, settings, tmp_path, method=DartsSettings(alpha_lr=1e-9, weights_only_fraction=0.0))
    assert result.stopped_by == "stable" and result.steps == 3  # evaluations 1, 2, 3 agree: stable twice


def test_weight_sharing_search_ranks_random_paths(data, tmp_path):
    settings = tiny_settings(max_steps=3, method="single_path", select="ranked_paths")
    result = search(data, settings, tmp_path, selector=RankedPathsSettings(ranked_paths=4))
    records = [json.loads(line) for line in (tmp_path / "search_log.jsonl").read_text().splitlines()]
    ranking = [r for r in records if r["event"] == "ranking"]
    assert len(ranking) == 4 and not any(r["alpha_loss"] for r in records if r["event"] == "step")
    best = min(ranking, key=lambda r: r["val_loss"])
    assert result.details["genotype"].summary() == best["genotype"]
    assert Genotype.load(tmp_path / "genotype.json") == result.details["genotype"]
    # its alpha never moves: no argmax genotype, alpha history or heatmap is written as if chosen
    evals = [r for r in records if r["event"] == "eval"]
    assert evals and not any("genotype" in r or "argmax_stability" in r for r in evals)
    assert not (tmp_path / "alpha_history.jsonl").exists() and not (tmp_path / "alpha_heatmap.png").exists()


def test_a_minutes_budget_is_planned_in_steps(data, tmp_path, monkeypatch):
    """Timed on its first steps, a minutes budget gets a step plan (weights-only phase, warm-up,
    alpha_lr), re-fitted once the alternating steps have been timed; the run ends on time."""
    import mdarts.runloop as runs_module

    clock = iter(range(0, 1_000_000))  # every reading of the clock: one second later
    monkeypatch.setattr(runs_module, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    settings = tiny_settings(max_steps=None, max_minutes=1.5, eval_interval=100, checkpoint_interval=100)
    result = search(data, settings, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "search_log.jsonl").read_text().splitlines()]
    plans = [r for r in records if r["event"] == "schedule"]
    assert [r["step"] for r in plans][0] == 5 and len(plans) == 2
    first, refit = plans
    assert first["alpha_start"] == round(0.3 * first["steps"]) + 1 and refit["alpha_start"] == first["alpha_start"]
    travel = DartsSettings().alpha_travel
    assert refit["alpha_lr"] == pytest.approx(travel / (refit["steps"] - refit["alpha_start"] + 1))
    assert result.stopped_by in ("max_minutes", "max_steps")
    assert any(r["event"] == "step" and r["alpha_loss"] is not None for r in records)


def test_a_resume_with_another_minutes_budget_plans_it_again(data, tmp_path, monkeypatch):
    import mdarts.runloop as runs_module

    clock = iter(range(0, 1_000_000))
    monkeypatch.setattr(runs_module, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    settings = tiny_settings(max_steps=None, max_minutes=1.0, eval_interval=100, checkpoint_interval=100)
    first = search(data, settings, tmp_path)
    longer = search(data, settings.replace(max_minutes=3.0), tmp_path, resume=True)
    records = [json.loads(line) for line in (tmp_path / "search_log.jsonl").read_text().splitlines()]
    resumed_at = next(i for i, r in enumerate(records) if r["event"] == "resume")
    assert records[resumed_at - 1]["event"] == "schedule" and records[resumed_at - 1]["step"] == first.steps
    assert longer.steps > first.steps


# ----------------------------------------------------------------------------- progressive shrinking


def test_shrinking_keeps_the_best_candidates_and_computes_no_other(data):
    torch.manual_seed(0)
    model = Supernet(CONFIG.replace(dropout=0.0), 50)
    with torch.no_grad():
        for alpha in model.arch_parameters():
            alpha.copy_(torch.randn_like(alpha))
    best = [set(torch.topk(alpha.detach(), 2).indices.tolist()) for alpha in model.arch_parameters()]
    src, tgt = torch.randint(4, 50, (2, 7)), torch.randint(4, 50, (2, 6))
    model.shrink(2)
    assert [set(range(len(a))) - set(d) for a, d in zip(model.arch_parameters(), model.dropped)] == best
    for side in ("encoder", "decoder"):
        for layer in model.arch_weights()[side]:
            for node in layer:
                assert sum(w > 0 for w in node) == 2 and sum(node) == pytest.approx(1.0)
    nodes = [m for m in model.modules() if isinstance(m, Node) and m.alpha is not None]
    calls = []

    def record(node: int, candidate: int):
        return lambda module, args, out: calls.append((node, candidate))

    for n, node in enumerate(nodes):
        for j, op in enumerate(node.ops):
            op.register_forward_hook(record(n, node.parametric[j]))
    model(src, tgt).sum().backward()
    assert calls and all(candidate not in nodes[n].dropped for n, candidate in calls)
    for alpha, dropped in zip(model.arch_parameters(), model.dropped):
        assert alpha.grad[dropped].eq(0).all() and alpha.grad.ne(0).sum() >= 1
    # the same network as a supernet whose dropped logits are -inf
    reference = Supernet(CONFIG.replace(dropout=0.0), 50)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for alpha, dropped in zip(reference.arch_parameters(), model.dropped):
            alpha[dropped] = float("-inf")
    torch.testing.assert_close(model(src, tgt), reference(src, tgt))


def test_shrinking_happens_at_the_stage_boundaries_of_the_alpha_phase(data, tmp_path):
    schedule = Schedule(steps=100, warmup_steps=10, alpha_start=31, alpha_lr=0.01)
    darts = DartsSettings(shrink_to=(4, 2), weights_only_fraction=0.1)
    # 70 alpha steps (31..100) in 3 stages: boundaries after 23.3 and 46.7 of them
    assert [darts.shrinks_due(schedule, step) for step in (30, 53, 54, 76, 77, 100)] == [0, 0, 1, 1, 2, 2]
    settings = tiny_settings(max_steps=8, eval_interval=1)
    result = search(data, settings, tmp_path, method=darts)
    records = [json.loads(line) for line in (tmp_path / "search_log.jsonl").read_text().splitlines()]
    shrinks = [(r["step"], r["keep"]) for r in records if r["event"] == "shrink"]
    assert shrinks == [(4, 4), (6, 2)]
    history = [json.loads(line) for line in (tmp_path / "alpha_history.jsonl").read_text().splitlines()]
    for node in (n for side in ("encoder", "decoder") for layer in history[-1][side] for n in layer):
        assert sum(w > 0 for w in node) == 2
    assert result.steps == 8


def test_perturbation_keeps_the_op_whose_removal_hurts_the_trained_mixture_most(data, tmp_path):
    from mdarts.genotype import random_genotype
    from mdarts.search import selection_context
    from mdarts.search.perturbation import Perturbation, PerturbationSettings

    settings = tiny_settings(max_steps=6)
    searcher = Searcher(CONFIG, data, settings, tmp_path, progress=False)
    searcher.run()
    model, config = searcher.model, searcher.config
    context = selection_context(model, settings, data, searcher.device)
    selector = Perturbation(PerturbationSettings(perturbation_pairs=20))
    table = selector.effects(context)
    sides = ["encoder"] * len(model.alpha_encoder) + ["decoder"] * len(model.alpha_decoder)
    assert [sorted(node) for node in table] == [sorted(getattr(config, f"{s}_candidates")) for s in sides]
    assert all(model_dropped == [] for model_dropped in model.dropped)  # every removal undone
    batches = context.validation_batches(20)
    whole = context.loss(batches)
    model.dropped[-1].append(0)  # the last node without its first candidate, by hand
    try:
        by_hand = context.loss(batches) - whole
    finally:
        model.dropped[-1].clear()
    assert table[-1][config.decoder_candidates[0]] == pytest.approx(by_hand, abs=1e-9)
    assert len({round(v, 9) for node in table for v in node.values()}) > 1  # removals differ

    (chosen,) = selector.propose(context)
    flat = [op for side in ("encoder", "decoder") for layer in getattr(chosen, side) for op in layer]
    assert flat == [max(node, key=node.get) for node in table]
    others = [random_genotype(config, seed) for seed in range(3)]
    best, *rest = selector.score(context, [chosen, *others])
    assert best == pytest.approx(sum(max(node.values()) for node in table)) and all(best >= r for r in rest)


def test_evolution_breeds_new_genotypes_from_the_best_and_keeps_the_lowest_shared_weight_loss(data, tmp_path):
    from mdarts.search import selection_context
    from mdarts.search.evolution import Evolution, EvolutionSettings

    settings = tiny_settings(max_steps=2, method="single_path", select="evolution")
    evolution = EvolutionSettings(population=4, generations=3, parents=2, evolution_pairs=20)
    searcher = Searcher(CONFIG, data, settings, tmp_path, progress=False, selector=evolution)
    result = searcher.run()
    records = [json.loads(line) for line in (tmp_path / "search_log.jsonl").read_text().splitlines()]
    ranking = [r for r in records if r["event"] == "ranking"]
    assert len(ranking) == 12 and len({r["genotype"] for r in ranking}) == 12  # three populations, none twice
    assert result.details["genotype"].summary() == min(ranking, key=lambda r: r["val_loss"])["genotype"]

    context = selection_context(searcher.model, settings, data, searcher.device)
    selector = Evolution(evolution)
    scored = selector.propose(context)
    assert [g.summary() for g in scored] == [r["genotype"] for r in ranking]  # a function of the seed
    losses = selector.score(context, scored)
    assert losses == pytest.approx([r["val_loss"] for r in ranking], abs=1e-9)
    assert losses[7] == pytest.approx(context.path_loss(scored[7], context.validation_batches(20)), abs=1e-9)
    parents = sorted(scored[:4], key=lambda g: losses[scored.index(g)])[:2]
    nodes = lambda g: [op for side in ("encoder", "decoder") for layer in getattr(g, side) for op in layer]  # noqa: E731
    for child in scored[4:8]:  # each node of a child comes from a parent or from a mutation
        shared = max(sum(a == b for a, b in zip(nodes(child), nodes(p))) for p in parents)
        assert shared >= 1
    with pytest.raises(ValueError, match=r"mutation: expected a probability in \(0, 1\]"):
        EvolutionSettings(mutation=0.0)


def _sampled_loss_and_alpha_grads(model: Supernet, batch, tau: float, seed: int):
    from mdarts.loss import sequence_loss

    with model.sample_path(tau, torch.Generator().manual_seed(seed)) as path:
        loss = sequence_loss(model, batch.src, batch.tgt_in, batch.tgt_out, 0.1, 0, False)[0]
        grads = torch.autograd.grad(loss, model.arch_parameters())
    return path, loss.detach(), grads


@pytest.mark.parametrize("memory_mode", ["store", "reconstruct"])
def test_a_gumbel_sampled_path_computes_that_path_and_gives_alpha_the_straight_through_gradient(data, memory_mode):
    """GDAS's forward is the drawn single path (its gate is 1); the gradient of a node's logits
    is c * s_path * (e_path - s) / tau, s = softmax((alpha + g) / tau): parallel to e_path - s."""
    torch.manual_seed(0)
    model = Supernet(CONFIG.replace(dropout=0.0, memory_mode=memory_mode), data.tokenizer.vocab_size)
    with torch.no_grad():
        for alpha in model.arch_parameters():
            alpha.normal_()
    batch = make_searcher(data)[1].take()[0]
    path, loss, grads = _sampled_loss_and_alpha_grads(model, batch, 2.0, seed=7)
    assert "zero" not in path.summary()
    again, loss_again, _ = _sampled_loss_and_alpha_grads(model, batch, 2.0, seed=7)
    assert again.summary() == path.summary() and torch.equal(loss, loss_again)
    from mdarts.loss import sequence_loss

    with model.use_path(path):
        plain = sequence_loss(model, batch.src, batch.tgt_in, batch.tgt_out, 0.1, 0, False)[0].detach()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    config = model.config
    chosen = [config.encoder_candidates.index(op) for layer in path.encoder for op in layer]
    chosen += [config.decoder_candidates.index(op) for layer in path.decoder for op in layer]
    noises = torch.Generator().manual_seed(7)
    for alpha, grad, k in zip(model.arch_parameters(), grads, chosen, strict=True):
        noise = -torch.log(-torch.log(torch.rand(alpha.shape, generator=noises).clamp_min(1e-20)))
        direction = -torch.softmax((alpha.detach() + noise) / 2.0, dim=0)
        direction[k] += 1.0
        assert grad.abs().sum() > 0
        assert torch.allclose(grad, grad[k] / direction[k] * direction, atol=1e-6 * grad.abs().max().item())


def test_gdas_search_moves_alpha_resumes_exactly_and_refuses_what_it_cannot_do(data, tmp_path, monkeypatch):
    from mdarts.search import selection_context
    from mdarts.search.gdas import GdasSettings
    from mdarts.search.reselect import TrainedSupernet

    gdas = GdasSettings(weights_only_fraction=0.25)
    settings = tiny_settings(max_steps=8, method="gdas")
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    search(data, settings, straight, method=gdas)
    records = step_losses(straight)
    assert [a is None for _, _, a in records] == [True, True] + [False] * 6
    model = TrainedSupernet(straight, torch.device("cpu")).model
    final = load_checkpoint(straight / "search_checkpoint.pt", kind="search")
    valid = selection_context(model, settings, data, torch.device("cpu"))
    with model.use_path(model.genotype()):  # the search's validation loss is its argmax path's
        assert final["val_loss"] == pytest.approx(valid.loss(valid.validation_batches(10**9)), abs=1e-6)
    start = torch.zeros_like(saved_alphas(straight)[0])
    assert all(not torch.equal(a, start) for a in saved_alphas(straight))
    search_crashing_after_step(4, monkeypatch, data, settings, parted, method=gdas)
    search(data, settings, parted, resume=True, method=gdas)
    assert step_losses(parted) == records
    for a, b in zip(saved_alphas(parted), saved_alphas(straight), strict=True):
        assert torch.equal(a, b)
    for bad, field in (({"second_order": True}, "second_order"), ({"tau_min": 20.0}, "tau_min")):
        with pytest.raises(ValueError, match=f"GdasSettings.{field}: expected"):
            GdasSettings(**bad)


def test_a_parameter_cost_moves_alpha_towards_smaller_ops(data, tmp_path):
    from mdarts.search.darts import relative_op_sizes

    searcher, theta, alpha = make_searcher(data)
    sizes = relative_op_sizes(searcher.model)
    candidates = CONFIG.encoder_candidates
    first = sizes[0]
    assert first.mean().item() == pytest.approx(1.0)
    assert first[candidates.index("zero")] == 0 and first[candidates.index("identity")] == 0
    assert first[candidates.index("ffn")] > first[candidates.index("conv3")] > 0
    assert searcher.param_cost().item() == pytest.approx(1.0, abs=1e-2)  # near-uniform weights at the start

    costs = {}
    for weight in (0.0, 3.0):
        searcher, theta, alpha = make_searcher(data, DartsSettings(param_cost=weight, weights_only_fraction=0.0))
        for _ in range(4):
            searcher.alpha_step(alpha.take()[0])
        costs[weight] = searcher.param_cost().item()
    assert costs[3.0] < costs[0.0] - 0.01
    with pytest.raises(ValueError, match="param_cost: expected a non-negative"):
        DartsSettings(param_cost=-0.1)


@pytest.mark.parametrize(
    ("method", "select", "shows_arch"), [("darts", "argmax", True), ("single_path", "ranked_paths", False)]
)
def test_the_progress_bar_shows_the_argmax_genotype_only_where_alpha_learns(
    method, select, shows_arch, data, tmp_path, monkeypatch
):
    """A single-path supernet trains no alpha: an argmax of its untouched logits would read as
    the search's choice, so its bar shows the loss without it."""
    from mdarts.progress import Progress

    shown = []
    monkeypatch.setattr(Progress, "update", lambda self, tokens, loss, lr=None, **extra: shown.append(extra))
    settings = tiny_settings(max_steps=2, method=method, select=select)
    options = {"selector": RankedPathsSettings(ranked_paths=2)} if select == "ranked_paths" else {}
    search(data, settings, tmp_path, **options)
    assert len(shown) == 2
    assert all(("arch" in extra and "alpha_loss" in extra) == shows_arch for extra in shown)

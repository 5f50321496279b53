"""mdarts experiment: a whole comparison on a tiny budget, resumed without redoing finished
runs, and the errors of a bad specification file."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT

from mdarts.cli import main
from mdarts.config import preset
from mdarts.experiment import SEARCH_PARTS, Experiment, ExperimentSpec, retrained_means
from mdarts.genotype import Genotype, random_genotype
from mdarts.processes import device_name
from mdarts.report import SEARCHING_KINDS, mean_std, selector_lines, spearman, targets
from mdarts.search import searched_space
from mdarts.sizing import builder, count_parameters, sized_config

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {
    "name": "smoke",
    "pair": "en-de",
    "params": 120_000,
    "vocab_size": 200,
    "train_seeds": [1, 2],
    "random_finalists": 1,
    "train_preset": "tiny",
    "beam": 1,
    "limit": 20,
    "search": {
        "max_steps": 4,
        "max_minutes": None,
        "eval_interval": 2,
        "valid_interval": 2,
        "max_tokens": 512,
        "ranked_paths": 3,
        "device": "cpu",
    },
    "train": {
        "max_steps": 3,
        "valid_interval": 3,
        "max_tokens": 512,
        "warmup_steps": 2,
        "keep_last": 0,
        "device": "cpu",
    },
    "arms": [
        {"name": "DARTS", "kind": "searched", "seeds": [0]},
        {"name": "WS", "kind": "weight_sharing", "seeds": [0]},
        {"name": "random", "kind": "random", "count": 2},
        {"name": "control", "kind": "control"},
        {"name": "Transformer", "kind": "transformer"},
    ],
}


@pytest.fixture(scope="module")
def small_multi30k(multi30k_dir, tmp_path_factory):
    """The first 600 training, 40 validation and 20 test pairs of Multi30k En-De (and the test
    split's tokenised references), as a Multi30k data folder."""
    folder = tmp_path_factory.mktemp("experiment") / "multi30k"
    (folder / "tok").mkdir(parents=True)
    files = [f"{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr") for lang in ("en", "de")]
    for name in [*files, "tok/test_2016_flickr.lc.norm.tok.de.gz"]:
        count = {"train": 600, "val": 40}.get(name.split(".")[0], 20)
        with gzip.open(multi30k_dir / name, "rt", encoding="utf-8") as source:
            lines = [next(source) for _ in range(count)]
        with gzip.open(folder / name, "wt", encoding="utf-8") as target:
            target.writelines(lines)
    return folder


def experiment_argv(spec_path, out, data_dir) -> list[str]:
    spec_path.write_text(json.dumps(SPEC))
    return ["experiment", str(spec_path), "--out", str(out), "--data-dir", str(data_dir), "--device", "cpu"]


@pytest.fixture(scope="module")
def one_process_run(small_multi30k):
    """The experiment SPEC run by one process: (its directory, its command line)."""
    folder = small_multi30k.parent
    argv = experiment_argv(folder / "spec.json", folder / "one-process", small_multi30k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return folder / "one-process", argv


def test_an_experiment_runs_every_arm_at_equal_size_and_resumes(one_process_run, capsys):
    out, argv = one_process_run
    summary = json.loads((out / "summary.json").read_text())
    kinds = {arm["name"]: arm["kind"] for arm in summary["arms"]}
    assert kinds == {
        "DARTS": "searched",
        "WS": "weight_sharing",
        "random": "random",
        "control": "control",
        "Transformer": "transformer",
    }
    runs = {arm["name"]: arm["runs"] for arm in summary["arms"]}
    # finalists (all but random, and the best random genotype) train with both seeds
    assert [run["seed"] for run in runs["DARTS"]] == [1, 2] and [run["seed"] for run in runs["control"]] == [1, 2]
    assert sorted(run["seed"] for run in runs["random"]) == [1, 1, 2]
    every = [run for arm_runs in runs.values() for run in arm_runs]
    for run in every:
        assert set(run) >= {"seed", "bleu", "lc_bleu", "chrf", "params", "valid_loss", "minutes"}
        assert abs(run["params"] - SPEC["params"]) <= 0.02 * SPEC["params"]
        assert run["non_embedding_params"] < run["params"]
    # each record names the code that made it: this checkout's commit (+modified if its code differs)
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    )
    assert {run["code"].removesuffix("+modified") for run in every} == {head.stdout.strip()}
    assert {(run["device"], run["torch"]) for run in every} == {(device_name(torch.device("cpu")), torch.__version__)}
    cost = {arm["name"]: (arm["search_minutes"], arm["train_minutes"]) for arm in summary["arms"]}
    assert all(cost[name][1] == sum(run["minutes"] for run in runs[name]) > 0 for name in cost)  # every retrain
    assert cost["DARTS"][0] > 0 and cost["WS"][0] > 0 and cost["control"][0] == cost["random"][0] == 0
    table = (out / "table.md").read_text()
    assert table.count("| DARTS |") == 3  # the arm's line and its two runs
    assert "| core-hours: search + retrains |" in table
    assert "- DARTS >= median of random + 0.50 (training seed 1): mean " in table
    assert "- DARTS >= Transformer (every training seed): mean " in table
    assert (out / "bleu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()

    # run again: nothing is redone (records and translations keep their contents and times)
    def kept():
        return {
            p: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in [*out.rglob("record.json"), *out.rglob("translations/*/*")]
        }

    records = kept()
    assert main(argv) == 0
    assert kept() == records


def test_two_processes_share_an_experiment_and_get_what_one_process_gets(one_process_run, small_multi30k):
    reference, _ = one_process_run
    out = small_multi30k.parent / "two-processes"
    command = [
        sys.executable,
        "-m",
        "mdarts",
        *experiment_argv(small_multi30k.parent / "spec2.json", out, small_multi30k),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=900) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    started = [[line for line in err.splitlines() if line.startswith("experiment: ")] for _, err in outputs]
    assert all(started) and not set(started[0]) & set(started[1]), started  # both worked, never on one run
    # every network trained once, by one process: the same records and scores as one process
    assert timeless(out) == timeless(reference)


def timeless(out) -> dict:
    """The training records and the summary of the experiment in ``out``, without wall-clock minutes."""
    records = {str(path.parent.relative_to(out)): json.loads(path.read_text()) for path in out.rglob("record.json")}
    summary = json.loads((out / "summary.json").read_text())
    for record in [*records.values(), *(run for arm in summary["arms"] for run in arm["runs"])]:
        del record["minutes"]
    for arm in summary["arms"]:
        del arm["search_minutes"], arm["train_minutes"]
    return {"records": records, "summary": summary}


def test_what_is_committed_of_an_experiment_is_enough_to_report_it_again(one_process_run, tmp_path):
    """The directory without checkpoints, locks and report (what git keeps of it) gives the same
    report: finished runs keep their records and test translations, and are not redone."""
    out, argv = one_process_run
    copy = tmp_path / "clone"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.pt", "locks", "summary.json", "table.md", "bleu.png"))
    translations = sorted(copy.glob("translations/*/*.txt"))
    assert len(translations) == 11 and all(len(path.read_text().splitlines()) == SPEC["limit"] for path in translations)
    assert main([*argv[:3], str(copy), *argv[4:]]) == 0
    assert not list(copy.rglob("*.pt"))  # nothing trained again
    assert timeless(copy) == timeless(out)
    assert "BLEU (sacreBLEU, detokenised, cased): `nrefs:1" in (copy / "table.md").read_text()


def test_arms_added_to_a_finished_experiment_run_alone_and_join_its_report(one_process_run, tmp_path, capsys):
    """A specification with an arm added after the recorded ones continues the experiment: the
    finished runs are kept (not one record or translation rewritten), the new arm searches its
    own supernet (``search_network`` of the arm), and the report holds every arm. Any other
    change is refused, naming what differs, before anything is written."""
    from mdarts.checkpoint import load_checkpoint

    out, argv = one_process_run
    copy = tmp_path / "grown"
    shutil.copytree(out, copy)
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [*copy.rglob("record.json"), *copy.rglob("*.txt")]}
    new_arm = {"name": "GDAS", "kind": "searched", "method": "gdas", "select": "ranked_paths", "seeds": [0]}
    grown = {**SPEC, "arms": [*SPEC["arms"], {**new_arm, "search_network": "preset"}]}
    spec_path = tmp_path / "grown.json"
    spec_path.write_text(json.dumps(grown))
    assert main([argv[0], str(spec_path), "--out", str(copy), *argv[4:]]) == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept
    spec = ExperimentSpec.from_dict(grown)
    supernet = load_checkpoint(copy / "searches" / "GDAS" / "seed0" / "search_checkpoint.pt")["config"]
    tiny, wide = spec.search_model_config(spec.arms[-1]), spec.search_model_config(spec.arms[0])
    assert tiny == preset("tiny") and (supernet["d_model"], supernet["embed_dim"]) == (tiny.d_model, tiny.embed_dim)
    assert (wide.d_model, wide.embed_dim, wide.dropout) != (tiny.d_model, tiny.embed_dim, tiny.dropout)  # the rest
    summary = json.loads((copy / "summary.json").read_text())
    assert [arm["name"] for arm in summary["arms"]] == [*(arm["name"] for arm in SPEC["arms"]), "GDAS"]
    assert [run["seed"] for arm in summary["arms"] if arm["name"] == "GDAS" for run in arm["runs"]] == [1, 2]
    assert json.loads((copy / "spec.json").read_text()) == json.loads(json.dumps(spec.to_dict()))
    capsys.readouterr()

    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    for changed, named in [
        ({**grown, "params": 130_000}, "params differ"),
        ({**grown, "arms": [{**grown["arms"][0], "seeds": [1]}, *grown["arms"][1:]]}, "arms ('DARTS' changed) differ"),
        ({**grown, "arms": grown["arms"][:-2]}, "arms (some removed) differ"),
    ]:
        spec_path.write_text(json.dumps(changed))
        assert main([argv[0], str(spec_path), "--out", str(copy), *argv[4:]]) == 2
        err = capsys.readouterr().err
        assert f"holds an experiment with another specification ({copy / 'spec.json'}): {named}" in err
        assert "only arms added after the recorded ones continue it" in err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_each_search_scores_the_references_and_the_report_sets_them_against_their_retrains(
    one_process_run, small_multi30k, capsys
):
    """As a search ends, its own selector scores the genotypes no search chose (random and
    control) on its trained supernet; the report (and --status) gives, per search, Spearman's
    correlation of that score with minus their retrained validation loss."""
    from mdarts.prepare import prepare_data
    from mdarts.search.reselect import TrainedSupernet
    from mdarts.tokenizer import Tokenizer

    out, argv = one_process_run
    summary = json.loads((out / "summary.json").read_text())
    keys = ["random/g0", "random/g1", "control/control"]
    losses, widths = {}, {}
    for key in keys:
        arm, member = key.split("/")
        records = [json.loads(path.read_text()) for path in (out / "train" / arm).glob(f"{member}-seed*/record.json")]
        losses[key] = sum(r["valid_loss"] for r in records) / len(records)
        widths[key] = sum(r["d_model"] for r in records) / len(records)
    assert len(set(losses.values())) == 3
    # what benchmarks.selectors reads as well: the losses, and the widths of its --sized-width
    retrained, sized = retrained_means(out), retrained_means(out, "d_model")
    assert {key: retrained[tuple(key.split("/"))] for key in keys} == pytest.approx(losses)
    assert {key: sized[tuple(key.split("/"))] for key in keys} == pytest.approx(widths)
    expected = []
    for arm, selector in (("DARTS", "argmax"), ("WS", "ranked_paths")):
        run = out / "searches" / arm / "seed0"
        record = json.loads((run / "reference_scores.json").read_text())
        assert record["selector"] == selector and list(record["scores"]) == keys
        # the scores are the trained supernet's, scored again from the search's checkpoint
        trained = TrainedSupernet(run, torch.device("cpu"))
        data = prepare_data("en-de", ("val",), small_multi30k, tokenizer=Tokenizer(trained.tokenizer))
        genotypes = [Genotype.load(out / "genotypes" / f"{key.replace('/', '-')}.json") for key in keys]
        selector_part, scores = trained.score(selector, None, genotypes, data)
        assert scores == pytest.approx([record["scores"][key] for key in keys], rel=1e-6)
        assert record["higher_is_better"] == selector_part.higher_is_better
        # Spearman without ties: 1 - 6 sum d^2 / (n (n^2 - 1)), better score against lower loss
        better = [record["scores"][k] * (1 if record["higher_is_better"] else -1) for k in keys]
        assert len(set(better)) == 3
        by_score = {k: sorted(better).index(b) for k, b in zip(keys, better)}
        by_loss = {k: sorted(-losses[q] for q in keys).index(-losses[k]) for k in keys}
        rho = 1 - 6 * sum((by_score[k] - by_loss[k]) ** 2 for k in keys) / (3 * 8)
        expected.append({"arm": arm, "member": "seed0", "selector": selector, "spearman": rho, "references": 3})
    assert summary["selectors"][:2] == [{**row, "spearman": pytest.approx(row["spearman"])} for row in expected]
    # then the baseline that needs no search, the width each reference was sized to: these tiny
    # references all get one width, which orders nothing
    assert set(widths.values()) == {96.0}
    baseline = summary["selectors"][2]
    assert baseline == {**baseline, "arm": None, "selector": "sized_width", "references": 3}
    assert math.isnan(baseline["spearman"])
    table = (out / "table.md").read_text()
    assert "Each search's selector against the retrains of the 3 references" in table
    assert f"- WS seed0 (ranked_paths): {expected[1]['spearman']:+.2f}" in table
    assert "- no search, the width each was sized to (wider better; sized_width): none, every one" in table
    assert main([*argv, "--status"]) == 0
    assert f"- DARTS seed0 (argmax): {expected[0]['spearman']:+.2f}" in capsys.readouterr().out


def test_selector_lines_give_each_search_its_arm_mean_and_then_the_width_baseline():
    row = {"selector": "evolution", "references": 9}
    checks = [{**row, "arm": "WS", "member": f"seed{i}", "spearman": rho} for i, rho in enumerate((0.5, 0.7))]
    checks.append({"arm": None, "member": None, "selector": "sized_width", "spearman": 0.73, "references": 9})
    lines = selector_lines(checks)
    assert lines[0].startswith("Each search's selector against the retrains of the 9 references")
    assert lines[2:] == [
        "- WS seed0 (evolution): +0.50",
        "- WS seed1 (evolution): +0.70",
        f"- WS, over its 2 searches: {mean_std([0.5, 0.7])} (target +0.60: met)",
        "- no search, the width each was sized to (wider better; sized_width): +0.73",
    ]
    assert selector_lines(checks[:1])[-1] == "- WS, over its 1 searches: 0.50 (target +0.60: missed)"


def test_spearman_ranks_ties_by_their_mean_rank_and_orders_nothing_for_a_constant_list():
    assert spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    # ranks 1, 2.5, 2.5, 4 against 1, 3, 2, 4: covariance 4.5 over sqrt(4.5 * 5)
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_records_name_the_code_the_process_started_with(tmp_path, monkeypatch):
    # a commit made while an experiment runs moves the checkout, not the code already loaded
    monkeypatch.setattr("mdarts.experiment.code_version", lambda: "loaded")
    started = Experiment(ExperimentSpec.from_dict(SPEC), tmp_path / "out", device="cpu")
    monkeypatch.setattr("mdarts.experiment.code_version", lambda: "committed later")
    assert started.machine["code"] == "loaded"


def scored_arm(name, kind, *runs):
    """A summary's arm of ``runs`` given as (training seed, test BLEU)."""
    return {"name": name, "kind": kind, "runs": [{"seed": seed, "bleu": bleu} for seed, bleu in runs]}


def test_the_targets_compare_searched_with_random_at_the_first_seed_and_with_the_transformer_over_all():
    summary = {
        "train_seeds": [1, 2],
        "arms": [
            scored_arm("S", "searched", (1, 20.0), (1, 22.0), (2, 24.0)),
            scored_arm("R", "random", (1, 19.0), (1, 21.0), (1, 30.0), (2, 31.0)),  # the finalist's second seed
            scored_arm("T", "transformer", (1, 23.0), (2, 22.0)),
        ],
    }
    assert targets(summary) == [
        "Targets (test BLEU):",
        "",
        "- S >= median of R + 0.50 (training seed 1): mean 21.00 of 2 against median 21.00 of 3, +0.00: missed by 0.50",
        "- S >= T (every training seed): mean 22.00 of 3 runs against 22.50 of 2, -0.50: missed by 0.50",
    ]
    summary["arms"][0]["runs"][2]["bleu"] = 27.0
    summary["arms"][0]["runs"][0]["bleu"] = 21.0
    assert targets(summary)[2:] == [
        "- S >= median of R + 0.50 (training seed 1): mean 21.50 of 2 against median 21.00 of 3, +0.50: met",
        "- S >= T (every training seed): mean 23.33 of 3 runs against 22.50 of 2, +0.83: met",
    ]
    nothing_to_compare = {"train_seeds": [1], "arms": [scored_arm("T", "transformer", (1, 23.0))]}
    assert targets(nothing_to_compare) == []


def test_the_targets_judge_every_searching_arm_against_the_evolved_transformer_too():
    summary = {
        "train_seeds": [1, 2],
        "arms": [
            scored_arm("W", "weight_sharing", (1, 25.0), (2, 27.0)),
            scored_arm("R", "random", (1, 19.0), (1, 24.0), (1, 30.0)),
            scored_arm("E", "evolved", (1, 26.0), (2, 26.5)),
            scored_arm("C", "control", (1, 40.0)),  # not a searching arm: judged by nothing
        ],
    }
    assert targets(summary)[2:] == [
        "- W >= median of R + 0.50 (training seed 1): mean 25.00 of 1 against median 24.00 of 3, +1.00: met",
        "- W >= E (every training seed): mean 26.00 of 2 runs against 26.25 of 2, -0.25: missed by 0.25",
    ]
    assert set(SEARCHING_KINDS) == set(SEARCH_PARTS)  # the report judges exactly the arms that search


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pair": None}, "pair: missing"),
        ({"pair": "en-xx"}, "pair: expected one of"),
        ({"arms": [{"name": "x", "kind": "lottery"}]}, r"arms\[0\] \('x'\): needs a name and a kind"),
        ({"arms": [{"name": "x", "kind": "random"}, {"name": "x", "kind": "control"}]}, "two arms have this name"),
        ({"train": {"max_steps": 0}}, r"\[train\]: max_steps: expected a positive integer"),
        ({"search": {"max_minutes": -5}}, r"\[search\]: max_minutes: expected a positive"),
        ({"params": 0}, "params: expected a positive integer"),
        ({"colour": "red"}, "colour: unknown entry"),
        ({"search_network": "wide"}, "search_network: expected one of preset, retrain"),
        ({"embed_dim": 4}, r"embed_dim: expected 0 \(sizing chooses\) or a width of at least 8, got 4"),
        (
            {"embed_dim": 2000},
            r"params: embed_dim: at embedding width 2000 the narrowest network has .* \(the control network\)",
        ),
        (
            {"arms": [{"name": "x", "kind": "searched", "search_network": "wide"}]},
            r"arms\[0\] \('x'\): search_network: expected one of preset, retrain, got 'wide'",
        ),
        (
            {"arms": [{"name": "x", "kind": "control", "search_network": "retrain"}]},
            "method, select, settings and search_network belong to searching arms",
        ),
    ],
)
def test_a_bad_specification_names_the_entry_before_anything_runs(change, message, tmp_path):
    values = {**SPEC, **change}
    values = {key: value for key, value in values.items() if value is not None}
    with pytest.raises(ValueError, match=message):
        ExperimentSpec.from_dict(values)


def test_the_retrained_networks_supernet_has_their_settings_and_width():
    """search_network = "retrain", the default: the supernet of the searches is the retrain's op
    settings at the width sizing gives the control genotype; "preset" keeps the search preset's."""
    from mdarts.genotype import control_genotype
    from mdarts.sizing import sized_config

    tiny = ExperimentSpec.from_dict({**SPEC, "search_network": "preset"})
    assert tiny.to_dict()["search_network"] == "preset" and tiny.search_model_config() == preset("tiny")
    spec = ExperimentSpec.from_dict(SPEC)
    assert spec.to_dict()["search_network"] == "retrain"
    retrain, supernet = spec.model_config(), spec.search_model_config()
    sized = sized_config(control_genotype(retrain), retrain, SPEC["params"], SPEC["vocab_size"])
    assert (
        (supernet.d_model, supernet.embed_dim)
        == (sized.d_model, sized.embed_dim)
        != (retrain.d_model, retrain.embed_dim)
    )
    assert supernet.replace(d_model=retrain.d_model, embed_dim=retrain.embed_dim, memory_mode="store") == retrain
    assert supernet.memory_mode == "auto"


def test_a_fixed_embedding_width_sizes_the_reversible_networks_and_leaves_the_baselines(tmp_path):
    """embed_dim: every genotype's network (the supernet searched, the control, random and
    searched genotypes) at that embedding width, d_model taking the rest; the baselines are sized
    as always."""
    from mdarts.genotype import control_genotype

    arms = [{"name": "control", "kind": "control"}, {"name": "T", "kind": "transformer"}]
    values = {**SPEC, "params": 105_376, "arms": arms}
    plain, fixed = (ExperimentSpec.from_dict({**values, **e}) for e in ({}, {"embed_dim": 16}))
    assert plain.to_dict()["embed_dim"] == 0 and fixed.to_dict()["embed_dim"] == 16
    retrain = fixed.model_config()
    sized = sized_config(control_genotype(retrain), retrain, 105_376, SPEC["vocab_size"], embed_dim=16)
    assert (sized.d_model, sized.embed_dim) == (96, 16)
    supernet, plain_supernet = fixed.search_model_config(), plain.search_model_config()
    assert (supernet.d_model, supernet.embed_dim) == (96, 16) and plain_supernet.d_model < 96
    sizes = {}
    for spec in (plain, fixed):
        experiment = Experiment(spec, tmp_path / str(spec.embed_dim), device="cpu")
        sizes[spec.embed_dim] = {m.arm.kind: experiment._size(m)[1] for m in experiment.members}
    assert sizes[16]["control"] == sized and sizes[0]["control"].embed_dim != 16
    assert sizes[16]["transformer"] == sizes[0]["transformer"]
    random_arm = [{"name": "random", "kind": "random", "count": 1}]
    ExperimentSpec.from_dict({**values, "arms": random_arm, "embed_dim": 16})
    with pytest.raises(ValueError, match=r"embed_dim: at embedding width 900 .* \(the random g0 network\)"):
        ExperimentSpec.from_dict({**values, "arms": random_arm, "embed_dim": 900})  # g0 is sized at it


def test_status_says_what_is_done_running_and_left(one_process_run, tmp_path, capsys):
    from mdarts.files import exclusive

    out, argv = one_process_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    status = [*argv[:3], str(copy), *argv[4:], "--status"]
    assert main(status) == 0
    lines, table = capsys.readouterr().out.split("\n\n", 1)
    lines = lines.splitlines()
    assert len(lines) == 2 + 11 + 1 and all(": done, " in line for line in lines[:-1])  # 2 searches, 11 trainings
    assert lines[-1] == "13 of 13 runs done, 0 running"
    record = json.loads((copy / "train" / "control" / "control-seed2" / "record.json").read_text())
    row = (
        f"| control | control | 2 | {record['valid_loss']:.3f} | {record['params']:,} "
        f"({record['non_embedding_params']:,}) | d {record['d_model']}, e {record['embed_dim']} |"
    )
    assert sum(line.startswith("| ") and line.count("|") == 8 for line in table.splitlines()) == 1 + 11  # head, rows
    assert any(line.startswith(row) for line in table.splitlines())
    assert "| control | 2 | " in table  # the arm's two trainings, averaged
    (copy / "train" / "control" / "control-seed2" / "record.json").unlink()  # as if still training
    (copy / "train" / "random" / "g0-seed1" / "record.json").unlink()  # as if killed after a checkpoint
    with exclusive(copy / "locks" / "train--control--control-seed2.lock") as mine:
        assert mine
        assert main(status) == 0
    lines, table = capsys.readouterr().out.split("\n\n", 1)
    lines = lines.splitlines()
    assert "train  control/control seed 2: running in another process (step 3)" in lines
    assert "train  random/g0 seed 1: started, to continue (step 3)" in lines
    assert lines[-2].startswith("train  random finalist") and lines[-2].endswith("waits for other runs")
    # one running, one started, one waiting: three trainings left, timed at the finished ones' mean
    assert lines[-1].startswith("10 of 13 runs done, 1 running; 3 trainings left, about ")
    assert lines[-1].endswith(" hours of one process at their mean so far")
    assert "| control | 1 | " in table and "| random | g0 | 1 |" not in table  # only finished trainings
    assert main([*argv[:3], str(tmp_path / "none"), "--status"]) == 2
    assert "holds no experiment" in capsys.readouterr().err


def test_sizing_looks_on_both_sides_of_the_width_that_drops_the_embedding_projections():
    """Random genotype 5 of the En-De experiment: its count jumps over 2,349,568 at e = d
    (no d x e projections there), where the width search used to miss by more than 2%."""
    spec = ExperimentSpec.load(Path(__file__).parents[1] / "experiments" / "en-de.toml")
    genotype = random_genotype(searched_space(preset(spec.search_preset), False), 5)
    config = spec.model_config()
    build = builder(genotype, spec.vocab_size)

    sized = sized_config(genotype, config, spec.params, spec.vocab_size)
    assert abs(count_parameters(build, sized)[0] - spec.params) <= 0.02 * spec.params


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "experiments").glob("*.toml")), ids=lambda p: p.name
)
def test_the_committed_experiment_files_load(path):
    """Each file loads, and continues its committed experiment directory (the same
    specification as its spec.json, or arms added after the recorded ones)."""
    spec = ExperimentSpec.load(path)
    assert path.name.startswith(spec.pair) and spec.search_settings().max_steps and spec.train_config(1).max_steps
    recorded = REPO_ROOT / "results" / spec.name / "spec.json"
    if recorded.is_file():
        Experiment(spec, recorded.parent)  # raises when the specification does not continue it


def test_a_spec_json_older_than_an_entry_reads_as_what_it_ran(tmp_path):
    """A spec.json written before search_network and embed_dim existed searched the search
    preset's supernet and let sizing choose e: it reads so, and continues only that way."""
    searched = ExperimentSpec.from_dict({**SPEC, "search_network": "preset"})
    old = {key: value for key, value in searched.to_dict().items() if key not in ("search_network", "embed_dim")}
    (tmp_path / "spec.json").write_text(json.dumps(old))
    spec = ExperimentSpec.recorded(tmp_path / "spec.json")
    assert (spec.search_network, spec.embed_dim) == ("preset", 0)
    Experiment(searched, tmp_path)  # continues it
    with pytest.raises(ValueError, match="search_network differ"):
        Experiment(ExperimentSpec.from_dict(SPEC), tmp_path)  # today's default, "retrain", is another search

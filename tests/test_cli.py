"""The command line: help texts, bad options, and a tiny search -> derive -> train -> evaluate run."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import torch
from helpers import exit_status

from mdarts.cli import build_parser, main

COMMANDS = ("search", "derive", "train", "translate", "evaluate", "plan")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    actions = [a for a in build_parser()._subparsers._group_actions[0].choices[command]._actions if a.option_strings]
    for action in actions:  # every option has a help text
        assert action.help, f"{command} {action.option_strings} has no help"
        assert action.option_strings[-1] in text


def test_data_dir_has_one_help_text_in_every_command():
    commands = build_parser()._subparsers._group_actions[0].choices
    helps = {
        name: action.help
        for name, parser in commands.items()
        for action in parser._actions
        if "--data-dir" in action.option_strings
    }
    assert sorted(helps) == ["derive", "evaluate", "experiment", "search", "train"]
    assert len(set(helps.values())) == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["search", "--preset", "huge", "--out", "x"], "invalid choice: 'huge' (choose from 'tiny', 'small', 'paper')"),
        (["search", "--out", "x", "--max-steps", "0"], "--max-steps: expected a positive integer, got 0"),
        (["search", "--out", "x", "--max-minutes", "-1"], "--max-minutes: expected a positive finite number"),
        (["search", "--out", "x", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["search", "--out", "x", "--memory-mode", "fast"], "invalid choice: 'fast'"),
        (
            ["search", "--out", "x", "--method", "enas"],
            "invalid choice: 'enas' (choose from 'darts', 'single_path', 'gdas')",
        ),
        (
            ["search", "--out", "x", "--select", "best"],
            "invalid choice: 'best' (choose from 'argmax', 'evolution', 'perturbation', 'ranked_paths')",
        ),
        (
            ["derive", "x", "--select", "best"],
            "invalid choice: 'best' (choose from 'argmax', 'evolution', 'perturbation', 'ranked_paths')",
        ),
        (
            ["search", "--out", "x", "--method", "single_path"],
            "--select argmax reads the architecture logits, which --method single_path does not train",
        ),
        (
            ["search", "--out", "x", "--method", "single_path", "--select", "ranked_paths", "--shrink-to", "3"],
            "--shrink-to is a setting of method darts, not of single_path",
        ),
        (["train", "--arch", "transformer", "--out", "x", "--pair", "en-xx"], "invalid choice: 'en-xx'"),
        (
            ["train", "--arch", "transformer", "--out", "x", "--max-steps", "5", "--betas", "0.9", "1.5"],
            "--betas: expected two numbers in [0, 1)",
        ),
    ],
)
def test_bad_options_are_rejected_with_a_message(argv, message, capsys):
    """Caught by the parser (SystemExit) or by the settings' checks (status returned): exit status 2 either way."""
    assert exit_status(argv) == 2
    assert message in capsys.readouterr().err


def test_plan_prints_each_mode_and_the_largest_d(capsys):
    assert main(["plan", "--preset", "tiny", "--tokens", "1024", "--budget-gb", "2"]) == 0
    text = capsys.readouterr().out
    assert "reconstruct" in text and "store" in text and "checkpoint" in text
    assert main(["plan", "--d-model", "100"]) == 2
    assert "ModelConfig" in capsys.readouterr().err


def test_user_errors_print_one_line(tmp_path, capsys):
    assert main(["derive", str(tmp_path / "nothing")]) == 2
    assert "genotype file not found" in capsys.readouterr().err
    assert main(["train", "--arch", "transformer", "--out", str(tmp_path / "run"), "--pair", "en-de"]) == 2
    assert "give a budget" in capsys.readouterr().err


def write_slice(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def small_corpus(multi30k_dir, tmp_path_factory):
    """300 training and 30 validation pairs of En-De as generic parallel files."""
    folder = tmp_path_factory.mktemp("corpus")
    files = {}
    for split, count in (("train", 300), ("val", 30)):
        for lang in ("en", "de"):
            with gzip.open(multi30k_dir / f"{split}.{lang}.gz", "rt", encoding="utf-8") as handle:
                lines = [next(handle).rstrip("\n") for _ in range(count)]
            files[split, lang] = folder / f"{split}.{lang}.gz"
            write_slice(files[split, lang], lines)
    return files


def corpus_args(files, tmp_path):
    return [
        "--train-src",
        str(files["train", "en"]),
        "--train-tgt",
        str(files["train", "de"]),
        "--valid-src",
        str(files["val", "en"]),
        "--valid-tgt",
        str(files["val", "de"]),
        "--vocab-size",
        "200",
        "--tokenizer-cache",
        str(tmp_path / "spm"),
        "--device",
        "cpu",
    ]


@pytest.mark.usefixtures("one_thread")
def test_search_derive_train_translate_end_to_end(small_corpus, tmp_path, capsys):
    run = tmp_path / "search"
    argv = [
        "search",
        "--out",
        str(run),
        "--max-steps",
        "2",
        "--eval-interval",
        "1",
        "--max-tokens",
        "512",
        *corpus_args(small_corpus, tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "searched 2 steps" in out and "peak memory" in out and "encoder:" in out
    assert (run / "genotype.json").is_file() and (run / "alpha_heatmap.png").is_file()

    assert main(argv) == 2  # the run directory holds a run: refused, nothing overwritten
    assert "holds another search run" in capsys.readouterr().err

    assert main(["derive", str(run)]) == 0
    derived = capsys.readouterr().out
    assert derived.startswith("encoder: [") and "weight" in derived and "x uniform" in derived
    for line in (line for line in derived.splitlines() if "x uniform 1/" in line):  # a node: its op, then the next
        top, runner_up = (float(word) for word in re.findall(r"(?:weight|next \S+) ([0-9.]+) ", line))
        assert 0 < runner_up <= top
    assert main(["derive", str(run), str(run / "genotype.json")]) == 0  # two runs: the nodes they agree on
    nodes = derived.count("x uniform 1/")
    assert capsys.readouterr().out.endswith(f"the 2 genotypes agree on {nodes} of {nodes} nodes\n")
    assert main(["derive", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "mdarts-genotype-1"

    train_dir = tmp_path / "train"
    train = [
        "train",
        "--arch",
        str(run / "genotype.json"),
        "--preset",
        "tiny",
        "--out",
        str(train_dir),
        "--max-steps",
        "3",
        "--warmup-steps",
        "2",
        "--valid-interval",
        "3",
        "--max-tokens",
        "512",
        *corpus_args(small_corpus, tmp_path),
    ]
    assert main(train) == 0
    checkpoint = train_dir / "checkpoint_last.pt"
    assert checkpoint.is_file()
    capsys.readouterr()

    source = tmp_path / "source.txt"
    source.write_text("A man rides a bike.\nTwo dogs play in the snow.\n")
    assert (
        main(["translate", "--checkpoint", str(checkpoint), "--input", str(source), "--beam", "2", "--device", "cpu"])
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.usefixtures("one_thread")
def test_derive_chooses_again_and_scores_genotypes_with_any_selector(small_corpus, tmp_path, capsys):
    """A finished DARTS search, chosen again by ranked paths from its checkpoint (no search), and
    scored by argmax: its own genotype has the highest log-probability under softmax(alpha)."""
    from mdarts.genotype import Genotype, random_genotype
    from mdarts.search.reselect import TrainedSupernet

    run = tmp_path / "search"
    common = ["--max-steps", "4", "--eval-interval", "2", "--max-tokens", "512", *corpus_args(small_corpus, tmp_path)]
    assert main(["search", "--out", str(run), *common]) == 0
    capsys.readouterr()
    data = corpus_args(small_corpus, tmp_path)[4:]  # the validation files, vocabulary and device
    assert main(["derive", str(run), "--select", "ranked_paths", "--ranked-paths", "3", *data]) == 0
    chosen = Genotype.load(run / "genotype-ranked_paths.json")
    scores = [json.loads(line) for line in (run / "selection-ranked_paths.jsonl").read_text().splitlines()]
    assert len(scores) == 3 and chosen.summary() == min(scores, key=lambda r: r["val_loss"])["genotype"]
    assert capsys.readouterr().out.startswith(chosen.summary())

    config = TrainedSupernet(run, torch.device("cpu")).config
    others = [tmp_path / f"g{i}.json" for i in range(3)]
    for i, path in enumerate(others):
        random_genotype(config, i).save(path)
    assert (
        main(["derive", str(run), "--select", "argmax", "--score", str(run / "genotype.json"), *map(str, others)]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "argmax log_prob (higher is better) of 4 genotypes:"
    values = [float(line.split()[0]) for line in lines[1:]]
    assert len(values) == 4 and all(v < 0 for v in values) and values[0] == max(values)

    ws = tmp_path / "ws"
    assert main(["search", "--out", str(ws), "--method", "single_path", "--select", "ranked_paths", *common]) == 0
    capsys.readouterr()
    assert main(["derive", str(ws), "--select", "argmax"]) == 2
    assert "--select argmax reads the architecture logits, which --method single_path does not train" in (
        capsys.readouterr().err
    )


@pytest.mark.usefixtures("one_thread")
def test_the_evolved_transformer_trains_resumes_and_translates(small_corpus, tmp_path, capsys):
    """--arch evolved does what --arch transformer does: sized by --params, trained, resumed
    to a larger budget, and used by translate."""
    run = tmp_path / "evolved"
    common = ["--arch", "evolved", "--params", "60000", "--preset", "tiny", "--out", str(run), "--warmup-steps", "2"]
    common += ["--valid-interval", "2", "--max-tokens", "512", *corpus_args(small_corpus, tmp_path)]
    assert main(["train", *common, "--max-steps", "2"]) == 0
    first = capsys.readouterr()
    assert "EvolvedTransformer:" in first.err and "parameters" in first.err
    assert main(["train", *common, "--max-steps", "4", "--resume"]) == 0
    assert "steps: 4" in capsys.readouterr().out
    source = tmp_path / "source.txt"
    source.write_text("A man rides a bike.\n\nTwo dogs play.\n")
    checkpoint = str(run / "checkpoint_best.pt")
    translate = ["translate", "--checkpoint", checkpoint, "--input", str(source), "--beam", "2", "--device", "cpu"]
    assert main(translate) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""  # an empty line stays empty

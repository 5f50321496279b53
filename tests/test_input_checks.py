"""Input is checked before anything runs: an experiment specification entry by entry (type,
range, presets, the pair's splits, a reachable size), every numeric option of every command
(its range declared where it is declared), and the bounds that keep every request answering
(beam, plan depth and width, the sized parameter count, the batch size)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import typing

import pytest
from helpers import TINY, exit_status, head, short_training

from mdarts.arguments import build_settings
from mdarts.cli import build_parser, main
from mdarts.config import ModelConfig, SearchSettings, SettingError, TrainConfig
from mdarts.experiment import ExperimentSpec
from mdarts.prepare import EncodedSplit, PreparedData
from mdarts.search import METHODS, SELECTORS
from mdarts.sizing import builder, size_range, sized_config
from mdarts.train import Trainer
from mdarts.translate import MAX_BEAM, translate

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {
    "name": "checks",
    "pair": "en-de",
    "params": 120_000,
    "vocab_size": 200,
    "train_preset": "tiny",
    "search": {"max_steps": 4, "max_minutes": None},
    "train": {"max_steps": 3},
    "arms": [{"name": "DARTS", "kind": "searched"}, {"name": "Transformer", "kind": "transformer"}],
}

ARM_X = r"arms\[0\] \('x'\): "


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"max_steps": 3, "colour": 1}}, r"\[train\]: colour: not a setting of TrainConfig"),
        ({"search": {"colour": 1}}, r"\[search\]: colour: not a setting of a search"),
        ({"search": [1, 2]}, r"search: expected a table of search settings, got \[1, 2\]"),
        ({"train": {"max_steps": 3, "lr": "big"}}, r"\[train\]: lr: expected a number, got 'big'"),
        ({"train": {"max_steps": 3, "bf16": "no"}}, r"\[train\]: bf16: expected true or false, got 'no'"),
        ({"train": {"max_steps": 3, "betas": 0.9}}, r"\[train\]: betas: expected a list of 2 numbers, got 0.9"),
        ({"train": {"max_steps": 3, "max_tokens": 10**9}}, r"\[train\]: max_tokens: expected an integer from 1 to"),
        ({"params": "100"}, "params: expected a positive integer, got '100'"),
        ({"limit": -5}, r"limit: expected an integer >= 0 \(0: the whole split\), got -5"),
        ({"beam": 1000}, f"beam: expected an integer from 1 to {MAX_BEAM}, got 1000"),
        ({"vocab_size": 10**9}, "vocab_size: expected an integer from 5 to 262,144"),
        ({"train_preset": "huge"}, "train_preset: expected one of multi30k-base, tiny, small, paper, got 'huge'"),
        ({"search_preset": "huge"}, "search_preset: expected one of tiny, small, paper, got 'huge'"),
        ({"pair": "en-cs", "split": "test_2017_mscoco"}, "split: expected a split of en-cs: train, val, test_2016"),
        ({"name": ""}, "name: expected a non-empty string"),
        ({"train_seeds": 3}, "train_seeds: expected a list of 1 to 100 distinct integers"),
        ({"train_seeds": [1, 1]}, "train_seeds: expected a list of 1 to 100 distinct integers"),
        ({"arms": {"name": "x"}}, r"arms: expected a list of 1 to 100 \[\[arms\]\] tables"),
        ({"arms": ["x"]}, r"arms\[0\] \('\?'\): expected a table with a name and a kind"),
        ({"arms": [{"name": "x", "kind": "searched", "seeds": 3}]}, ARM_X + "seeds: expected a list"),
        ({"arms": [{"name": "x", "kind": "random", "count": "3"}]}, ARM_X + "count: expected an integer from 1 to 100"),
        ({"arms": [{"name": "x", "kind": "searched", "settings": [1]}]}, ARM_X + "settings: expected a table"),
        (  # the searched arm's supernet (the retrain's control genotype, by default) is sized first
            {"params": 1},
            r"params: 1 is outside the parameter counts a genotype reaches at depth 2\+2 .*\(the control network\)$",
        ),
        (
            {"params": 1, "search_network": "preset"},
            r"params: 1 is outside the parameter counts transformer reaches at depth 2\+2 .*: [\d,]+ \(",
        ),
        ({"params": 10**11}, r"params: 100,000,000,000 is outside .* \(d_model 2048, the widest sized\)"),
    ],
)
def test_every_entry_of_a_specification_is_checked_before_anything_runs(change, message):
    with pytest.raises(ValueError, match=f"^spec.toml: {message}"):
        ExperimentSpec.from_dict({**SPEC, **change}, "spec.toml")


def test_a_specification_that_is_no_table_is_refused():
    with pytest.raises(ValueError, match="spec.json: the file: expected a table of entries, got list"):
        ExperimentSpec.from_dict([SPEC], "spec.json")


def toml_spec(path, **tables) -> None:
    """Write SPEC as TOML to ``path`` with ``tables`` (name -> lines) in place of its tables."""
    arms = "".join(f'[[arms]]\nname = "{arm["name"]}"\nkind = "{arm["kind"]}"\n' for arm in SPEC["arms"])
    tops = {"search": ["max_steps = 4"], "train": ["max_steps = 3"], **tables}
    lines = [f"{key} = {json.dumps(value)}" for key, value in SPEC.items() if isinstance(value, (str, int))]
    for name, body in tops.items():
        lines += [f"[{name}]", *body]
    path.write_text("\n".join(lines) + "\n" + arms)


def multi30k_folder(root, splits):
    """A Multi30k folder holding the first 5 pairs of ``splits`` of En-De."""
    root.mkdir()
    for split in splits:
        for lang in ("en", "de"):
            with gzip.open(root / f"{split}.{lang}.gz", "wt", encoding="utf-8") as handle:
                handle.write("".join(f"a {split} sentence {i}\n" for i in range(5)))
    return root


@pytest.mark.parametrize(
    "tables, message",
    [
        ({"train": ["max_steps = 3", "colour = 1"]}, "[train]: colour: not a setting of TrainConfig"),
        ({"train": ["max_steps = 3", 'lr = "big"']}, "[train]: lr: expected a number, got 'big'"),
        ({"train": ["max_steps = [3]"]}, "[train]: max_steps: expected an integer or none, got [3]"),
    ],
)
def test_the_experiment_command_refuses_a_bad_specification_in_one_line_and_writes_nothing(
    tables, message, tmp_path, capsys
):
    spec = tmp_path / "spec.toml"
    toml_spec(spec, **tables)
    out = tmp_path / "out"
    assert main(["experiment", str(spec), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_missing_split_is_found_before_spec_json_is_written(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    toml_spec(spec)
    data = multi30k_folder(tmp_path / "multi30k", ("train", "val"))  # no test_2016_flickr
    argv = ["experiment", str(spec), "--out", str(tmp_path / "out"), "--data-dir", str(data), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing file" in err and "test_2016_flickr.en.gz" in err
    assert not (tmp_path / "out" / "spec.json").exists()  # so a corrected specification is not "another" one


# ----------------------------------------------------------------------------- options


def settings_classes() -> list[type]:
    return [ModelConfig, TrainConfig, SearchSettings, *(p.Settings for r in (METHODS, SELECTORS) for p in r.classes())]


def checked_converter(kind) -> bool:
    """Whether an option's argparse ``type`` is one of mdarts.arguments' range-checked ones."""
    return getattr(kind, "__qualname__", "").startswith(("integer.", "number."))


def test_every_numeric_option_of_every_command_has_a_range():
    """An option typed plain int or float must be a settings field (its dataclass checks the
    range); every other numeric option declares its range with arguments.integer / number."""
    fields = {f.name for cls in settings_classes() for f in dataclasses.fields(cls)}
    unchecked = []
    for name, parser in build_parser()._subparsers._group_actions[0].choices.items():
        for action in parser._actions:
            if action.type in (int, float) and action.dest not in fields:
                unchecked.append(f"{name} {action.option_strings[0]}")
    assert unchecked == []


def numeric_fields() -> list:
    """(settings class, field, a negative value of the field's shape) of every numeric option."""
    fields = []
    for cls in settings_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = (hints[f.name], *typing.get_args(hints[f.name]))
            if f.metadata.get("cli") and any(t in (int, float) for t in kinds):
                negative = [-5] * (len(f.default) or 1) if isinstance(f.default, tuple) else -5
                fields.append(pytest.param(cls, f.name, negative, id=f"{cls.__name__}.{f.name}"))
    return fields


@pytest.mark.parametrize("cls, name, negative", numeric_fields())
def test_every_numeric_setting_refuses_a_negative_value_and_a_string(cls, name, negative):
    budget = {"max_steps": 5} if cls in (TrainConfig, SearchSettings) and name != "max_steps" else {}
    with pytest.raises(SettingError) as error:
        cls(**budget, **{name: negative})
    assert error.value.field == name
    with pytest.raises(ValueError, match=f"^--{name.replace('_', '-')}: expected"):
        build_settings(cls, {**budget, name: "5"})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["translate", "--checkpoint", "c.pt", "--beam", "1000"], "argument --beam: expected an integer from 1 to 64"),
        (["translate", "--checkpoint", "c.pt", "--len-penalty", "nan"], "argument --len-penalty: expected a finite"),
        (
            ["translate", "--checkpoint", "c.pt", "--source-tokens", "0"],
            "argument --source-tokens: expected an integer",
        ),
        (["evaluate", "--checkpoint", "c.pt", "--limit", "-5"], "argument --limit: expected an integer >= 1, got -5"),
        (["train", "--arch", "transformer", "--out", "x", "--valid-bleu", "-1"], "argument --valid-bleu: expected"),
        (["train", "--arch", "transformer", "--out", "x", "--max-steps", "5", "--seed", "-1"], "--seed: expected"),
        (["train", "--arch", "transformer", "--out", "x", "--max-steps", "5", "--max-tokens", "9999999"], "1,048,576"),
        (["search", "--out", "x", "--vocab-size", "2"], "argument --vocab-size: expected an integer from 5 to 262,144"),
        (["experiment", "s.toml", "--out", "x", "--max-minutes", "inf"], "argument --max-minutes: expected a positive"),
        (["plan", "--layers", "1000"], "argument --layers: expected an integer from 1 to 24, got 1,000"),
        (["plan", "--d-model", "100000"], "argument --d-model: expected an integer from 1 to 16,384"),
        (["plan", "--chunk-rows", "-1"], "argument --chunk-rows: expected an integer from 0 to"),
        (["plan", "--seq-len", "1000"], "seq_len: expected an integer from 1 to max_positions 128, got 1000"),
        (["plan", "--budget-gb", "nan"], "argument --budget-gb: expected a positive finite number"),
    ],
)
def test_an_option_out_of_its_range_is_refused_naming_it(argv, message, capsys):
    assert exit_status(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("params", ["1", "100000000000"])
def test_a_parameter_count_no_network_reaches_is_refused_before_the_data(params, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--arch", "transformer", "--out", str(out), "--pair", "en-de", "--max-steps", "5"]
    assert main([*argv, "--data-dir", str(tmp_path / "nowhere"), "--params", params]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--params: {int(params):,} is outside the parameter counts transformer reaches at depth 4+4" in err
    assert not out.exists()


def test_the_size_range_is_what_sizing_reaches():
    low, high = size_range("transformer", TINY, 500)
    count = builder("transformer", 500)
    for target in (low, high):
        config = sized_config("transformer", TINY, target, 500)
        assert abs(count(config).num_parameters() - target) <= 0.02 * target
    with pytest.raises(ValueError, match="is outside"):
        sized_config("transformer", TINY, int(high * 1.03), 500)


def test_the_memory_mode_help_gives_the_presets_default():
    search = build_parser()._subparsers._group_actions[0].choices["search"]
    (action,) = [a for a in search._actions if "--memory-mode" in a.option_strings]
    assert action.help.endswith("(default auto in every preset)")  # not ModelConfig's own, reconstruct


def test_a_beam_wider_than_the_cap_is_refused(multi30k_corpus):
    model = builder("transformer", multi30k_corpus.tokenizer.vocab_size)(TINY)
    with pytest.raises(ValueError, match=f"beam_size: expected an integer from 1 to {MAX_BEAM}, got {MAX_BEAM + 1}"):
        translate(model, [[5, 6, 7]], beam_size=MAX_BEAM + 1)


def test_validation_data_that_makes_no_batch_is_refused_before_the_first_update(multi30k_corpus, tmp_path):
    """Every validation pair longer than max_positions: refused when the trainer is built, not
    at the first validation (after valid_interval updates), and the run directory stays empty."""
    val = head(multi30k_corpus["val"], 4)
    long = [ids * 40 for ids in val.src_ids]  # far over TINY's 32 positions
    data = PreparedData(
        multi30k_corpus.tokenizer,
        {"train": head(multi30k_corpus["train"], 200), "val": EncodedSplit(val.corpus, long, long)},
        "en",
        "de",
    )
    build = builder("transformer", multi30k_corpus.tokenizer.vocab_size)
    with pytest.raises(ValueError, match="--max-tokens: none of the 4 validation pair.s. fits .* makes no batch"):
        Trainer(lambda: build(TINY), data, short_training(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())

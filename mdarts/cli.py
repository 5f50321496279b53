"""The ``mdarts`` command line: search, derive, train, translate, evaluate, plan.

Every subcommand explains its options with ``--help``. Errors a user can fix (a missing
file, a bad option value, a run directory that holds another run...) print one line naming
what is wrong and exit with status 2; set ``MDARTS_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from .arguments import add_settings, build_settings, given, integer, number
from .config import (
    MAX_TOKENS,
    MODEL_PRESETS,
    SEARCH_PRESETS,
    TRAIN_PRESETS,
    ModelConfig,
    SearchSettings,
    TrainConfig,
    preset,
    search_preset,
)
from .data import PAIRS, SPLIT_LANGUAGES
from .files import RunDirectory
from .plan import MAX_D_MODEL as PLAN_MAX_D_MODEL
from .plan import MAX_LAYERS as PLAN_MAX_LAYERS
from .runloop import SIGNAL_NAMES
from .tokenizer import MAX_VOCAB, MIN_VOCAB
from .translate import MAX_BEAM


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")


def _add_data_dir(parser) -> None:
    """Declare ``--data-dir`` on ``parser`` (a parser or an argument group), the one help text
    of every command; :func:`mdarts.data.resolve_data_dir` resolves it."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="folder of the raw Multi30k files ({split}.{lang}.gz); default $MDARTS_DATA, "
        "else a download into the cache",
    )


def _add_data(parser: argparse.ArgumentParser, splits: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--pair", choices=PAIRS, help="Multi30k translation direction, e.g. en-de")
    _add_data_dir(group)
    group.add_argument(
        "--vocab-size",
        type=integer(MIN_VOCAB, MAX_VOCAB),
        default=8000,
        help=f"joint SentencePiece vocabulary size, {MIN_VOCAB} to {MAX_VOCAB:,} (default 8000)",
    )
    group.add_argument(
        "--tokenizer-cache", type=Path, help="folder of cached SentencePiece models (default ~/.cache/mdarts/spm)"
    )
    for split in splits.split():
        group.add_argument(f"--{split}-src", type=Path, help=f"generic corpus: {split} source file (instead of --pair)")
        group.add_argument(f"--{split}-tgt", type=Path, help=f"generic corpus: {split} target file")


def _prepared(args: argparse.Namespace, splits: tuple[str, ...], tokenizer=None):
    from .prepare import FileCorpus, prepare_data

    files = {}
    for split in ("train", "valid", "test"):
        src, tgt = getattr(args, f"{split}_src", None), getattr(args, f"{split}_tgt", None)
        if (src is None) != (tgt is None):
            raise ValueError(f"--{split}-src and --{split}-tgt go together; give both or neither")
        if src is not None:
            files["val" if split == "valid" else split] = (src, tgt)
    if files and args.pair:
        raise ValueError("give either --pair (Multi30k) or --train-src/--train-tgt... (generic files), not both")
    if not files and not args.pair:
        raise ValueError("--pair is required (or generic files with --train-src/--train-tgt)")
    return prepare_data(
        pair=args.pair,
        splits=splits,
        data_dir=args.data_dir,
        files=FileCorpus(files) if files else None,
        vocab_size=args.vocab_size,
        tokenizer_cache=args.tokenizer_cache,
        tokenizer=tokenizer,
    )


def _command(sub, run) -> argparse.ArgumentParser:
    """The parser of the subcommand ``run`` (``_run_<name>(args) -> exit status``) carries out:
    the first line of run's docstring is its help, the rest its description."""
    summary, _, details = inspect.cleandoc(run.__doc__).partition("\n\n")
    help_text = summary[0].lower() + summary[1:].rstrip(".")
    parser = sub.add_parser(run.__name__.removeprefix("_run_"), help=help_text, description=" ".join(details.split()))
    parser.set_defaults(func=run)
    return parser


# --------------------------------------------------------------------------- search / derive


def _search_parser(sub) -> None:
    from .search import METHODS, SELECTORS

    parser = _command(sub, _run_search)
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=list(MODEL_PRESETS),
        help="supernet size and search settings (default tiny: ~10 minutes on 2 CPU cores)",
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory (refused if it holds another run)")
    _add_run_control(parser)
    add_settings(parser, ModelConfig, "supernet", defaults=MODEL_PRESETS, only=("memory_mode",))  # each preset's
    add_settings(parser, SearchSettings, "search settings", defaults=SEARCH_PRESETS)
    _add_part_settings(parser, METHODS, SELECTORS)
    _add_data(parser, "train valid")


def _add_part_settings(parser: argparse.ArgumentParser, *registries) -> None:
    """The options of every registered part of ``registries`` (one group a part; a setting that a
    part shares with an earlier one, e.g. by subclassing its settings, is declared once, there),
    and the registered names as the choices of ``--method`` and ``--select``."""
    declared: dict[str, str] = {}
    for registry in registries:
        for part in registry.classes():
            names = [f.name for f in dataclasses.fields(part.Settings)]
            shared = sorted({declared[name] for name in names if name in declared})
            title = f"{registry.kind} {part.name} ({registry.option} {part.name})"
            title += f"; also takes the options of {', '.join(shared)}" if shared else ""
            add_settings(parser, part.Settings, title, only=[name for name in names if name not in declared])
            declared.update({name: part.name for name in names if name not in declared})
        for action in parser._actions:
            if action.option_strings == [registry.option]:
                action.choices = registry.names()


def _part_values(args: argparse.Namespace, method: str, select: str, *, search: bool = True):
    """The options given for SearchSettings (when ``search``), the method and the selector, each
    checked to belong to the chosen part (see :func:`mdarts.search.split_values`)."""
    from .search import METHODS, SELECTORS, split_values

    values = given(args, SearchSettings) if search else {}
    for part in (*METHODS.classes(), *SELECTORS.classes()):
        values.update(given(args, part.Settings))
    return split_values(values, method, select, source="options")


def _add_run_control(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in --out and start afresh")


def _run_search(args: argparse.Namespace) -> int:
    """Search an architecture (a supernet method, then a selector) and write RUN/genotype.json.

    A supernet method (--method) trains the reversible supernet on the training split: darts
    alternates weight steps on one part of it and architecture steps on a disjoint part; gdas
    does the same on one path a step, drawn from the architecture weights (Gumbel-softmax);
    single_path trains one uniformly drawn path a step. A selector (--select) then chooses the
    genotype: argmax keeps each node's op of highest architecture weight, perturbation the op
    whose removal from the trained mixture hurts most, ranked_paths the best of random paths by
    shared-weight validation loss, evolution the best a population of paths evolves to by that
    loss. Writes genotype.json, search_log.jsonl and search_checkpoint.pt into --out, and with a
    method that trains the architecture weights (darts, gdas) alpha_history.jsonl and
    alpha_heatmap.png. Giving --max-steps or --max-minutes replaces the preset's budget.
    """
    from .search import METHODS, SELECTORS, Searcher, check_parts

    config = build_settings(ModelConfig, given(args, ModelConfig), base=preset(args.preset))
    base = search_preset(args.preset)
    values, method_values, select_values = _part_values(args, args.method or base.method, args.select or base.select)
    if "max_steps" in values or "max_minutes" in values:  # a budget given replaces the preset's
        values = {"max_steps": None, "max_minutes": None, **values}
    settings = build_settings(SearchSettings, values, base=base)
    method = build_settings(METHODS[settings.method].Settings, method_values)
    selector = build_settings(SELECTORS[settings.select].Settings, select_values)
    check_parts(settings.method, settings.select, has_validation=True)  # the data is checked later
    RunDirectory(args.out, "search").check(args.resume, args.overwrite)  # before the data is prepared
    data = _prepared(args, ("train", "val"))
    searcher = Searcher(
        config, data, settings, args.out, method=method, selector=selector, resume=args.resume, overwrite=args.overwrite
    )
    result = searcher.run()
    if result.stopped_by in SIGNAL_NAMES:
        return _stopped_by_signal(args, result.stopped_by, result.steps, searcher.ranks.main)
    if not searcher.ranks.main:  # of several processes, rank 0 reports
        return 0
    print(
        f"searched {result.steps} steps ({result.stopped_by}) with {settings.method}, chosen by {settings.select}, "
        f"memory mode {searcher.memory_reason}, peak memory {result.peak_memory_bytes / 2**20:,.0f} MiB"
    )
    if result.val_loss is not None:
        print(f"validation loss {result.val_loss:.3f}")
    print(result.details["genotype"].summary())
    alpha_files = ", alpha_history.jsonl, alpha_heatmap.png" if METHODS[settings.method].trains_alpha else ""
    print(f"outputs in {result.out_dir}: genotype.json{alpha_files}, search_log.jsonl")
    return 0


def _derive_parser(sub) -> None:
    from .search import SELECTORS

    parser = _command(sub, _run_derive)
    parser.add_argument(
        "run", type=Path, nargs="+", help="search run directories (holding genotype.json) or genotype.json files"
    )
    parser.add_argument("--json", action="store_true", help="print the genotype JSON instead (of the first run)")
    parser.add_argument(
        "--select",
        choices=SELECTORS.names(),
        help="choose again from the run's checkpoint with this selector, writing RUN/genotype-NAME.json and "
        "RUN/selection-NAME.jsonl (one run)",
    )
    parser.add_argument(
        "--score",
        type=Path,
        nargs="+",
        metavar="GENOTYPE",
        help="with --select: print the selector's score of these genotype.json files instead of choosing",
    )
    _add_device(parser)
    _add_part_settings(parser, SELECTORS)
    _add_data(parser, "valid")


def _run_derive(args: argparse.Namespace) -> int:
    """Print the genotype of a search run, or choose it again with another selector.

    Print the genotype (argmax op per node) of a search run directory or a genotype.json, with the
    softmax weight of each chosen op, also against uniform (1/K for K candidates), and the
    runner-up (how decisive the choice is). Given several runs (seeds, say), print each and how
    many nodes they all agree on. With --select, rebuild the trained supernet from the run's
    checkpoint and choose with that selector (data options give the validation split, default the
    run's pair), or with --score print its score of given genotypes.
    """
    import json

    from .genotype import Genotype
    from .search.run import GENOTYPE_FILE

    if args.select is not None or args.score is not None:
        return _reselect(args)
    genotypes = [Genotype.load(run / GENOTYPE_FILE if run.is_dir() else run) for run in args.run]
    if args.json:
        print(json.dumps(genotypes[0].to_dict(), indent=1))
        return 0
    for run, genotype in zip(args.run, genotypes):
        if len(genotypes) > 1:
            print(f"{run}:")
        print(genotype.summary())
        _print_weights(genotype)
    if len(genotypes) > 1:
        chosen = [[op for _, op, _ in _searched_nodes(genotype)] for genotype in genotypes]
        if len({len(ops) for ops in chosen}) > 1:
            raise ValueError("run: the genotypes have different numbers of nodes; compare runs of one search space")
        agree = sum(len(set(ops)) == 1 for ops in zip(*chosen))
        print(f"the {len(genotypes)} genotypes agree on {agree} of {len(chosen[0])} nodes")
    return 0


def _print_weights(genotype) -> None:
    """Each searched node's chosen op with its weight, against uniform, and the runner-up."""
    ratios = []
    for name, op, probs in _searched_nodes(genotype):
        if probs is not None:
            ratios.append(probs[op] * len(probs))
            runner_up = max((other for other in probs if other != op), key=probs.get)
            print(
                f"  {name} {op:<16} weight {probs[op]:.3f} ({ratios[-1]:.2f}x uniform 1/{len(probs)}), "
                f"next {runner_up} {probs[runner_up]:.3f} ({probs[runner_up] * len(probs):.2f}x)"
            )
    if ratios:
        print(f"  top weight against uniform: {min(ratios):.2f}x to {max(ratios):.2f}x")


def _reselect(args: argparse.Namespace) -> int:
    """``derive RUN --select NAME [--score GENOTYPE...]``: see :func:`_run_derive`."""
    from .genotype import Genotype
    from .processes import resolve_device
    from .search import SELECTORS
    from .search.reporting import short_summary
    from .search.reselect import TrainedSupernet
    from .tokenizer import Tokenizer

    if args.select is None:
        raise ValueError("--score: give the selector that scores (--select NAME)")
    if len(args.run) != 1 or not args.run[0].is_dir():
        raise ValueError("--select: give one search run directory (it holds search_checkpoint.pt)")
    _, _, select_values = _part_values(args, "darts", args.select, search=False)
    settings = build_settings(SELECTORS[args.select].Settings, select_values)
    trained = TrainedSupernet(args.run[0], resolve_device(args.device))
    data = None
    if SELECTORS[args.select].needs_validation:
        if args.pair is None and args.valid_src is None:
            args.pair = trained.data.get("pair")
        data = _prepared(args, ("val",), tokenizer=Tokenizer(trained.tokenizer))
    if args.score is None:
        genotype = trained.select(args.select, settings, data)
        print(genotype.summary())
        print(
            f"chosen by {args.select}: {args.run[0] / f'genotype-{args.select}.json'}, "
            f"scores in {args.run[0] / f'selection-{args.select}.jsonl'}"
        )
        return 0
    genotypes = [Genotype.load(path) for path in args.score]
    for path, genotype in zip(args.score, genotypes):
        try:
            genotype.validate(trained.config)
        except ValueError as error:  # an op the supernet lacks, or another layout
            raise ValueError(f"--score {path}: {error} (the supernet of {args.run[0]})") from None
    selector, scores = trained.score(args.select, settings, genotypes, data)
    better = "higher" if selector.higher_is_better else "lower"
    print(f"{args.select} {selector.score_name} ({better} is better) of {len(genotypes)} genotypes:")
    for path, genotype, value in zip(args.score, genotypes, scores):
        print(f"{value:12.4f}  {path}  {short_summary(genotype)}")
    return 0


def _searched_nodes(genotype) -> list[tuple[str, str, Optional[dict[str, float]]]]:
    """(node name, chosen op, {candidate: weight} or None without weights) of every searched node."""
    nodes = []
    for side in ("encoder", "decoder"):
        candidates = getattr(genotype, f"{side}_candidates")
        weights = genotype.weights[side] if genotype.weights else None
        for i, layer in enumerate(getattr(genotype, side)):
            for k, op in enumerate(layer):
                probs = None if weights is None else dict(zip(candidates, weights[i][k]))
                nodes.append((f"{side}[{i}][{k}]", op, probs))
    return nodes


# --------------------------------------------------------------------------- train


def _train_parser(sub) -> None:
    parser = _command(sub, _run_train)
    parser.add_argument(
        "--arch",
        required=True,
        help="'transformer', 'evolved' (the Evolved Transformer) or the path of a genotype.json",
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory (refused if it holds another run)")
    presets = list(TRAIN_PRESETS)
    parser.add_argument("--preset", default="multi30k-base", choices=presets, help="model size (default %(default)s)")
    parser.add_argument(
        "--params",
        type=integer(1),
        help="size the network to this many parameters (within 2%%: d_model, then the embedding width), "
        "as mdarts experiment does",
    )
    parser.add_argument(
        "--embed-dim",
        type=integer(8),
        help="with --params: choose d_model at this embedding width, then e from it up (default: at e = d_model)",
    )
    parser.add_argument(
        "--valid-bleu",
        type=integer(0),
        default=0,
        help="also score BLEU on this many validation sentences (default 0: off)",
    )
    _add_run_control(parser)
    add_settings(parser, TrainConfig, "training settings")
    _add_data(parser, "train valid")


def _run_train(args: argparse.Namespace) -> int:
    """Train the Transformer baseline or a searched genotype from scratch.

    Train with label-smoothed cross-entropy, Adam and an inverse-sqrt schedule; validates at an
    interval, writes checkpoint_best.pt / checkpoint_last.pt atomically, log.jsonl and curves.png.
    Give a budget: --max-steps, --max-epochs and/or --max-minutes.
    """
    from .processes import resolve_device
    from .sizing import builder, check_size, load_architecture, sized_config
    from .train import Trainer

    train_config = build_settings(TrainConfig, given(args, TrainConfig))
    device = resolve_device(train_config.device)
    config = preset(args.preset, training=True)
    arch = load_architecture(args.arch)
    if args.embed_dim and not args.params:
        raise ValueError("--embed-dim: sizes the network with --params; give --params too")
    if args.params:  # the tokenizer has --vocab-size ids
        check_size(arch, config, args.params, args.vocab_size, name="--params")
    RunDirectory(args.out, "training").check(args.resume, args.overwrite)  # before the data is prepared
    data = _prepared(args, ("train", "val"))
    vocab = data.tokenizer.vocab_size
    if args.params:
        config = sized_config(arch, config, args.params, vocab, embed_dim=args.embed_dim)
    validate_bleu = _bleu_callback(data, args.valid_bleu, device) if args.valid_bleu > 0 else None
    trainer = Trainer(
        lambda: builder(arch, vocab)(config),
        data,
        train_config,
        args.out,
        validate_bleu=validate_bleu,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    model = trainer.model
    if trainer.ranks.main:
        print(
            f"{type(model).__name__}: {model.num_parameters():,} parameters, d_model {config.d_model}, "
            f"embed_dim {config.embed_dim}",
            file=sys.stderr,
        )
    result = trainer.run()
    if result.stopped_by in SIGNAL_NAMES:
        return _stopped_by_signal(args, result.stopped_by, result.steps, trainer.ranks.main)
    if not trainer.ranks.main:  # of several processes, rank 0 reports
        return 0
    shown = {"steps": result.steps, "stopped_by": result.stopped_by, "peak_memory_bytes": result.peak_memory_bytes}
    for key, value in {**shown, "tokens_per_s": result.tokens_per_s, **result.details}.items():
        print(f"{key}: {value}")
    return 0


def _bleu_callback(data, limit: int, device):
    from .evaluate import score
    from .translate import translate

    split = data["val"]
    src_ids, refs = split.src_ids[:limit], split.corpus.tgt[:limit]

    def validate_bleu(model) -> float:
        hyps = data.tokenizer.decode(translate(model, src_ids, beam_size=1, device=device))
        return score(hyps, refs, data.tgt_lang)["bleu"]["score"]

    return validate_bleu


# --------------------------------------------------------------------------- translate / evaluate


def _add_decoding(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by mdarts train")
    parser.add_argument(
        "--pair", choices=PAIRS, help="translation direction (default: the checkpoint's; checked against it when given)"
    )
    parser.add_argument(
        "--beam", type=integer(1, MAX_BEAM), default=5, help=f"beam size, 1 (greedy) to {MAX_BEAM} (default 5)"
    )
    parser.add_argument("--len-penalty", type=number(), default=1.0, help="length penalty exponent (default 1.0)")
    parser.add_argument(
        "--source-tokens",
        type=integer(1, MAX_TOKENS),
        default=4096,
        help="decoding batch size: source positions (batch x longest source) per batch (default 4096)",
    )
    _add_device(parser)


def _translate_parser(sub) -> None:
    parser = _command(sub, _run_translate)
    _add_decoding(parser)
    parser.add_argument("--input", type=Path, help="UTF-8 text file, one sentence a line (default stdin)")
    parser.add_argument("--output", type=Path, help="where to write the translations (default stdout)")


def _load_for_decoding(args: argparse.Namespace):
    """The checkpoint's :class:`~mdarts.checkpoint.LoadedModel` on ``--device``, and its pair
    (``--pair`` when the checkpoint does not record one); ValueError when they disagree."""
    from .checkpoint import load_model
    from .processes import resolve_device

    loaded = load_model(args.checkpoint, resolve_device(args.device))
    pair = (loaded.data or {}).get("pair")
    if args.pair and pair and args.pair != pair:
        raise ValueError(f"--pair {args.pair}: {args.checkpoint} translates {pair}")
    return loaded, pair or args.pair


def _translate_lines(args: argparse.Namespace, loaded, lines: list[str], progress: bool = False) -> list[str]:
    """:func:`mdarts.translate.translate_lines` of ``lines`` by ``loaded`` with the decoding
    options in ``args``."""
    from .processes import resolve_device
    from .translate import translate_lines

    return translate_lines(
        loaded.model,
        loaded.tokenizer,
        lines,
        beam_size=args.beam,
        len_penalty=args.len_penalty,
        max_tokens=args.source_tokens,
        device=resolve_device(args.device),
        progress=progress,
    )


def _read_stdin() -> list[str]:
    """The lines of stdin (UTF-8); ValueError when it is closed or not UTF-8."""
    if sys.stdin is None or sys.stdin.closed:
        raise ValueError("--input: stdin is closed; give --input FILE or pipe the text in")
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"stdin: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})") from None
    return text.splitlines()


def _run_translate(args: argparse.Namespace) -> int:
    """Translate text with a trained checkpoint.

    Translate one sentence per line from --input (default stdin) to --output (default stdout) with
    beam search; an empty line gives an empty line.
    """
    from .data import read_lines

    lines = read_lines(args.input) if args.input else _read_stdin()
    loaded, _ = _load_for_decoding(args)
    text = "\n".join(_translate_lines(args, loaded, lines)) + ("\n" if lines else "")
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _evaluate_parser(sub) -> None:
    parser = _command(sub, _run_evaluate)
    _add_decoding(parser)
    splits = list(SPLIT_LANGUAGES)
    parser.add_argument(
        "--split", choices=splits, help="Multi30k split to score (default test_2016_flickr; not with --test-src)"
    )
    _add_data_dir(parser)
    parser.add_argument(
        "--test-src", type=Path, help="generic corpus: test source file (instead of --split; a model trained on files)"
    )
    parser.add_argument("--test-tgt", type=Path, help="generic corpus: its reference translations, line by line")
    parser.add_argument("--limit", type=integer(1), help="score only the first N sentences")
    parser.add_argument("--hypotheses", type=Path, help="also write the translations to this file")


def _test_corpus(args: argparse.Namespace, pair: Optional[str]):
    """The sentences to score with their references (a :class:`~mdarts.data.ParallelCorpus`) and
    the lowercased, tokenised references when the data folder has them: --test-src/--test-tgt,
    or --split of Multi30k in the checkpoint's direction ``pair``. ValueError naming the option
    when they are mixed or the checkpoint's direction is not a Multi30k one."""
    from .data import load_pair, load_parallel_files, resolve_data_dir
    from .evaluate import load_tok_references

    if (args.test_src is None) != (args.test_tgt is None):
        raise ValueError("--test-src and --test-tgt go together; give both or neither")
    if args.test_src is not None:
        if args.split is not None:
            raise ValueError("give either --split (Multi30k) or --test-src/--test-tgt (generic files), not both")
        src_lang, _, tgt_lang = (pair or "src-tgt").partition("-")
        return load_parallel_files(args.test_src, args.test_tgt, src_lang, tgt_lang, "test"), None
    split = args.split or "test_2016_flickr"
    if pair is None:
        raise ValueError(f"--pair: {args.checkpoint} records no direction (an older checkpoint): give it with --pair")
    if pair not in PAIRS:
        raise ValueError(
            f"--split: {args.checkpoint} translates {pair}, not a Multi30k direction (a model trained on files): "
            "score it on files with --test-src and --test-tgt"
        )
    corpus = load_pair(pair, split, args.data_dir)
    folder = resolve_data_dir(args.data_dir)
    return corpus, load_tok_references(folder, split, corpus.tgt_lang) if folder else None


def _run_evaluate(args: argparse.Namespace) -> int:
    """Translate a test set and print sacreBLEU, chrF and lowercased BLEU with signatures.

    Translate --split of Multi30k in the checkpoint's direction, or the generic files
    --test-src/--test-tgt (a model trained from --train-src files), and score it: detokenised
    cased sacreBLEU and chrF (with their signatures), and lowercased Moses-tokenised BLEU as in
    Multi30k papers.
    """
    from .evaluate import format_scores, score

    loaded, pair = _load_for_decoding(args)
    corpus, tok_refs = _test_corpus(args, pair)
    src, refs = corpus.src[: args.limit], corpus.tgt[: args.limit]
    if tok_refs is not None:
        tok_refs = tok_refs[: args.limit]
    hyps = _translate_lines(args, loaded, src, progress=True)
    if args.hypotheses:
        args.hypotheses.write_text("\n".join(hyps) + "\n")
    name = args.test_src if args.test_src is not None else corpus.split
    print(f"{corpus.src_lang}-{corpus.tgt_lang} {name}: {len(hyps)} sentences, beam {args.beam}")
    print(format_scores(score(hyps, refs, corpus.tgt_lang, tok_refs)))
    return 0


# --------------------------------------------------------------------------- experiment


def _experiment_parser(sub) -> None:
    parser = _command(sub, _run_experiment)
    parser.add_argument("spec", type=Path, help="the experiment's specification (TOML or JSON; see mdarts.experiment)")
    parser.add_argument("--out", type=Path, required=True, help="experiment directory (run again to continue)")
    _add_data_dir(parser)
    parser.add_argument("--max-minutes", type=number(positive=True), help="start no new search or training after this")
    parser.add_argument(
        "--status",
        action="store_true",
        help="print what is done, running and left, and the validation losses of the finished trainings, and exit",
    )
    _add_device(parser)


def _run_experiment(args: argparse.Namespace) -> int:
    """Run a comparison of searched networks against baselines from a specification file.

    Searches, derives, sizes every network to the same parameter count, retrains every arm with
    identical settings and seeds, scores the test split once at the end and writes table.md,
    bleu.png and summary.json into --out. Running the same command again continues a stopped
    experiment; finished searches and trainings are not redone.
    """
    from .data import resolve_data_dir
    from .experiment import Experiment, ExperimentSpec

    spec = ExperimentSpec.load(args.spec)
    if args.status:
        if not (args.out / "spec.json").is_file():
            raise FileNotFoundError(f"--out: {args.out} holds no experiment (no spec.json)")
        print("\n".join(Experiment(spec, args.out, device="cpu").status()))
        return 0
    summary = Experiment(spec, args.out, resolve_data_dir(args.data_dir), args.device).run(args.max_minutes)
    if summary is None:
        again = shlex.join(["mdarts", *args.argv])
        print(f"mdarts experiment: stopped before the end; continue with:\n  {again}", file=sys.stderr)
        return 3
    if summary:  # rank 0 of several processes, or the only one
        print((args.out / "table.md").read_text())
    return 0


# --------------------------------------------------------------------------- plan


def _plan_parser(sub) -> None:
    parser = _command(sub, _run_plan)
    parser.add_argument("--preset", default="tiny", choices=list(MODEL_PRESETS), help="supernet preset (default tiny)")
    parser.add_argument(
        "--d-model",
        type=integer(1, PLAN_MAX_D_MODEL),
        help=f"override the preset's d_model (at most {PLAN_MAX_D_MODEL})",
    )
    parser.add_argument(
        "--layers",
        type=integer(1, PLAN_MAX_LAYERS),
        help=f"override the encoder and decoder depth (each; at most {PLAN_MAX_LAYERS})",
    )
    parser.add_argument(
        "--tokens", type=integer(1, MAX_TOKENS), default=4096, help="target tokens per batch (default 4096)"
    )
    parser.add_argument(
        "--seq-len",
        type=integer(1),
        help="sentence length in tokens, at most the preset's max_positions (default: the planner's)",
    )
    parser.add_argument(
        "--vocab-size", type=integer(MIN_VOCAB, MAX_VOCAB), default=8000, help="vocabulary size (default 8000)"
    )
    parser.add_argument(
        "--chunk-rows",
        type=integer(0, MAX_TOKENS),
        default=0,
        help="chunked output loss with this many rows per chunk (0: full logits)",
    )
    parser.add_argument("--bf16", action="store_true", help="2-byte activations")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the allocator to model (default cpu)")
    parser.add_argument(
        "--budget-gb", type=number(positive=True), help="also give the largest d_model that fits this many GiB"
    )


def _run_plan(args: argparse.Namespace) -> int:
    """Predicted peak memory of a search configuration in each memory mode.

    Analytic memory model of one supernet training step (parameters, gradients, Adam state,
    activations saved per op and layer, logits) for reconstruct, checkpoint and store; with
    --budget-gb, the largest d_model that fits per mode. benchmarks/memory.py prints these
    predictions next to measurements.
    """
    from .plan import format_plan

    config = preset(args.preset)
    if args.d_model:
        config = config.replace(d_model=args.d_model)
    if args.layers:
        config = config.replace(encoder_layers=args.layers, decoder_layers=args.layers)
    config.check_splits()
    budget = int(args.budget_gb * 2**30) if args.budget_gb else None
    print(
        format_plan(
            config,
            args.vocab_size,
            args.tokens,
            chunk_rows=args.chunk_rows,
            dtype_bytes=2 if args.bf16 else 4,
            seq_len=args.seq_len,
            device=args.device,
            budget_bytes=budget,
        )
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """An option parser whose refusal is one line: the error and where the options are
    explained (argparse's usage block before it would bury the line that matters)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mdarts", description="Memory-efficient differentiable architecture search for Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _search_parser,
        _derive_parser,
        _train_parser,
        _translate_parser,
        _evaluate_parser,
        _experiment_parser,
        _plan_parser,
    ):
        add(sub)
    return parser


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this run: the same words, with --resume instead of --overwrite."""
    words = [word for word in args.argv if word != "--overwrite"]
    return shlex.join(["mdarts", *words, *([] if "--resume" in words else ["--resume"])])


def _stopped_by_signal(args: argparse.Namespace, name: str, step: int, main: bool) -> int:
    """Report a run stopped by signal ``name`` after ``step`` (its checkpoint written) when this
    process is its ``main`` one (rank 0 of several); the exit status."""
    if main:
        print(
            f"mdarts {args.command}: stopped by {name} after step {step}; checkpoint written. Resume with:\n"
            f"  {_resume_command(args)}",
            file=sys.stderr,
        )
    return 128 + signal.Signals[name].value


def _interrupted(args: argparse.Namespace) -> str:
    """What to say of a ``train`` or ``search`` interrupted at once (KeyboardInterrupt): the
    command that resumes it when its checkpoint exists; else that nothing was saved, and the
    command that starts it again (with --overwrite when it left files in --out)."""
    run_dir = RunDirectory(args.out, {"train": "training", "search": "search"}[args.command])
    if run_dir.checkpoint.is_file():
        return f"every file written so far is whole. Resume with:\n  {_resume_command(args)}"
    words = [word for word in args.argv if word not in ("--resume", "--overwrite")]
    again = shlex.join(["mdarts", *words, *(["--overwrite"] if run_dir.existing() else [])])
    return f"nothing was saved (no checkpoint yet); start again with:\n  {again}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        if os.environ.get("MDARTS_DEBUG") == "1":
            raise
        print(f"mdarts {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command not in ("train", "search"):
            print(f"mdarts {args.command}: interrupted; every file written so far is whole", file=sys.stderr)
        elif os.environ.get("RANK", "0") == "0":  # of several processes (torchrun), rank 0 says how to go on
            print(f"mdarts {args.command}: interrupted; {_interrupted(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

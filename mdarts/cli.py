"""The ``mdarts`` command line: search, derive, train, translate, evaluate, bench, plan.

Every subcommand explains its options with ``--help``. Errors a user can fix (a missing
file, a bad option value, a run directory that holds another run...) print one line naming
what is wrong and exit with status 2; set ``MDARTS_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import PRESETS, TRAIN_PRESETS, preset
from .data import PAIRS, SPLIT_LANGUAGES

# default budgets and warm-up per search preset: "tiny" finishes in about 10 minutes on 2 cores
SEARCH_DEFAULTS = {
    "tiny": dict(max_minutes=10.0, warmup_steps=200, eval_interval=50, checkpoint_interval=100, max_tokens=2048),
    "small": dict(max_steps=20_000, warmup_steps=4000, eval_interval=500, checkpoint_interval=1000, max_tokens=4096),
    "paper": dict(max_steps=60_000, warmup_steps=10_000, eval_interval=1000, checkpoint_interval=2000, max_tokens=4096),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")


def _add_data(parser: argparse.ArgumentParser, splits: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--pair", choices=PAIRS, help="Multi30k translation direction, e.g. en-de")
    group.add_argument(
        "--data-dir",
        type=Path,
        help="folder of the raw Multi30k files ({split}.{lang}.gz); default $MDARTS_DATA, else a download into the cache",
    )
    group.add_argument("--vocab-size", type=_positive_int, default=8000, help="joint SentencePiece vocabulary size (default 8000)")
    group.add_argument("--tokenizer-cache", type=Path, help="folder of cached SentencePiece models (default ~/.cache/mdarts/spm)")
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


# --------------------------------------------------------------------------- search / derive


def _search_parser(sub) -> None:
    parser = sub.add_parser(
        "search",
        help="search an architecture (DARTS supernet) and write RUN/genotype.json",
        description="First-order (or second-order) DARTS on the training split, alternating weight steps on one part "
        "of it and architecture steps on a disjoint part. Writes genotype.json, alpha_history.jsonl, "
        "alpha_heatmap.png, search_log.jsonl and search_checkpoint.pt into --out.",
    )
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="supernet size (default tiny: ~10 minutes on 2 CPU cores)")
    parser.add_argument("--out", type=Path, required=True, help="run directory (refused if it holds another run)")
    parser.add_argument("--memory-mode", choices=("reconstruct", "checkpoint", "store"), help="reconstruct (default; this method), checkpoint, or store (plain DARTS)")
    parser.add_argument("--max-steps", type=_positive_int, help="budget: search steps (one weight and one architecture update each)")
    parser.add_argument("--max-minutes", type=_positive_float, help="budget: wall-clock minutes (over all resumed parts)")
    parser.add_argument("--max-tokens", type=_positive_int, help="batch size in padded positions")
    parser.add_argument("--eval-interval", type=_positive_int, help="steps between genotype/alpha-history/heatmap updates")
    parser.add_argument("--checkpoint-interval", type=_positive_int, help="steps between checkpoints")
    parser.add_argument("--split-ratio", type=float, default=0.55, help="fraction of the training data for the weights (the rest for alpha)")
    parser.add_argument("--lr", type=_positive_float, default=5e-4, help="peak learning rate of the weights (default 5e-4)")
    parser.add_argument("--warmup-steps", type=_positive_int, help="weight learning-rate warm-up steps")
    parser.add_argument("--alpha-lr", type=_positive_float, default=3e-4, help="learning rate of the architecture logits (default 3e-4)")
    parser.add_argument("--second-order", action="store_true", help="unrolled (second-order) DARTS")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in --out and start afresh")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data split and batch order")
    _add_device(parser)
    _add_data(parser, "train valid")
    parser.set_defaults(func=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from .search import SearchSettings, run_search

    config = preset(args.preset)
    if args.memory_mode:
        config = config.replace(memory_mode=args.memory_mode)
    defaults = SEARCH_DEFAULTS[args.preset]
    budget = {"max_steps": args.max_steps, "max_minutes": args.max_minutes}
    if args.max_steps is None and args.max_minutes is None:
        budget = {"max_steps": defaults.get("max_steps"), "max_minutes": defaults.get("max_minutes")}
    settings = SearchSettings(
        **budget,
        lr=args.lr,
        warmup_steps=args.warmup_steps or defaults["warmup_steps"],
        alpha_lr=args.alpha_lr,
        split_ratio=args.split_ratio,
        max_tokens=args.max_tokens or defaults["max_tokens"],
        eval_interval=args.eval_interval or defaults["eval_interval"],
        checkpoint_interval=args.checkpoint_interval or defaults["checkpoint_interval"],
        second_order=args.second_order,
        bf16=args.bf16,
        seed=args.seed,
        device=args.device,
    )
    data = _prepared(args, ("train", "val"))
    result = run_search(config, data, settings, args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"searched {result.steps} steps, memory mode {config.memory_mode}, peak memory {result.peak_memory_bytes / 2**20:,.0f} MiB")
    if result.val_loss is not None:
        print(f"validation loss {result.val_loss:.3f}")
    print(result.genotype.summary())
    print(f"outputs in {result.out_dir}: genotype.json, alpha_history.jsonl, alpha_heatmap.png, search_log.jsonl")
    return 0


def _derive_parser(sub) -> None:
    parser = sub.add_parser(
        "derive",
        help="print the genotype of a search run",
        description="Print the genotype (argmax op per node) of a search run directory or a genotype.json, "
        "with the softmax weight of each chosen op.",
    )
    parser.add_argument("run", type=Path, help="search run directory (holding genotype.json) or a genotype.json file")
    parser.add_argument("--json", action="store_true", help="print the genotype JSON instead")
    parser.set_defaults(func=_run_derive)


def _run_derive(args: argparse.Namespace) -> int:
    import json

    from .genotype import Genotype

    path = args.run / "genotype.json" if args.run.is_dir() else args.run
    genotype = Genotype.load(path)
    if args.json:
        print(json.dumps(genotype.to_dict(), indent=1))
        return 0
    print(genotype.summary())
    if genotype.weights:
        for side in ("encoder", "decoder"):
            candidates = getattr(genotype, f"{side}_candidates")
            for i, (layer, chosen) in enumerate(zip(genotype.weights[side], getattr(genotype, side))):
                for k, (probs, op) in enumerate(zip(layer, chosen)):
                    print(f"  {side}[{i}][{k}] {op:<16} weight {probs[candidates.index(op)]:.3f}")
    return 0


# --------------------------------------------------------------------------- train


def _train_parser(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="train the Transformer baseline or a searched genotype from scratch",
        description="Train with label-smoothed cross-entropy, Adam and an inverse-sqrt schedule; validates at an "
        "interval, writes checkpoint_best.pt / checkpoint_last.pt atomically, log.jsonl and curves.png.",
    )
    parser.add_argument("--arch", required=True, help="'transformer' or the path of a genotype.json")
    parser.add_argument("--out", type=Path, required=True, help="run directory (refused if it holds another run)")
    parser.add_argument("--preset", default="multi30k-base", choices=list(TRAIN_PRESETS), help="model size (default multi30k-base: 4+4 layers, d 128)")
    parser.add_argument("--params", type=_positive_int, help="size the Transformer baseline to about this many parameters")
    parser.add_argument("--max-steps", type=_positive_int, help="stop after this many updates")
    parser.add_argument("--max-epochs", type=_positive_int, help="stop after this many passes over the data")
    parser.add_argument("--max-minutes", type=_positive_float, help="stop after this many minutes of training (validations included, summed over resumes)")
    parser.add_argument("--lr", type=_positive_float, default=5e-4, help="peak learning rate (default 5e-4)")
    parser.add_argument("--warmup-steps", type=_positive_int, default=4000, help="learning-rate warm-up updates (default 4000)")
    parser.add_argument("--max-tokens", type=_positive_int, default=4096, help="batch size in padded positions (default 4096)")
    parser.add_argument("--valid-interval", type=_positive_int, default=1000, help="updates between validations (default 1000)")
    parser.add_argument("--valid-bleu", type=int, default=0, help="also score BLEU on this many validation sentences (default 0: off)")
    parser.add_argument("--patience", type=int, default=0, help="early stopping after this many validations without improvement (0: off)")
    parser.add_argument("--keep-last", type=int, default=5, help="step checkpoints kept for averaging (default 5)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in --out and start afresh")
    parser.add_argument("--seed", type=int, default=1, help="dropout and batch order")
    _add_device(parser)
    _add_data(parser, "train valid")
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .genotype import Genotype
    from .model import DerivedNet, TransformerBaseline, baseline_config_for
    from .train import TrainConfig, Trainer, model_spec

    if args.max_steps is None and args.max_epochs is None and args.max_minutes is None:
        raise ValueError("give a budget: --max-steps, --max-epochs and/or --max-minutes")
    config = preset(args.preset, training=True)
    data = _prepared(args, ("train", "val"))
    vocab = data.tokenizer.vocab_size
    if args.arch == "transformer":
        if args.params:
            config = baseline_config_for(args.params, config, vocab)
        model = TransformerBaseline(config, vocab)
    else:
        if args.params:
            raise ValueError("--params sizes the Transformer baseline only")
        model = DerivedNet(Genotype.load(args.arch), config, vocab)
    train_config = TrainConfig(
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        max_tokens=args.max_tokens,
        max_steps=args.max_steps,
        max_epochs=args.max_epochs,
        max_minutes=args.max_minutes,
        valid_interval=args.valid_interval,
        patience=args.patience,
        keep_last=args.keep_last,
        bf16=args.bf16,
        seed=args.seed,
        device=args.device,
    )
    validate_bleu = _bleu_callback(data, args.valid_bleu, train_config.torch_device()) if args.valid_bleu > 0 else None
    print(f"{type(model).__name__}: {model.num_parameters():,} parameters, d_model {config.d_model}", file=sys.stderr)
    trainer = Trainer(
        model,
        data["train"],
        data["val"],
        train_config,
        args.out,
        config.pad_id,
        model_spec(model),
        data.tokenizer.to_bytes(),
        validate_bleu=validate_bleu,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    summary = trainer.run()
    for key, value in summary.items():
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
    parser.add_argument("--beam", type=_positive_int, default=5, help="beam size (1: greedy; default 5)")
    parser.add_argument("--len-penalty", type=float, default=1.0, help="length penalty exponent (default 1.0)")
    parser.add_argument("--max-tokens", type=_positive_int, default=4096, help="source positions per batch (default 4096)")
    _add_device(parser)


def _translate_parser(sub) -> None:
    parser = sub.add_parser(
        "translate",
        help="translate text with a trained checkpoint",
        description="Translate one sentence per line from --input (default stdin) to --output (default stdout) with beam search.",
    )
    _add_decoding(parser)
    parser.add_argument("--input", type=Path, help="text file, one sentence a line (default stdin)")
    parser.add_argument("--output", type=Path, help="where to write the translations (default stdout)")
    parser.set_defaults(func=_run_translate)


def _translate_lines(args: argparse.Namespace, lines: list[str], progress: bool = False) -> list[str]:
    """Translations of ``lines`` by the checkpoint and decoding options in ``args``."""
    from .search import resolve_device
    from .train import load_model
    from .translate import translate

    device = resolve_device(args.device)
    model, tokenizer, _ = load_model(args.checkpoint, device)
    ids = translate(
        model, tokenizer.encode(lines), beam_size=args.beam, len_penalty=args.len_penalty, max_tokens=args.max_tokens, device=device, progress=progress
    )
    return tokenizer.decode(ids)


def _run_translate(args: argparse.Namespace) -> int:
    from .data import read_lines

    lines = read_lines(args.input) if args.input else [line.rstrip("\n") for line in sys.stdin]
    text = "\n".join(_translate_lines(args, lines)) + ("\n" if lines else "")
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _evaluate_parser(sub) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="translate a test split and print sacreBLEU, chrF and lowercased BLEU with signatures",
        description="Translate --split of Multi30k --pair and score it: detokenised cased sacreBLEU and chrF (with "
        "their signatures), and lowercased Moses-tokenised BLEU as in Multi30k papers.",
    )
    _add_decoding(parser)
    parser.add_argument("--pair", choices=PAIRS, required=True, help="Multi30k translation direction")
    parser.add_argument("--split", default="test_2016_flickr", choices=list(SPLIT_LANGUAGES), help="split to score (default test_2016_flickr)")
    parser.add_argument("--data-dir", type=Path, help="folder of the raw Multi30k files (default $MDARTS_DATA or the download cache)")
    parser.add_argument("--limit", type=_positive_int, help="score only the first N sentences")
    parser.add_argument("--hypotheses", type=Path, help="also write the translations to this file")
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .data import load_pair
    from .evaluate import format_scores, load_tok_references, score

    corpus = load_pair(args.pair, args.split, args.data_dir)
    src, refs = corpus.src[: args.limit], corpus.tgt[: args.limit]
    hyps = _translate_lines(args, src, progress=True)
    data_dir = args.data_dir or os.environ.get("MDARTS_DATA")
    tok_refs = load_tok_references(data_dir, args.split, corpus.tgt_lang) if data_dir else None
    if tok_refs is not None:
        tok_refs = tok_refs[: args.limit]
    if args.hypotheses:
        args.hypotheses.write_text("\n".join(hyps) + "\n")
    print(f"{args.pair} {args.split}: {len(hyps)} sentences, beam {args.beam}")
    print(format_scores(score(hyps, refs, corpus.tgt_lang, tok_refs)))
    return 0


# --------------------------------------------------------------------------- bench / plan

BENCHMARKS = ("kernels", "reversible", "memory")


def _bench_parser(sub) -> None:
    parser = sub.add_parser(
        "bench",
        help="run a benchmark (kernels, reversible, memory); options after the name go to it",
        description="Runs benchmarks/<name>.py of the source tree (JSON lines and plots under results/). "
        "Pass --help after the name for its options.",
    )
    parser.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    parser.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"benchmark script not found: {script} (the benchmarks ship with the source tree; run from a checkout)")
    return subprocess.call([sys.executable, str(script), *args.options])


def _plan_parser(sub) -> None:
    parser = sub.add_parser(
        "plan",
        help="predicted peak memory of a search configuration in each memory mode",
        description="Analytic memory model of one supernet training step (parameters, gradients, Adam state, "
        "activations saved per op and layer, logits) for reconstruct, checkpoint and store; with --budget-gb, the "
        "largest d_model that fits per mode. benchmarks/memory.py prints these predictions next to measurements.",
    )
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="supernet preset (default tiny)")
    parser.add_argument("--d-model", type=_positive_int, help="override the preset's d_model")
    parser.add_argument("--layers", type=_positive_int, help="override the encoder and decoder depth (each)")
    parser.add_argument("--tokens", type=_positive_int, default=4096, help="target tokens per batch (default 4096)")
    parser.add_argument("--seq-len", type=_positive_int, help="sentence length in tokens (default: the planner's)")
    parser.add_argument("--vocab-size", type=_positive_int, default=8000, help="vocabulary size (default 8000)")
    parser.add_argument("--chunk-rows", type=int, default=0, help="chunked output loss with this many rows per chunk (0: full logits)")
    parser.add_argument("--bf16", action="store_true", help="2-byte activations")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the allocator to model (default cpu)")
    parser.add_argument("--budget-gb", type=_positive_float, help="also give the largest d_model that fits this many GiB")
    parser.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdarts",
        description="Memory-efficient differentiable architecture search for Transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_search_parser, _derive_parser, _train_parser, _translate_parser, _evaluate_parser, _bench_parser, _plan_parser):
        add(sub)
    return parser


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        if os.environ.get("MDARTS_DEBUG") == "1":
            raise
        print(f"mdarts {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mdarts {args.command}: interrupted; checkpoints written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

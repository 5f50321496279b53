"""From raw parallel text to token ids: what training, search and evaluation start from.

``prepare_data`` loads the splits (Multi30k by pair, or generic files), trains or reuses the
joint SentencePiece model on the training split, and encodes every split; pairs with an empty
side are left out of the training and validation splits, with a warning.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from array import array
from dataclasses import dataclass, field
from typing import Optional, Union

from .batching import format_lines
from .data import ParallelCorpus, load_pair, load_parallel_files
from .tokenizer import Tokenizer, train_or_load_tokenizer

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class EncodedSplit:
    """One split: its raw text and SentencePiece ids (no BOS/EOS), aligned by index; ``lines``:
    the 1-based line number of each pair in the split's files when pairs were left out (see
    :func:`drop_empty_pairs`; None: pair i is on line i + 1)."""

    corpus: ParallelCorpus
    src_ids: list[list[int]]
    tgt_ids: list[list[int]]
    lines: Optional[list[int]] = None

    def __len__(self) -> int:
        return len(self.src_ids)

    def line_number(self, index: int) -> int:
        """1-based line number of pair ``index`` in the split's files."""
        return index + 1 if self.lines is None else self.lines[index]


@dataclass
class PreparedData:
    """The tokenizer and the encoded splits, by split name ("train", "val", ...)."""

    tokenizer: Tokenizer
    splits: dict[str, EncodedSplit] = field(default_factory=dict)
    src_lang: str = "src"
    tgt_lang: str = "tgt"

    def __getitem__(self, split: str) -> EncodedSplit:
        if split not in self.splits:
            raise ValueError(f"split {split!r} was not prepared; prepared: {', '.join(self.splits)}")
        return self.splits[split]

    def identity(self) -> dict[str, str]:
        """What a run is made from, recorded in its checkpoints: the translation direction
        (``"en-de"``; ``"src-tgt"`` for generic files), the SHA-256 of the tokenizer and of the
        training split's token ids (another data directory or tokenizer changes it)."""
        digest = hashlib.sha256()
        train = self["train"]
        for ids in (*train.src_ids, *train.tgt_ids):
            digest.update(array("i", ids).tobytes() + b"\xff\xff\xff\xff")
        return {
            "pair": f"{self.src_lang}-{self.tgt_lang}",
            "tokenizer_sha256": hashlib.sha256(self.tokenizer.to_bytes()).hexdigest(),
            "train_sha256": digest.hexdigest(),
        }


@dataclass
class FileCorpus:
    """Generic parallel text files: ``{split: (src_path, tgt_path)}``; "train" is required."""

    files: dict[str, tuple[PathLike, PathLike]]
    src_lang: str = "src"
    tgt_lang: str = "tgt"


def prepare_data(
    pair: Optional[str] = None,
    splits: tuple[str, ...] = ("train", "val"),
    data_dir: Optional[PathLike] = None,
    files: Optional[FileCorpus] = None,
    vocab_size: int = 8000,
    tokenizer_cache: Optional[PathLike] = None,
    tokenizer: Optional[Tokenizer] = None,
) -> PreparedData:
    """Load and encode ``splits`` of Multi30k ``pair`` (from ``data_dir``, $MDARTS_DATA or the
    download) or of generic ``files``; the tokenizer is trained on (or reused for) the
    training split unless one is given (e.g. from a checkpoint)."""
    if (pair is None) == (files is None):
        raise ValueError("prepare_data: give exactly one of pair (Multi30k) or files (generic parallel text)")
    corpora: dict[str, ParallelCorpus] = {}
    if files is not None:
        for split in splits:
            if split not in files.files:
                raise ValueError(f"no files given for split {split!r}; given: {', '.join(files.files)}")
            src, tgt = files.files[split]
            corpora[split] = load_parallel_files(src, tgt, files.src_lang, files.tgt_lang, split)
    else:
        for split in splits:
            corpora[split] = load_pair(pair, split, data_dir)
    if tokenizer is None:
        train = (
            corpora["train"]
            if "train" in corpora
            else (
                load_pair(pair, "train", data_dir)
                if files is None
                else load_parallel_files(*files.files["train"], files.src_lang, files.tgt_lang, "train")
            )
        )
        tokenizer = train_or_load_tokenizer(train.src + train.tgt, vocab_size=vocab_size, cache_dir=tokenizer_cache)
    first = next(iter(corpora.values()))
    prepared = PreparedData(tokenizer=tokenizer, src_lang=first.src_lang, tgt_lang=first.tgt_lang)
    for split, corpus in corpora.items():
        encoded = EncodedSplit(corpus, tokenizer.encode(corpus.src), tokenizer.encode(corpus.tgt))
        prepared.splits[split] = drop_empty_pairs(encoded) if split in TRAINING_SPLITS else encoded
    return prepared


TRAINING_SPLITS = ("train", "val")
"""The splits :func:`prepare_data` prepares for training and validation, from which pairs with an
empty side are left out (test splits are scored whole)."""


def drop_empty_pairs(split: EncodedSplit) -> EncodedSplit:
    """``split`` without the pairs whose source or target is empty (or encodes to no subword, e.g.
    blank), with a warning naming how many and the line numbers of the first few; ``split``
    itself when there is none. ValueError when no pair is left."""
    empty = [i for i, (src, tgt) in enumerate(zip(split.src_ids, split.tgt_ids)) if not src or not tgt]
    if not empty:
        return split
    corpus = split.corpus
    name = f"{corpus.split} split ({corpus.src_lang}-{corpus.tgt_lang})"
    if len(empty) == len(split):
        raise ValueError(f"{name}: every one of its {len(split)} pair(s) has an empty source or target")
    left_out = set(empty)
    keep = [i for i in range(len(split)) if i not in left_out]
    warnings.warn(
        f"{name}: left out {len(empty)} of {len(split)} pair(s) with an empty source or target: "
        f"{format_lines([split.line_number(i) for i in empty])}",
        stacklevel=3,
    )
    text = ParallelCorpus(
        corpus.src_lang, corpus.tgt_lang, corpus.split, [corpus.src[i] for i in keep], [corpus.tgt[i] for i in keep]
    )
    return EncodedSplit(
        text, [split.src_ids[i] for i in keep], [split.tgt_ids[i] for i in keep], [split.line_number(i) for i in keep]
    )

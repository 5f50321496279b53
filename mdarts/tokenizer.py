"""Joint SentencePiece subword model over source and target text, cached on disk.

The model is trained once on the training text of both languages and stored under a
key derived from a SHA-256 of that text and of every training setting; a later call
with the same text and settings loads it instead of training again, and any change
(text, vocabulary size, model type, ...) trains a new one. Models are written
atomically (temporary file, then rename).

Special ids are fixed: pad 0, unk 1, bos 2, eos 3.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import sentencepiece as spm

from mdarts.data import cache_root

from .files import write_atomic

PathLike = Union[str, "os.PathLike[str]"]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MIN_VOCAB, MAX_VOCAB = 5, 262_144
"""Vocabulary sizes a tokenizer may have: the 4 special ids and at least one piece, to 2^18 (more
than the largest multilingual vocabularies; the embedding table is vocab x e)."""
MODEL_TYPES = ("unigram", "bpe")


class Tokenizer:
    """A loaded SentencePiece model: text <-> lists of subword ids.

    ``encode`` adds no BOS/EOS (batching adds them); ``decode`` stops at the first EOS
    and drops pad and BOS ids.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_proto: bytes, path: Optional[Path] = None):
        """Load from the serialized model (the bytes of a ``.model`` file)."""
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = path
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"SentencePiece model {path or '<bytes>'} has special ids pad/unk/bos/eos = "
                f"{ids}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}"
            )

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        """Load a ``.model`` file; raises ValueError naming it when it is not one or cannot be read."""
        path = Path(path)
        try:
            proto = path.read_bytes()
        except OSError as error:
            raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from error
        try:
            return cls(proto, path)
        except RuntimeError as error:  # sentencepiece's parse failure
            raise ValueError(f"{path} is not a valid SentencePiece model ({error})") from error

    def to_bytes(self) -> bytes:
        """The serialized model, e.g. to store inside a checkpoint."""
        return self._sp.serialized_model_proto()

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ids included."""
        return self._sp.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Subword ids of each sentence, without BOS or EOS."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text of each id sequence, cut at its first EOS, pad and BOS ids removed."""
        return self._sp.decode([self._strip(seq) for seq in ids])

    def _strip(self, seq: Sequence[int]) -> list[int]:
        """Ids up to (not including) the first EOS, without pad and BOS."""
        out = []
        for token in seq:
            token = int(token)
            if token == EOS_ID:
                break
            if token not in (PAD_ID, BOS_ID):
                out.append(token)
        return out


def train_or_load_tokenizer(
    corpus_texts: Sequence[str],
    vocab_size: int = 8000,
    cache_dir: Optional[PathLike] = None,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    input_sentence_size: int = 2_000_000,
    num_threads: Optional[int] = None,
    seed: int = 0,
) -> Tokenizer:
    """Return the joint SentencePiece model of ``corpus_texts``, training it if not cached.

    Args:
        corpus_texts: training sentences of both languages (source then target).
        vocab_size: number of subword ids, the 4 special ids included.
        cache_dir: directory holding ``spm-{model_type}-{vocab_size}-{key}.model``;
            default ``$MDARTS_CACHE/spm`` (``~/.cache/mdarts/spm``).
        model_type: ``"unigram"`` or ``"bpe"``.
        character_coverage: fraction of characters the model must cover (1.0 suits
            small alphabets such as en/de/fr/cs).
        input_sentence_size: at most this many sentences (sampled) are used for
            training; Multi30k (58k sentences) is used whole.
        num_threads: training threads; default: the CPUs this process may use.
        seed: seed of SentencePiece's sampling.

    Raises:
        ValueError: empty text, unknown model type, a vocabulary size outside
            [MIN_VOCAB, MAX_VOCAB] or one the text cannot fill.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size: expected an integer from {MIN_VOCAB} to {MAX_VOCAB:,}, got {vocab_size!r}")
    if not corpus_texts:
        raise ValueError("cannot train a SentencePiece model on empty text")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {MODEL_TYPES}")
    settings = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "character_coverage": character_coverage,
        "input_sentence_size": input_sentence_size,
        "seed": seed,
        "special_ids": [PAD_ID, UNK_ID, BOS_ID, EOS_ID],
        "sentencepiece": spm.__version__,
    }
    key = cache_key(corpus_texts, settings)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "spm"
    path = directory / f"spm-{model_type}-{vocab_size}-{key[:20]}.model"
    if path.is_file():
        try:
            return Tokenizer.load(path)
        except ValueError as error:
            warnings.warn(f"retraining: cached tokenizer unusable ({error})", stacklevel=2)
    threads = num_threads or len(os.sched_getaffinity(0))
    proto = _train(corpus_texts, settings, threads)
    write_atomic(path, proto)
    return Tokenizer(proto, path)


def cache_key(texts: Sequence[str], settings: dict) -> str:
    """Hex SHA-256 of the settings (as sorted JSON) and every text line."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _train(texts: Sequence[str], settings: dict, num_threads: int) -> bytes:
    """Train SentencePiece in memory and return the serialized model."""
    spm.set_random_generator_seed(settings["seed"])
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buffer,
            vocab_size=settings["vocab_size"],
            model_type=settings["model_type"],
            character_coverage=settings["character_coverage"],
            input_sentence_size=settings["input_sentence_size"],
            shuffle_input_sentence=True,
            num_threads=num_threads,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(
            f"SentencePiece training failed with vocab_size={settings['vocab_size']} on "
            f"{len(texts)} sentences ({error}); a smaller vocabulary size may fit"
        ) from error
    return buffer.getvalue()

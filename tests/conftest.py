"""Test set-up and the fixtures shared by the suite (plain helpers are in helpers.py).

Triton kernels run under the CPU interpreter when no GPU is present: TRITON_INTERPRET must be
set before triton is first imported, hence here.

Fixtures:

* ``one_thread``: one intra-op torch thread for the test.
* ``multi30k_dir`` (session): the Multi30k raw-data folder; the test fails, naming
  $MDARTS_DATA, when the data is missing (the one way missing data is handled).
* ``multi30k_corpus`` (session): En-De Multi30k tokenised once for the whole suite.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"

CORPUS_PAIR = "en-de"
CORPUS_TRAIN_PAIRS = 2000  # the first pairs of the training split
CORPUS_VOCAB = 300  # SentencePiece pieces, specials included


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models gain nothing from more, and on shared
    cores the thread hand-offs of many small ops cost more than the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    """The Multi30k raw-data folder (train.en.gz, val.de.gz, tok/ ...): $MDARTS_DATA, else
    ../shared/data/multi30k beside the repository. Fails the test when it is missing."""
    path = Path(os.environ.get("MDARTS_DATA", SHARED_DATA))
    if not (path / "train.en.gz").exists():
        pytest.fail(f"Multi30k data not found in {path}: set MDARTS_DATA to the folder holding train.en.gz")
    return path


@pytest.fixture(scope="session")
def multi30k_corpus(multi30k_dir, tmp_path_factory):
    """Multi30k En-De tokenised once for the whole suite, as a :class:`mdarts.prepare.PreparedData`:

    * ``.tokenizer``: one 300-piece joint SentencePiece model (unigram; pad/unk/bos/eos =
      0/1/2/3) trained on both sides of the 2000 training pairs below;
    * ``["train"]``: the first 2000 pairs of the training split, ``["val"]``: the whole
      validation split (1014 pairs), each an :class:`~mdarts.prepare.EncodedSplit` with the raw
      text (``.corpus.src`` / ``.corpus.tgt``) and the ids (``.src_ids`` / ``.tgt_ids``, no
      BOS/EOS);
    * ``.src_lang``, ``.tgt_lang``: "en", "de".

    Shared by every test: read it, never change it; take the first n pairs with
    ``helpers.head(split, n)``."""
    from mdarts.data import load_pair
    from mdarts.prepare import EncodedSplit, PreparedData
    from mdarts.tokenizer import train_or_load_tokenizer

    train = load_pair(CORPUS_PAIR, "train", multi30k_dir)
    train.src, train.tgt = train.src[:CORPUS_TRAIN_PAIRS], train.tgt[:CORPUS_TRAIN_PAIRS]
    val = load_pair(CORPUS_PAIR, "val", multi30k_dir)
    tokenizer = train_or_load_tokenizer(
        train.src + train.tgt, vocab_size=CORPUS_VOCAB, cache_dir=tmp_path_factory.mktemp("spm")
    )
    prepared = PreparedData(tokenizer=tokenizer, src_lang=train.src_lang, tgt_lang=train.tgt_lang)
    for name, corpus in (("train", train), ("val", val)):
        prepared.splits[name] = EncodedSplit(corpus, tokenizer.encode(corpus.src), tokenizer.encode(corpus.tgt))
    return prepared

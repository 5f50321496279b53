"""Tests of the data layer: Multi30k loading, bad input, the tokenizer cache, batching."""

from __future__ import annotations

import functools
import gzip
import http.server
import re
import threading
import urllib.error
from pathlib import Path

import pytest
import torch

from mdarts import batching, data, tokenizer
from mdarts.batching import TokenBatches, collate, filter_by_length, make_batches
from mdarts.data import DownloadError, load_pair, load_parallel_files, read_lines
from mdarts.tokenizer import Tokenizer, train_or_load_tokenizer

SPLIT_SIZES = {"train": 29000, "val": 1014, "test_2016_flickr": 1000, "test_2017_flickr": 1000, "test_2017_mscoco": 461}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test sees the user's MDARTS_DATA or writes into the user's cache (the session
    fixtures multi30k_dir and multi30k_corpus are set up before, from the real environment)."""
    monkeypatch.delenv("MDARTS_DATA", raising=False)
    monkeypatch.setenv("MDARTS_CACHE", str(tmp_path / "cache"))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- Multi30k


def test_counts_per_split_and_language(multi30k_dir):
    for split, size in SPLIT_SIZES.items():
        for lang in ("en", "de", "fr", "cs"):
            path = multi30k_dir / f"{split}.{lang}.gz"
            if lang in data.SPLIT_LANGUAGES[split]:
                assert len(read_lines(path)) == size, path
            else:
                assert not path.exists(), path


@pytest.mark.parametrize("pair", data.PAIRS)
def test_every_pair_loads_every_split(pair, multi30k_dir):
    for split in data.splits_for_pair(pair):
        corpus = load_pair(pair, split, multi30k_dir)
        assert len(corpus.src) == len(corpus.tgt) == SPLIT_SIZES[split], (pair, split)
        assert (corpus.src_lang + "-" + corpus.tgt_lang, corpus.split) == (pair, split)


def test_czech_has_three_splits():
    assert data.splits_for_pair("cs-en") == ["train", "val", "test_2016_flickr"]
    expected = r"no split 'test_2017_flickr' for en-cs.*train, val, test_2016_flickr"
    with pytest.raises(ValueError, match=expected):
        load_pair("en-cs", "test_2017_flickr", "/nonexistent")


def test_unknown_pair_lists_known_pairs():
    with pytest.raises(ValueError, match=r"'en-es'.*en-de, de-en, en-fr, fr-en, en-cs, cs-en"):
        load_pair("en-es", "train", "/nonexistent")


def test_reverse_direction_swaps_sides(multi30k_dir):
    forward = load_pair("en-fr", "val", multi30k_dir)
    backward = load_pair("fr-en", "val", multi30k_dir)
    assert (forward.src_lang, forward.tgt_lang) == ("en", "fr")
    assert (backward.src_lang, backward.tgt_lang) == ("fr", "en")
    assert backward.src == forward.tgt and backward.tgt == forward.src
    assert forward.src[0].startswith("A group of men")


def test_data_dir_from_environment(monkeypatch, multi30k_dir):
    monkeypatch.setenv("MDARTS_DATA", str(multi30k_dir))
    assert len(load_pair("de-en", "test_2017_mscoco")) == 461


def test_missing_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MDARTS_DATA", str(tmp_path / "nowhere"))
    expected = "data directory not found: " + re.escape(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=expected):
        load_pair("en-de", "val")


def test_missing_multi30k_file_names_path_and_side(tmp_path):
    _write(tmp_path / "val.en", ["a"])
    with pytest.raises(FileNotFoundError) as info:
        load_pair("en-de", "val", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "val.de.gz") in message
    assert "German (de)" in message and "'val'" in message


# ---------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    src = _write(tmp_path / "a.en", ["x"])
    with pytest.raises(FileNotFoundError, match=r"target file not found: .*b\.de.*de side"):
        load_parallel_files(src, tmp_path / "b.de", "en", "de")


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    src = _write(tmp_path / "a.en", ["one", "two", "three"])
    tgt = _write(tmp_path / "b.de", ["eins", "zwei"])
    with pytest.raises(ValueError) as info:
        load_parallel_files(src, tgt)
    message = str(info.value)
    assert f"{src} has 3 lines" in message and f"{tgt} has 2 lines" in message


def test_empty_corpus(tmp_path):
    src, tgt = tmp_path / "a.en", tmp_path / "b.de"
    src.write_bytes(b"")
    tgt.write_bytes(b"")
    with pytest.raises(ValueError, match="empty corpus"):
        load_parallel_files(src, tgt)


@pytest.mark.parametrize("compress", [False, True])
def test_invalid_utf8_names_file_and_line(tmp_path, compress):
    raw = "first\nsecond\n".encode() + b"caf\xe9\nfourth\n"
    src = tmp_path / ("a.en.gz" if compress else "a.en")
    src.write_bytes(gzip.compress(raw) if compress else raw)
    tgt = _write(tmp_path / "b.de", ["1", "2", "3", "4"])
    expected = re.escape(f"{src}: line 3 is not valid UTF-8 (byte 0xe9")
    with pytest.raises(ValueError, match=expected):
        load_parallel_files(src, tgt)


def test_reads_gzip_and_plain_and_crlf(tmp_path):
    src = tmp_path / "a.txt.gz"
    src.write_bytes(gzip.compress("Grüße\r\nzwei\u2028drei\n".encode()))
    tgt = tmp_path / "b.txt"
    tgt.write_bytes(b"hello\nsecond")  # no final newline
    corpus = load_parallel_files(src, tgt)
    assert corpus.src == ["Grüße", "zwei\u2028drei"] and corpus.tgt == ["hello", "second"]


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "a.gz"
    path.write_bytes(gzip.compress(b"hello\n" * 100)[:30])
    with pytest.raises(ValueError, match=re.escape(f"{path}: corrupt gzip")):
        read_lines(path)


# ---------------------------------------------------------------------------- download


def test_download_offline_gives_clear_error(monkeypatch, tmp_path):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    expected = r"could not download https://raw\.githubusercontent\.com/\S*/train\.en\.gz"
    expected += r".*--data-dir DIR or set MDARTS_DATA"
    with pytest.raises(DownloadError, match=expected):
        load_pair("en-de", "train")
    cache = tmp_path / "cache" / "multi30k"
    assert list(cache.iterdir()) == []  # no partial file left behind


def test_download_unreachable_host(tmp_path):
    with pytest.raises(DownloadError, match="--data-dir"):
        load_pair("en-de", "val", base_url="http://127.0.0.1:9/")


def test_download_from_local_server_fills_cache(tmp_path, capsys, multi30k_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(multi30k_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        corpus = load_pair("en-fr", "test_2017_mscoco", base_url=url)
        assert "downloading" in capsys.readouterr().err
        again = load_pair("en-fr", "test_2017_mscoco", base_url="http://127.0.0.1:9/")
    finally:
        server.shutdown()
    assert len(corpus) == 461 and again.src == corpus.src
    cached = sorted(p.name for p in (tmp_path / "cache" / "multi30k").iterdir())
    assert cached == ["test_2017_mscoco.en.gz", "test_2017_mscoco.fr.gz"]


# ---------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def small_texts(multi30k_corpus) -> list[str]:
    """Both sides of the session corpus' 2000 En-De training pairs (its tokenizer's text)."""
    train = multi30k_corpus["train"].corpus
    return train.src + train.tgt


def test_tokenizer_cache_reuses_and_retrains(small_texts, tmp_path, monkeypatch):
    calls = []
    real_train = tokenizer._train
    monkeypatch.setattr(tokenizer, "_train", lambda *a: calls.append(1) or real_train(*a))
    cache = tmp_path / "spm"
    first = train_or_load_tokenizer(small_texts, 500, cache)
    mtime = first.path.stat().st_mtime_ns
    second = train_or_load_tokenizer(small_texts, 500, cache)
    assert len(calls) == 1 and second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    assert second.to_bytes() == first.to_bytes()

    other = train_or_load_tokenizer(small_texts, 400, cache)
    bpe = train_or_load_tokenizer(small_texts, 500, cache, model_type="bpe")
    changed = train_or_load_tokenizer(small_texts[:-1], 500, cache)
    assert len(calls) == 4
    assert len({first.path, other.path, bpe.path, changed.path}) == 4
    assert other.vocab_size == 400 and bpe.vocab_size == 500
    assert not list(cache.glob(".*"))  # no temporary files left


def test_corrupt_cached_model_is_retrained(small_texts, tmp_path):
    first = train_or_load_tokenizer(small_texts, 300, tmp_path)
    first.path.write_bytes(b"not a model")
    with pytest.warns(UserWarning, match="retraining"):
        again = train_or_load_tokenizer(small_texts, 300, tmp_path)
    assert again.to_bytes() == Tokenizer.load(first.path).to_bytes()


def test_tokenizer_round_trip_and_special_ids(small_texts, multi30k_corpus):
    tok = multi30k_corpus.tokenizer
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    sentences = small_texts[:3] + small_texts[-3:]
    ids = tok.encode(sentences)
    assert all(ids_ and min(ids_) > 3 for ids_ in ids)  # no specials added, nothing unknown
    assert tok.decode(ids) == sentences
    # decode stops at EOS and ignores BOS and padding
    assert tok.decode([[2] + ids[0] + [3] + ids[1] + [0, 0]]) == [sentences[0]]
    assert Tokenizer(tok.to_bytes()).encode(sentences) == ids


def test_tokenizer_bad_settings(small_texts, tmp_path):
    with pytest.raises(ValueError, match="empty text"):
        train_or_load_tokenizer([], 500, tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        train_or_load_tokenizer(small_texts, 500, tmp_path, model_type="word-piece")
    with pytest.raises(ValueError, match="vocab_size=100000"):
        train_or_load_tokenizer(small_texts[:50], 100000, tmp_path)


# ---------------------------------------------------------------------------- batching


def _random_ids(n: int, seed: int = 0, max_len: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len, (n,), generator=gen).tolist()
    return [torch.randint(4, 100, (k,), generator=gen).tolist() for k in lengths]


def test_batches_respect_token_limit_and_cover_each_pair_once():
    src, tgt = _random_ids(1000, 1), _random_ids(1000, 2)
    max_tokens = 300
    loader = TokenBatches(src, tgt, max_tokens, seed=3)
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for batch in loader:
            b, s = batch.src.shape
            assert b * max(s, batch.tgt_out.shape[1]) <= max_tokens
            seen.extend(batch.indices)
        assert sorted(seen) == list(range(1000))


def test_batches_group_similar_lengths():
    src = _random_ids(2000, 4)
    batches = make_batches(src, src, 400, seed=0)
    ranges = sorted((min(len(src[i]) for i in b), max(len(src[i]) for i in b)) for b in batches)
    # length ranges of the batches do not interleave: each batch is a slice of the sorted corpus
    assert all(high <= next_low for (_, high), (next_low, _) in zip(ranges, ranges[1:]))


def test_shuffling_is_deterministic_by_seed_and_epoch():
    src, tgt = _random_ids(500, 5), _random_ids(500, 6)
    a = make_batches(src, tgt, 256, seed=7)
    assert make_batches(src, tgt, 256, seed=7) == a
    assert make_batches(src, tgt, 256, seed=8) != a
    assert make_batches(src, tgt, 256, seed=7, epoch=1) != a
    ordered = make_batches(src, tgt, 256, shuffle=False)
    lengths = [max(len(src[b[0]]), len(tgt[b[0]])) for b in ordered]
    assert lengths == sorted(lengths)


def test_over_long_pairs_are_left_out_with_warning():
    src = [[5] * 3, [5] * 50, [5] * 4]
    tgt = [[6] * 2, [6] * 2, [6] * 70]
    with pytest.warns(UserWarning, match=r"left out 2 .*indices \[1, 2\]"):
        batches = make_batches(src, tgt, max_tokens=40, shuffle=False)
    assert batches == [[0]]


def test_length_filter_counts_eos():
    src = [[5] * 9, [5] * 10, [5] * 3]
    tgt = [[6] * 2, [6] * 2, [6] * 10]
    assert filter_by_length(src, tgt, max_positions=10) == [0]
    loader = TokenBatches(src, tgt, max_tokens=100, max_positions=10)
    assert loader.kept == [0] and [b.indices for b in loader] == [(0,)]


def test_collate_padding_and_masks():
    batch = collate([([10, 11, 12], [20]), ([13], [21, 22, 23, 24])], pad_id=0, bos_id=2, eos_id=3)
    assert batch.src.tolist() == [[10, 11, 12, 3], [13, 3, 0, 0]]
    assert batch.tgt_in.tolist() == [[2, 20, 0, 0, 0], [2, 21, 22, 23, 24]]
    assert batch.tgt_out.tolist() == [[20, 3, 0, 0, 0], [21, 22, 23, 24, 3]]
    assert batch.src_pad_mask.tolist() == [[False] * 4, [False, False, True, True]]
    assert batch.tgt_pad_mask.tolist() == [[False, False, True, True, True], [False] * 5]
    assert batch.src.dtype == torch.long and batch.src_pad_mask.dtype == torch.bool
    assert batch.num_tokens == 7
    assert torch.equal(batch.src_pad_mask, batch.src == 0)
    assert batch.to("cpu").src is not None


def test_end_to_end_slice(multi30k_corpus):
    val = multi30k_corpus["val"]
    loader = TokenBatches(val.src_ids, val.tgt_ids, 2048, seed=1, max_positions=128)
    rows = sum(batch.src.shape[0] for batch in loader)
    assert rows == len(val.corpus) == 1014
    assert batching.PAD_ID == multi30k_corpus.tokenizer.pad_id

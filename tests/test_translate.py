"""Greedy decoding, beam search, batched translation and scoring."""

from __future__ import annotations

from pathlib import Path

import pytest
import sacrebleu
import torch
from helpers import TINY
from sacremoses import MosesPunctNormalizer, MosesTokenizer

from mdarts.batching import collate
from mdarts.data import read_lines
from mdarts.evaluate import format_scores, load_tok_references, score
from mdarts.model import DerivedNet, Seq2Seq, Supernet, TransformerBaseline
from mdarts.tokenizer import BOS_ID, EOS_ID, PAD_ID
from mdarts.translate import beam_search, greedy_decode, max_lengths, translate, translate_lines

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 40
SOURCE_LENGTHS = (3, 7, 1, 5, 0, 9, 4, 6, 2, 8)


def tiny_model(kind: str) -> Seq2Seq:
    """A randomly initialised float64 network (float64 so that near-ties cannot flip)."""
    torch.manual_seed(0)
    if kind == "baseline":
        return TransformerBaseline(TINY, VOCAB).double()
    return DerivedNet(Supernet(TINY, VOCAB).genotype(), TINY, VOCAB).double()


def sources(lengths: tuple[int, ...] = SOURCE_LENGTHS, seed: int = 1) -> list[list[int]]:
    """Random subword ids (no specials) of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def padded(src_ids: list[list[int]]) -> torch.Tensor:
    """(B, S) sources + EOS, right-padded."""
    return collate([(ids, []) for ids in src_ids]).src


@pytest.mark.parametrize("kind", ["baseline", "derived"])
def test_beam_search_with_beam_1_equals_greedy(kind):
    model = tiny_model(kind)
    src = padded(sources())
    limits = max_lengths(src, model, 0.5, 3)
    greedy = greedy_decode(model, src, limits)
    assert beam_search(model, src, 1, max_len_a=0.5, max_len_b=3) == greedy
    assert len({len(out) for out in greedy}) > 1  # sentences of different output lengths
    assert all(out and PAD_ID not in out and BOS_ID not in out and EOS_ID not in out for out in greedy)


@pytest.mark.parametrize("kind", ["baseline", "derived"])
def test_beam_search_does_not_depend_on_the_batch(kind):
    model = tiny_model(kind)
    src_ids = sources()
    together = beam_search(model, padded(src_ids), 4, len_penalty=0.6)
    alone = [beam_search(model, padded([ids]), 4, len_penalty=0.6)[0] for ids in src_ids]
    assert together == alone


def reference_beam_search(model: Seq2Seq, ids: list[int], k: int, len_penalty: float, limit: int) -> list[int]:
    """The same search written plainly for one sentence: every prefix decoded from scratch."""
    memory, src_pad = model.encode(padded([ids]))
    beams: list[tuple[float, list[int]]] = [(0.0, [BOS_ID])]
    ended: list[tuple[float, list[int]]] = []
    for step in range(limit + 1):
        candidates = []
        for total, prefix in beams:
            lprobs = torch.log_softmax(model.decode(torch.tensor([prefix]), memory, src_pad)[0, -1].float(), dim=-1)
            lprobs[[PAD_ID, BOS_ID] + ([EOS_ID] if step == 0 else [])] = -torch.inf
            if step == limit:
                lprobs = torch.where(torch.arange(VOCAB) == EOS_ID, 0.0, -torch.inf)
            candidates += [(total + lp, prefix + [token]) for token, lp in enumerate(lprobs.tolist())]
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * k]
        for total, prefix in candidates[:k]:
            if prefix[-1] == EOS_ID and total > -torch.inf and len(ended) < k:
                ended.append((total / (step + 1) ** len_penalty, prefix[1:-1]))
        if len(ended) >= k:
            break
        beams = [c for c in candidates if c[1][-1] != EOS_ID][:k]
    return max(ended, key=lambda h: h[0])[1]


@pytest.mark.parametrize("len_penalty", [0.0, 0.6, 1.0, 2.0])
def test_beam_search_equals_a_plain_reference_search(len_penalty):
    model = tiny_model("baseline").eval()
    src_ids = sources()
    src = padded(src_ids)
    limits = max_lengths(src, model, 1.0, 3).tolist()
    with torch.no_grad():
        expected = [reference_beam_search(model, ids, 3, len_penalty, limit) for ids, limit in zip(src_ids, limits)]
    assert beam_search(model, src, 3, len_penalty, max_len_a=1.0, max_len_b=3) == expected


def test_decoding_respects_the_maximum_length():
    model = tiny_model("baseline")
    src_ids = sources()
    src = padded(src_ids)
    for out in beam_search(model, src, 3, max_len_a=0.0, max_len_b=2) + greedy_decode(model, src, 2):
        assert 1 <= len(out) <= 2
    limits = max_lengths(src, model, 0.5, 1).tolist()
    assert limits == [int(0.5 * len(ids) + 1) for ids in src_ids]
    for out, limit in zip(beam_search(model, src, 3, max_len_a=0.5, max_len_b=1), limits, strict=True):
        assert len(out) <= limit
    # a ratio that asks for more than the positions the model has is cut to max_positions - 1
    assert max_lengths(src, model, 10.0, 0).max().item() == TINY.max_positions - 1
    assert all(len(out) < TINY.max_positions for out in beam_search(model, src, 2, max_len_a=10.0, max_len_b=0))


def test_translate_returns_the_input_order_whatever_the_batches():
    model = tiny_model("baseline")
    src_ids = sources((4, 1, 9, 2, 6, 3, 8, 0, 5), seed=2)
    expected = [beam_search(model, padded([ids]), 3)[0] for ids in src_ids]
    for max_tokens in (10, 4096):  # several small batches, then one
        assert translate(model, src_ids, beam_size=3, max_tokens=max_tokens) == expected
    assert translate(model, [], beam_size=3) == []


class _WordLengths:
    """A stand-in tokenizer: a word's id is 4 + its length; decoding writes the ids on two lines."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[4 + len(word) for word in text.split()] for text in texts]

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [" ".join(map(str, seq)) + "\nend" for seq in ids]


def test_translate_lines_gives_an_empty_line_for_a_blank_one_and_one_line_a_sentence():
    """What mdarts translate writes and an experiment scores: blank lines are not decoded."""
    model, tokenizer = tiny_model("baseline"), _WordLengths()
    lines = ["a bb ccc", "", "   ", "dddd e ff"]
    decoded = translate(model, tokenizer.encode([lines[0], lines[3]]), beam_size=2)
    expected = [text.replace("\n", " ") for text in tokenizer.decode(decoded)]
    assert translate_lines(model, tokenizer, lines, beam_size=2) == [expected[0], "", "", expected[1]]
    assert translate_lines(model, tokenizer, [], beam_size=2) == []


def test_translate_restores_training_mode():
    model = tiny_model("baseline").train()
    translate(model, sources((2, 3)), beam_size=2)
    assert model.training


def test_identical_hypotheses_score_100_with_signatures():
    text = ["Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.", "Zwei Hunde spielen im Schnee."]
    scores = score(text, text, "de")
    assert set(scores) == {"bleu", "chrf", "bleu_lc_tok"}
    for entry in scores.values():
        assert entry["score"] == pytest.approx(100.0)
        assert "nrefs:1" in entry["signature"] and entry["label"]
    assert "case:mixed" in scores["bleu"]["signature"] and "tok:13a" in scores["bleu"]["signature"]
    assert "tok:none" in scores["bleu_lc_tok"]["signature"] and "lowercased" in scores["bleu_lc_tok"]["label"]
    lines = format_scores(scores).splitlines()
    assert len(lines) == 3 and all("nrefs:1" in line for line in lines)
    assert score(["Zwei Katzen."], ["Ein Mann."], "de")["bleu"]["score"] < 10


def test_lowercased_bleu_reproduces_the_multi30k_tok_references(multi30k_dir: Path):
    raw = read_lines(multi30k_dir / "test_2016_flickr.de.gz")[:60]
    tok = load_tok_references(multi30k_dir, "test_2016_flickr", "de")
    assert tok is not None and len(tok) == 1000
    tok = tok[:60]
    # the raw references as hypotheses: our pipeline must give back the tok/ lines
    assert score(raw, raw, "de", tok)["bleu_lc_tok"]["score"] == pytest.approx(100.0)
    # an imperfect system: the same number as sacremoses + sacreBLEU computed directly
    hypotheses = [" ".join(line.split()[:-2]) for line in raw]
    normalizer, tokenizer = MosesPunctNormalizer("de"), MosesTokenizer("de")
    direct = [tokenizer.tokenize(normalizer.normalize(h.lower()), escape=True, return_str=True) for h in hypotheses]
    expected = sacrebleu.corpus_bleu(direct, [tok], tokenize="none", force=True).score
    ours = score(hypotheses, raw, "de", tok)["bleu_lc_tok"]["score"]
    assert 10 < ours < 100 and ours == pytest.approx(expected)
    # without the tok/ file the references are processed the same way
    assert score(hypotheses, raw, "de")["bleu_lc_tok"]["score"] == pytest.approx(expected)
    assert load_tok_references(multi30k_dir, "train", "de") is None

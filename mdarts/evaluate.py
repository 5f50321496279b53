"""Scoring of translations: sacreBLEU, chrF and the lowercased BLEU of the Multi30k literature.

Three labelled scores, each with the signature that makes it reproducible:

* ``bleu``: detokenised, cased sacreBLEU (its default tokeniser for the target language);
  the number to report.
* ``chrf``: sacreBLEU's chrF.
* ``bleu_lc_tok``: BLEU as Multi30k papers report it (e.g. 41.0 for a Transformer on En-De
  test_2016_flickr): hypotheses lowercased, punctuation-normalised and tokenised like the
  Moses scripts (``lowercase.perl | normalize-punctuation.perl -l L | tokenizer.perl -l L``,
  here through sacremoses), scored by sacreBLEU with ``tokenize="none"`` against the
  references processed the same way, i.e. the ``tok/<split>.lc.norm.tok.<lang>.gz`` files of
  the data folder when available (:func:`load_tok_references`). Comparable with those papers
  only, not with sacreBLEU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import sacremoses
from sacrebleu.metrics import BLEU, CHRF
from sacremoses import MosesPunctNormalizer, MosesTokenizer

from mdarts.data import read_lines

LABELS = {
    "bleu": "BLEU (sacreBLEU, detokenised, cased)",
    "chrf": "chrF (sacreBLEU)",
    "bleu_lc_tok": "BLEU (lowercased, Moses-tokenised, as in Multi30k papers)",
}


def moses_lowercase_tokenize(lines: list[str], lang: str) -> list[str]:
    """Each line lowercased, punctuation-normalised and Moses-tokenised (``&``, quotes and
    apostrophes escaped as ``&amp;``, ``&quot;``, ``&apos;``), as the Multi30k tok/ files."""
    normalizer, tokenizer = MosesPunctNormalizer(lang), MosesTokenizer(lang)
    return [tokenizer.tokenize(normalizer.normalize(line.lower()), escape=True, return_str=True) for line in lines]


def score(
    hypotheses: list[str], references: list[str], tgt_lang: str, tok_references: Optional[list[str]] = None
) -> dict[str, dict[str, Union[str, float]]]:
    """Score detokenised hypotheses against one reference each.

    Args:
        hypotheses: system outputs, detokenised text, one per sentence.
        references: the raw (detokenised, cased) references, aligned with ``hypotheses``.
        tgt_lang: target language code (picks sacreBLEU's and Moses' language rules).
        tok_references: lowercased, Moses-tokenised references (the Multi30k tok/ file
            lines) for ``bleu_lc_tok``; None processes ``references`` instead.

    Returns:
        ``{"bleu" | "chrf" | "bleu_lc_tok": {"label", "score", "signature"}}``.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if tok_references is not None and len(tok_references) != len(references):
        raise ValueError(f"{len(tok_references)} tokenised references but {len(references)} references")
    bleu, chrf = BLEU(trg_lang=tgt_lang), CHRF()
    # the text is tokenised already; lowercase=True is a no-op on it that the signature records
    bleu_lc = BLEU(tokenize="none", lowercase=True, force=True)
    lc_references = tok_references if tok_references is not None else moses_lowercase_tokenize(references, tgt_lang)
    results = {
        "bleu": (bleu, bleu.corpus_score(hypotheses, [references])),
        "chrf": (chrf, chrf.corpus_score(hypotheses, [references])),
        "bleu_lc_tok": (bleu_lc, bleu_lc.corpus_score(moses_lowercase_tokenize(hypotheses, tgt_lang), [lc_references])),
    }
    preprocessing = (
        f"|pre:lc+moses-norm+moses-tok.{tgt_lang}|sacremoses:{sacremoses.__version__}"
        f"|refs:{'tok-files' if tok_references is not None else 'sacremoses'}"
    )
    scores = {
        name: {"label": LABELS[name], "score": float(result.score), "signature": str(metric.get_signature())}
        for name, (metric, result) in results.items()
    }
    scores["bleu_lc_tok"]["signature"] += preprocessing
    return scores


def tok_reference_path(data_dir: Union[str, "os.PathLike[str]"], split: str, lang: str) -> Path:
    """``<data_dir>/tok/<split>.lc.norm.tok.<lang>.gz``."""
    return Path(data_dir) / "tok" / f"{split}.lc.norm.tok.{lang}.gz"


def load_tok_references(data_dir: Union[str, "os.PathLike[str]"], split: str, lang: str) -> Optional[list[str]]:
    """Lines of the lowercased, Moses-tokenised reference file of ``split`` and ``lang``, or
    None when the data folder has none (the references are then processed by sacremoses)."""
    path = tok_reference_path(data_dir, split, lang)
    return read_lines(path) if path.is_file() else None


def format_scores(scores: dict[str, dict[str, Union[str, float]]]) -> str:
    """One line per score: ``label = score  (signature)``."""
    return "\n".join(f"{entry['label']} = {entry['score']:.2f}  ({entry['signature']})" for entry in scores.values())

"""Greedy decoding and batched beam search over the incremental decoding state.

Both decoders work on any :class:`mdarts.model.Seq2Seq` (supernet, derived network,
Transformer baseline): the source is encoded once, then every step feeds only the newest
token of each hypothesis through ``model.decode(..., state)``, so no prefix is recomputed.
Sources end with EOS (as :func:`mdarts.batching.collate` builds them); decoding starts from
BOS. Outputs are token ids without BOS and EOS.

Conventions (as in fairseq's ``SequenceGenerator``):

* The maximum output length of a sentence of ``n`` source subwords (EOS and padding not
  counted) is ``int(a * n + b)`` tokens before EOS, at most ``config.max_positions - 1``; at
  that length EOS is forced.
* Padding and BOS are never produced; EOS is not allowed as the first token (no empty
  output).
* A beam-search hypothesis ending in EOS after ``L`` tokens (EOS included) with summed log
  probability ``s`` scores ``s / L ** len_penalty``; a sentence is finished once
  ``beam_size`` hypotheses have ended (or at its maximum length), and the best-scoring of
  them is returned. Finished sentences leave the batch, so the state shrinks as they end.

Every sentence is decoded from its own maximum length and its own rows of the batch, so
its output does not depend on the other sentences of the batch.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mdarts.batching import collate, make_batches, positions
from mdarts.model import Seq2Seq
from mdarts.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

MaxLength = Union[int, Sequence[int], Tensor]
MAX_BEAM = 64
"""Widest beam: a beam keeps ``beam x sentences`` rows of decoding state, so memory and time
grow with it, while wider beams than a few tens no longer change the translation."""


@contextlib.contextmanager
def _inference(model: Seq2Seq) -> Iterator[None]:
    """Run the block with ``model.eval()`` and no autograd; restore the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def max_lengths(src: Tensor, model: Seq2Seq, max_len_a: float, max_len_b: int) -> Tensor:
    """(B,) long: ``int(a * n + b)`` for the ``n`` subwords of each source row of src (B, S),
    clamped to [1, max_positions - 1]."""
    n = (src.ne(model.config.pad_id) & src.ne(EOS_ID)).sum(dim=1)
    lengths = (max_len_a * n.double() + max_len_b).long()
    return lengths.clamp(1, model.config.max_positions - 1)


def _log_probs(
    model: Seq2Seq, last: Tensor, memory: Tensor, src_pad: Tensor, state: dict, step: int, at_max: Tensor
) -> Tensor:
    """Next-token log probabilities (rows, V) in float32 after feeding last (rows, 1).

    Pad and BOS are forbidden, EOS is forbidden at step 0 and forced in the rows where
    ``at_max`` (rows,) bool is True."""
    lprobs = F.log_softmax(model.decode(last, memory, src_pad, state)[:, -1].float(), dim=-1)
    lprobs[:, [PAD_ID, BOS_ID]] = -torch.inf
    if step == 0:
        lprobs[:, EOS_ID] = -torch.inf
    eos_only = torch.full_like(lprobs[0], -torch.inf)
    eos_only[EOS_ID] = 0.0
    return torch.where(at_max.unsqueeze(1), eos_only, lprobs)


def greedy_decode(model: Seq2Seq, src: Tensor, max_len: MaxLength) -> list[list[int]]:
    """Greedy (argmax) decoding of a batch.

    Args:
        model: any Seq2Seq network.
        src: (B, S) long, source ids ending with EOS, right-padded with the pad id.
        max_len: most tokens before EOS, one int for every sentence or (B,) per sentence
            (see :func:`max_lengths`), clamped to [1, max_positions - 1].

    Returns:
        B lists of output ids (no BOS, no EOS), in the order of the rows of ``src``.
    """
    batch = src.shape[0]
    limits = torch.as_tensor(max_len, dtype=torch.long).expand(batch).clamp(1, model.config.max_positions - 1).tolist()
    outputs: list[list[int]] = [[] for _ in range(batch)]
    with _inference(model):
        memory, src_pad = model.encode(src)
        state: dict = {}
        active = list(range(batch))  # sentence of each row of the state
        last = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=src.device)
        for step in range(max(limits, default=0) + 1):
            at_max = torch.tensor([step >= limits[s] for s in active], device=src.device)
            tokens = _log_probs(model, last, memory, src_pad, state, step, at_max).argmax(dim=-1).tolist()
            keep = [row for row, token in enumerate(tokens) if token != EOS_ID]
            for row in keep:
                outputs[active[row]].append(tokens[row])
            if not keep:
                break
            order = torch.tensor(keep, device=src.device)
            if len(keep) < len(active):
                model.reorder_state(state, order)
                memory, src_pad = memory.index_select(0, order), src_pad.index_select(0, order)
            active = [active[row] for row in keep]
            last = torch.tensor(tokens, device=src.device).index_select(0, order).unsqueeze(1)
    return outputs


def check_decoding(beam_size: int, len_penalty: float = 1.0) -> None:
    """ValueError naming the argument unless ``beam_size`` is an integer from 1 to
    :data:`MAX_BEAM` and ``len_penalty`` a finite number."""
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or not 1 <= beam_size <= MAX_BEAM:
        raise ValueError(f"beam_size: expected an integer from 1 to {MAX_BEAM}, got {beam_size!r}")
    if not isinstance(len_penalty, (int, float)) or not math.isfinite(len_penalty):
        raise ValueError(f"len_penalty: expected a finite number, got {len_penalty!r}")


def beam_search(
    model: Seq2Seq, src: Tensor, beam_size: int, len_penalty: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10
) -> list[list[int]]:
    """Batched beam search: every sentence's ``beam_size`` hypotheses advance together as
    rows of one decoding state of batch ``B * beam_size`` (fewer as sentences finish).

    Args:
        model: any Seq2Seq network.
        src: (B, S) long, source ids ending with EOS, right-padded with the pad id.
        beam_size: hypotheses kept per sentence (1 gives greedy decoding).
        len_penalty: exponent of the length normalisation ``score / length ** len_penalty``.
        max_len_a, max_len_b: maximum output length ``int(a * source_length + b)``.

    Returns:
        B lists of ids of the best finished hypothesis (no BOS, no EOS), in row order.
    """
    check_decoding(beam_size, len_penalty)
    batch, k, device = src.shape[0], beam_size, src.device
    limits = max_lengths(src, model, max_len_a, max_len_b).tolist()
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    with _inference(model):
        memory, src_pad = model.encode(src)
        rows = torch.arange(batch, device=device).repeat_interleave(k)
        memory, src_pad = memory.index_select(0, rows), src_pad.index_select(0, rows)
        state: dict = {}
        active = list(range(batch))  # sentence of each group of k rows
        tokens = torch.full((batch * k, 1), BOS_ID, dtype=torch.long, device=device)  # (rows, step + 1)
        scores = torch.full((batch, k), -torch.inf, device=device)  # summed log probs (sentences, k)
        scores[:, 0] = 0.0  # the first step expands one hypothesis, not k copies of it
        for step in range(max(limits, default=0) + 1):
            n = len(active)
            at_max = torch.tensor([step >= limits[s] for s in active], device=device).repeat_interleave(k)
            lprobs = _log_probs(model, tokens[:, -1:], memory, src_pad, state, step, at_max)
            vocab = lprobs.shape[1]
            candidates = (scores.unsqueeze(2) + lprobs.view(n, k, vocab)).view(n, k * vocab)
            top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)  # (n, 2k), best first
            top_beam, top_token = top_index // vocab, top_index % vocab
            is_eos = top_token.eq(EOS_ID)
            # hypotheses ending among the k best candidates are finished
            ended = is_eos[:, :k] & top_scores[:, :k].isfinite()
            for i, j in ended.nonzero().tolist():
                hypotheses = finished[active[i]]
                if len(hypotheses) < k:
                    prefix = tokens[i * k + top_beam[i, j], 1:].tolist()
                    hypotheses.append((top_scores[i, j].item() / (step + 1) ** len_penalty, prefix))
            keep = [i for i in range(n) if len(finished[active[i]]) < k and step < limits[active[i]]]
            if not keep:
                break
            # the next beam: the k best candidates that do not end in EOS
            rank = is_eos.long() * top_index.shape[1] + torch.arange(top_index.shape[1], device=device)
            pick = rank.topk(k, dim=1, largest=False).indices  # (n, k), ascending rank
            next_scores = top_scores.gather(1, pick).masked_fill(is_eos.gather(1, pick), -torch.inf)
            next_beam, next_token = top_beam.gather(1, pick), top_token.gather(1, pick)
            kept = torch.tensor(keep, device=device)
            order = (kept.unsqueeze(1) * k + next_beam.index_select(0, kept)).view(-1)  # rows of the new state
            tokens = torch.cat([tokens.index_select(0, order), next_token.index_select(0, kept).view(-1, 1)], dim=1)
            model.reorder_state(state, order)
            if len(keep) < n:
                memory, src_pad = memory.index_select(0, order), src_pad.index_select(0, order)
            scores = next_scores.index_select(0, kept)
            active = [active[i] for i in keep]
    return [max(hypotheses, key=lambda h: h[0])[1] for hypotheses in finished]


def translate(
    model: Seq2Seq,
    src_ids: list[list[int]],
    beam_size: int = 5,
    len_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    max_tokens: int = 4096,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> list[list[int]]:
    """Translate sentences of subword ids (no BOS/EOS) with beam search, in batches.

    Sentences are grouped by length into batches of at most ``max_tokens`` source positions
    (raised to the longest sentence, so none is left out), EOS is appended to each source,
    and the model is moved to ``device``. Sources longer than ``max_positions - 1`` subwords
    are truncated (with a warning).

    Returns:
        One list of output ids (no BOS/EOS) per input sentence, in input order.
    """
    check_decoding(beam_size, len_penalty)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
    model.to(device)
    limit = model.config.max_positions - 1
    too_long = [i for i, ids in enumerate(src_ids) if len(ids) > limit]
    if too_long:
        warnings.warn(
            f"truncated {len(too_long)} source sentence(s) to max_positions - 1 = {limit} subwords "
            f"(indices {too_long[:10]}{'...' if len(too_long) > 10 else ''})",
            stacklevel=2,
        )
    sources = [list(ids[:limit]) for ids in src_ids]
    longest = max((positions(ids) for ids in sources), default=1)
    batches = make_batches(sources, None, max(max_tokens, longest), shuffle=False)
    outputs: list[list[int]] = [[] for _ in sources]
    for batch in tqdm(batches, desc="translate", unit="batch", disable=not progress):
        src = collate([(sources[i], []) for i in batch], pad_id=model.config.pad_id).src
        hypotheses = beam_search(model, src.to(device), beam_size, len_penalty, max_len_a, max_len_b)
        for i, hypothesis in zip(batch, hypotheses, strict=True):
            outputs[i] = hypothesis
    return outputs


def translate_lines(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    beam_size: int = 5,
    len_penalty: float = 1.0,
    max_tokens: int = 4096,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> list[str]:
    """The detokenised translation of each of ``lines`` (text, one sentence a line), in order:
    what ``mdarts translate`` writes and an experiment scores. An empty (or blank) line is not
    decoded and translates to an empty line; a translation never holds a newline, so the
    translations written one a line stay aligned with the input. The other arguments go to
    :func:`translate`."""
    wanted = [i for i, line in enumerate(lines) if line.strip()]
    ids = translate(
        model,
        tokenizer.encode([lines[i] for i in wanted]),
        beam_size=beam_size,
        len_penalty=len_penalty,
        max_tokens=max_tokens,
        device=device,
        progress=progress,
    )
    translations = [""] * len(lines)
    for i, text in zip(wanted, tokenizer.decode(ids), strict=True):
        translations[i] = text.replace("\n", " ")
    return translations

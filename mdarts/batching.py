"""Token-count batching of sentence pairs: length filtering, bucketing, shuffling, padding.

Lengths are counted as the model sees them after :func:`collate`: a source of ``n``
subword ids becomes ``n + 1`` positions (ids + EOS), a target of ``m`` ids becomes
``m + 1`` positions (BOS + ids as decoder input, ids + EOS as labels). The padded size
of a batch is ``batch_size * max(S, T)`` with ``S``, ``T`` the padded source and target
lengths; :func:`make_batches` keeps it at most ``max_tokens``.

A pair too long to fit ``max_tokens`` even alone is left out (not batched on its own),
with a warning; callers that must keep every sentence (evaluation, translation) choose
``max_tokens`` at least the longest sentence, or filter first with
:func:`filter_by_length`, which training does anyway. The pairs that filter leaves out
(:attr:`TokenBatches.dropped`) are reported by :func:`warn_dropped`, with their line numbers.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Sequence

import torch

from mdarts.tokenizer import BOS_ID, EOS_ID, PAD_ID

Ids = Sequence[int]


@dataclass
class Batch:
    """Padded tensors of one batch (``B`` sentences, padded lengths ``S`` and ``T``).

    Attributes:
        src: (B, S) int64, source ids + EOS, right-padded with the pad id.
        tgt_in: (B, T) int64, BOS + target ids (decoder input), right-padded.
        tgt_out: (B, T) int64, target ids + EOS (labels), right-padded.
        src_pad_mask: (B, S) bool, True at padding.
        tgt_pad_mask: (B, T) bool, True at padding (same for ``tgt_in`` and ``tgt_out``).
        num_tokens: number of non-padding label tokens (``tgt_out``), the loss normaliser.
        indices: corpus index of each row (empty when built by :func:`collate` alone).
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    src_pad_mask: torch.Tensor
    tgt_pad_mask: torch.Tensor
    num_tokens: int
    indices: tuple[int, ...] = ()

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch with every tensor on ``device``."""
        tensors = ("src", "tgt_in", "tgt_out", "src_pad_mask", "tgt_pad_mask")
        return replace(self, **{name: getattr(self, name).to(device) for name in tensors})


def positions(ids: Ids) -> int:
    """Positions a sentence of ``len(ids)`` subwords takes after collation (one extra)."""
    return len(ids) + 1


def filter_by_length(src_ids: Sequence[Ids], tgt_ids: Sequence[Ids], max_positions: int) -> list[int]:
    """Indices of the pairs whose source and target both fit ``max_positions`` positions."""
    return [
        i
        for i, (s, t) in enumerate(zip(src_ids, tgt_ids, strict=True))
        if positions(s) <= max_positions and positions(t) <= max_positions
    ]


def make_batches(
    src_ids: Sequence[Ids],
    tgt_ids: Optional[Sequence[Ids]],
    max_tokens: int,
    seed: int = 0,
    shuffle: bool = True,
    epoch: int = 0,
    indices: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """Group pair indices into batches of similar length, each within ``max_tokens``.

    Pairs are sorted by padded length ``max(S, T)`` and packed greedily, so every batch
    satisfies ``len(batch) * max(S, T) <= max_tokens``. With ``shuffle``, ties in length
    are broken randomly and the batch order is shuffled, both from ``(seed, epoch)``
    alone: the same seed and epoch give the same batches in the same order. Without
    ``shuffle``, batches come shortest first and ties keep corpus order.

    Args:
        src_ids: subword ids of each source sentence (no BOS/EOS).
        tgt_ids: the same for targets, or None to batch sources alone (translation).
        max_tokens: limit on ``batch_size * max(S, T)``, in positions.
        seed, epoch: determine the shuffling.
        indices: the pairs to batch (e.g. from :func:`filter_by_length`); default all.

    Returns:
        Lists of corpus indices; each index of ``indices`` appears in exactly one batch,
        except pairs that cannot fit ``max_tokens`` alone, which are left out (a warning, unless
        no pair fits: then there is no batch, which the caller refuses).
    """
    order = list(range(len(src_ids))) if indices is None else list(indices)
    if shuffle:
        random.Random(f"{seed}:{epoch}:ties").shuffle(order)
    lengths = {i: _pair_positions(src_ids, tgt_ids, i) for i in order}
    order.sort(key=lengths.__getitem__)  # stable: ties keep the (shuffled) order
    too_long = [i for i in order if lengths[i] > max_tokens]
    if too_long and len(too_long) < len(order):
        warnings.warn(
            f"left out {len(too_long)} sentence pair(s) longer than max_tokens={max_tokens} "
            f"positions (corpus indices {too_long[:10]}{'...' if len(too_long) > 10 else ''})",
            stacklevel=2,
        )
    batches = _pack([i for i in order if lengths[i] <= max_tokens], lengths, max_tokens)
    if shuffle:
        random.Random(f"{seed}:{epoch}:batches").shuffle(batches)
    return batches


def _pair_positions(src_ids: Sequence[Ids], tgt_ids: Optional[Sequence[Ids]], i: int) -> int:
    """Padded length ``max(S, T)`` that pair ``i`` needs."""
    if tgt_ids is None:
        return positions(src_ids[i])
    return max(positions(src_ids[i]), positions(tgt_ids[i]))


def _pack(order: list[int], lengths: dict[int, int], max_tokens: int) -> list[list[int]]:
    """Greedily cut ``order`` (ascending lengths) into batches within ``max_tokens``."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # lengths ascend, so lengths[i] is the batch's longest once i joins it
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(
    pairs: Sequence[tuple[Ids, Ids]], pad_id: int = PAD_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID
) -> Batch:
    """Pad a list of ``(src_ids, tgt_ids)`` pairs (no BOS/EOS in them) into a :class:`Batch`.

    Sources get EOS appended; targets become ``BOS + ids`` (input) and ``ids + EOS``
    (labels). Pass empty targets to collate sources alone.
    """
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    src = _pad([list(s) + [eos_id] for s, _ in pairs], pad_id)
    tgt_in = _pad([[bos_id] + list(t) for _, t in pairs], pad_id)
    tgt_out = _pad([list(t) + [eos_id] for _, t in pairs], pad_id)
    src_pad_mask = _pad_mask([positions(s) for s, _ in pairs], src.shape[1])
    tgt_pad_mask = _pad_mask([positions(t) for _, t in pairs], tgt_out.shape[1])
    return Batch(
        src=src,
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        src_pad_mask=src_pad_mask,
        tgt_pad_mask=tgt_pad_mask,
        num_tokens=int((~tgt_pad_mask).sum()),
    )


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """(len(rows), longest row) int64 tensor, rows right-padded with ``pad_id``."""
    width = max(map(len, rows))
    return torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)


def _pad_mask(lengths: list[int], width: int) -> torch.Tensor:
    """(len(lengths), width) bool, True at positions ``>= lengths[row]``."""
    return torch.arange(width).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)


class TokenBatches:
    """Collated token-count batches over a parallel corpus, reshuffled every epoch.

    Iterating yields :class:`Batch` objects (``indices`` set) for the current epoch;
    :meth:`set_epoch` picks the epoch. Batches depend only on the data, ``max_tokens``,
    ``max_positions``, ``seed`` and the epoch, so a resumed run can rebuild them and skip
    the ones already seen.

    Attributes:
        kept: indices of the pairs batched (those within ``max_positions``), ascending.
        dropped: indices of the pairs left out for being longer (reported by :func:`warn_dropped`).
    """

    def __init__(
        self,
        src_ids: Sequence[Ids],
        tgt_ids: Sequence[Ids],
        max_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
        max_positions: Optional[int] = None,
        pad_id: int = PAD_ID,
    ):
        """Batches of ``(src_ids[i], tgt_ids[i])``; pairs over ``max_positions`` are dropped."""
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
        self.src_ids, self.tgt_ids = src_ids, tgt_ids
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.special_ids = {"pad_id": pad_id, "bos_id": BOS_ID, "eos_id": EOS_ID}
        self.kept = (
            list(range(len(src_ids))) if max_positions is None else filter_by_length(src_ids, tgt_ids, max_positions)
        )
        kept = set(self.kept)
        self.dropped = [i for i in range(len(src_ids)) if i not in kept]
        self.epoch = 0
        self._batches = self._indices()

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffling of ``epoch`` from now on."""
        self.epoch = epoch
        self._batches = self._indices()

    def __len__(self) -> int:
        """Number of batches in the current epoch."""
        return len(self._batches)

    def __getitem__(self, k: int) -> Batch:
        """Batch ``k`` of the current epoch, collated."""
        batch = self._batches[k]
        pairs = [(self.src_ids[i], self.tgt_ids[i]) for i in batch]
        return replace(collate(pairs, **self.special_ids), indices=tuple(batch))

    def __iter__(self) -> Iterator[Batch]:
        """The current epoch's batches, collated."""
        return (self[k] for k in range(len(self._batches)))

    def _indices(self) -> list[list[int]]:
        return make_batches(self.src_ids, self.tgt_ids, self.max_tokens, self.seed, self.shuffle, self.epoch, self.kept)


def validation_batches(split: Any, max_tokens: int, max_positions: int, pad_id: int = PAD_ID) -> TokenBatches:
    """The batches of a validation ``split`` (an :class:`~mdarts.prepare.EncodedSplit`), in
    corpus order; ValueError naming ``--max-tokens`` when no pair fits (every one longer than
    ``max_positions`` or ``max_tokens``), so that a run finds it before its first update rather
    than at its first validation."""
    batches = TokenBatches(
        split.src_ids, split.tgt_ids, max_tokens, shuffle=False, max_positions=max_positions, pad_id=pad_id
    )
    if len(batches) == 0:
        raise ValueError(
            f"--max-tokens: none of the {len(split.src_ids)} validation pair(s) fits max_tokens={max_tokens} "
            f"and max_positions={max_positions}: the validation data makes no batch"
        )
    return batches


# ----------------------------------------------------------------------------- dropped pairs

SHOWN_LINES = 5
"""How many line numbers a warning about left-out pairs lists."""


def line_numbers(split: Any, indices: Sequence[int]) -> list[int]:
    """1-based line numbers (in the split's files) of the pairs ``indices`` of ``split`` (an
    :class:`~mdarts.prepare.EncodedSplit`; one without a ``lines`` record counts from line 1)."""
    lines = getattr(split, "lines", None)
    return [i + 1 for i in indices] if lines is None else [lines[i] for i in indices]


def format_lines(numbers: Sequence[int], shown: int = SHOWN_LINES) -> str:
    """``"line 7"``, ``"lines 3, 9, 12"`` or ``"lines 3, 9, 12, 20, 31, ..."`` (the first ``shown``)."""
    listed = ", ".join(str(n) for n in numbers[:shown]) + (", ..." if len(numbers) > shown else "")
    return f"line{'s' if len(numbers) > 1 else ''} {listed}"


def dropped_message(split: Any, name: str, dropped: Sequence[int], max_positions: int, purpose: str) -> Optional[str]:
    """The warning about the pairs ``dropped`` (indices) of ``split`` for being longer than
    ``max_positions``; None when none was."""
    if not dropped:
        return None
    return (
        f"{purpose}: left out {len(dropped)} of {len(split.src_ids)} {name} pair(s) whose source or target is longer "
        f"than max_positions={max_positions} positions (subwords + EOS): {format_lines(line_numbers(split, dropped))}"
    )


def warn_dropped(
    data: Any, max_positions: int, purpose: str, splits: Sequence[str] = ("train", "val"), stacklevel: int = 2
) -> dict[str, int]:
    """Warn (``warnings.warn``, one warning per split) about the pairs of ``data``'s training and
    validation splits (a :class:`~mdarts.prepare.PreparedData`, or a dict of splits) that
    :class:`TokenBatches` leaves out for being longer than ``max_positions``: how many, and the
    line numbers of the first few. ``purpose`` ("training", "search") starts the message.
    Returns the number of pairs kept in each split present."""
    present = getattr(data, "splits", data)
    kept = {}
    for name in splits:
        if name not in present:
            continue
        split = present[name]
        fits = filter_by_length(split.src_ids, split.tgt_ids, max_positions)
        fitting = set(fits)
        dropped = [i for i in range(len(split.src_ids)) if i not in fitting]
        message = dropped_message(split, name, dropped, max_positions, purpose)
        if message is not None:
            warnings.warn(message, stacklevel=stacklevel + 1)
        kept[name] = len(fits)
    return kept

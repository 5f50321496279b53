"""Label-smoothed cross-entropy over target tokens, ignoring padding (fairseq's definition)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_loss(logits: Tensor, target: Tensor, pad_id: int, smoothing: float = 0.1) -> tuple[Tensor, Tensor, int]:
    """Summed loss, summed NLL and the number of non-padding tokens.

    logits: (batch, length, vocab) (any float dtype; computed in float32); target:
    (batch, length) ids, ``pad_id`` where padded. loss = (1 - smoothing) * nll + smoothing *
    mean over the vocabulary of -log p, summed over the tokens; divide by the count for a mean.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing: expected a value in [0, 1), got {smoothing!r}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on (batch, length)")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    keep = target.ne(pad_id)
    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -log_probs.mean(dim=-1)
    loss = ((1.0 - smoothing) * nll + smoothing * smooth).masked_fill(~keep, 0.0).sum()
    return loss, nll.masked_fill(~keep, 0.0).sum(), int(keep.sum())

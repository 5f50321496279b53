"""Label-smoothed cross-entropy over target tokens, ignoring padding (fairseq's definition)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdarts_kernels import accumulation_dtype


def label_smoothed_loss(
    logits: Tensor, target: Tensor, pad_id: int, smoothing: float = 0.1
) -> tuple[Tensor, Tensor, int]:
    """Summed loss, summed NLL and the number of non-padding tokens.

    logits: (batch, length, vocab) (computed in float32, float64 for float64); target:
    (batch, length) ids, ``pad_id`` where padded. loss = (1 - smoothing) * nll + smoothing *
    mean over the vocabulary of -log p, summed over the tokens; divide by the count for a mean.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing: expected a value in [0, 1), got {smoothing!r}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on (batch, length)")
    log_probs = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    keep = target.ne(pad_id)
    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -log_probs.mean(dim=-1)
    loss = ((1.0 - smoothing) * nll + smoothing * smooth).masked_fill(~keep, 0.0).sum()
    return loss, nll.masked_fill(~keep, 0.0).sum(), int(keep.sum())


class _ChunkedOutputLoss(torch.autograd.Function):
    """Label-smoothed cross-entropy of ``features @ weight.T`` without the full logits.

    Arithmetic in float32 (float64 for float64 features). The forward walks the rows in
    chunks: each chunk's logits (chunk, vocab) are made, reduced to the loss and turned into
    that chunk's gradients at once, then freed. What is kept for backward is the gradient of
    the summed loss with respect to ``features`` and ``weight`` (shaped like them), scaled by
    the incoming gradient in backward; a gradient nobody asks for (``weight`` frozen, say) is
    not computed.
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, target: Tensor, pad_id: int, smoothing: float, chunk_rows: int):
        rows, vocab = features.shape[0], weight.shape[0]
        acc = accumulation_dtype(features.dtype)
        w32 = weight.to(acc)
        need_features, need_weight = ctx.needs_input_grad[:2]
        grad_features = torch.zeros(features.shape if need_features else (), dtype=acc, device=features.device)
        grad_weight = torch.zeros(weight.shape if need_weight else (), dtype=acc, device=weight.device)
        loss = torch.zeros((), dtype=acc, device=features.device)
        nll_total = torch.zeros((), dtype=acc, device=features.device)
        for start in range(0, rows, chunk_rows):
            x = features[start : start + chunk_rows].to(acc)
            t = target[start : start + chunk_rows]
            keep = t.ne(pad_id)
            logits = x @ w32.t()
            log_probs = torch.log_softmax(logits, dim=-1)
            nll = -log_probs.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            smooth = -log_probs.mean(dim=-1)
            loss += ((1.0 - smoothing) * nll + smoothing * smooth).masked_fill(~keep, 0.0).sum()
            nll_total += nll.masked_fill(~keep, 0.0).sum()
            # d loss / d logits = softmax - (1 - s) onehot(t) - s / V, zero on padding rows
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(-1, t.unsqueeze(-1), torch.full_like(nll, -(1.0 - smoothing)).unsqueeze(-1))
            grad_logits.sub_(smoothing / vocab).mul_(keep.unsqueeze(-1))
            if need_features:
                grad_features[start : start + chunk_rows] = grad_logits @ w32
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), x)
        ctx.save_for_backward(grad_features, grad_weight)
        ctx.dtypes = (features.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll_total)
        return loss, nll_total

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Tensor):
        grad_features, grad_weight = ctx.saved_tensors
        need_features, need_weight = ctx.needs_input_grad[:2]
        return (
            (grad_features * grad_loss).to(ctx.dtypes[0]) if need_features else None,
            (grad_weight * grad_loss).to(ctx.dtypes[1]) if need_weight else None,
            None,
            None,
            None,
            None,
        )


def chunked_output_loss(
    features: Tensor, weight: Tensor, target: Tensor, pad_id: int, smoothing: float = 0.1, chunk_rows: int = 1024
) -> tuple[Tensor, Tensor, int]:
    """:func:`label_smoothed_loss` of ``logits = features @ weight.T`` computed in chunks of
    ``chunk_rows`` rows, never holding the (tokens, vocab) logits or their gradient.

    features: (batch, length, e) or (rows, e); weight: (vocab, e) output layer; target:
    (batch, length) or (rows,) ids. Returns (loss_sum, nll_sum, ntokens) as the plain one.
    Peak extra memory: one (chunk_rows, vocab) block plus gradients shaped like the inputs.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing: expected a value in [0, 1), got {smoothing!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected a positive count, got {chunk_rows}")
    if features.shape[:-1] != target.shape:
        raise ValueError(
            f"features {tuple(features.shape)} and target {tuple(target.shape)} disagree on the token axes"
        )
    if weight.dim() != 2 or weight.shape[1] != features.shape[-1]:
        raise ValueError(f"weight: expected (vocab, {features.shape[-1]}), got {tuple(weight.shape)}")
    flat_features = features.reshape(-1, features.shape[-1])
    flat_target = target.reshape(-1)
    loss, nll = _ChunkedOutputLoss.apply(flat_features, weight, flat_target, pad_id, float(smoothing), int(chunk_rows))
    return loss, nll, int(flat_target.ne(pad_id).sum())


def sequence_loss(
    model, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, smoothing: float = 0.1, chunk_rows: int = 0, bf16: bool = False
) -> tuple[Tensor, Tensor, int]:
    """(loss_sum, nll_sum, ntokens) of a seq2seq model on one batch: the model under bf16
    autocast when ``bf16``, the loss in float32. With ``chunk_rows`` > 0 the output layer and
    loss run in blocks of that many tokens (:func:`chunked_output_loss`, float32), else on the
    full logits (batch, tgt_len, vocab). src: (batch, src_len); tgt_in, tgt_out: (batch, tgt_len)."""
    pad_id = model.config.pad_id
    with torch.autocast(src.device.type, dtype=torch.bfloat16, enabled=bf16):
        if chunk_rows > 0:
            memory, src_pad = model.encode(src)
            features = model.decode_features(tgt_in, memory, src_pad)
        else:
            logits = model(src, tgt_in)
    if chunk_rows > 0:
        return chunked_output_loss(features, model.output_weight(), tgt_out, pad_id, smoothing, chunk_rows)
    return label_smoothed_loss(logits, tgt_out, pad_id, smoothing)


def evaluate_loss(
    model: nn.Module, batches: Iterable, pad_id: int, smoothing: float, device: torch.device, bf16: bool = False
) -> dict[str, float]:
    """Token-weighted mean label-smoothed loss and NLL (nats/token), perplexity exp(nll) and the
    token count of ``batches`` (of :class:`~mdarts.batching.Batch`), in eval mode without
    gradients, under bf16 autocast if asked; the model's mode is restored."""
    was_training = model.training
    model.eval()
    loss_sum = nll_sum = 0.0
    tokens = 0
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for batch in batches:
                batch = batch.to(device)
                loss, nll, count = label_smoothed_loss(model(batch.src, batch.tgt_in), batch.tgt_out, pad_id, smoothing)
                loss_sum += float(loss)
                nll_sum += float(nll)
                tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate_loss: the validation batches hold no target tokens")
    return {"loss": loss_sum / tokens, "nll": nll_sum / tokens, "ppl": math.exp(nll_sum / tokens), "tokens": tokens}

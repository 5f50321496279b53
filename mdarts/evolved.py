"""The Evolved Transformer baseline (So, Liang and Le, ICML 2019; arXiv:1901.11117).

The cells follow tensor2tensor's ``evolved_transformer.py``: pre-norm blocks, each
``x = x + dropout(block(LayerNorm(x)))``, with d = ``config.d_model``. Shapes are
(batch, time, width) throughout.

Encoder cell:

1. gated linear unit: ``Linear(d, d) * sigmoid(Linear(d, d))``;
2. branches: ``ReLU(Linear(d, 4d))`` + ``ReLU(Conv3(d -> d/2))`` zero-padded to 4d, then
   LayerNorm(4d), a separable (depthwise, then pointwise) width-9 convolution 4d -> d/2,
   zero-padded to d;
3. self-attention (``config.heads`` heads);
4. feed-forward ``Linear(d, 4d)``, ReLU, ``Linear(4d, d)``.

Decoder cell (every convolution causal):

1. self-attention with :func:`wide_heads` heads (16 in the reference) and encoder
   attention, both on the same normalised input, summed;
2. branches: ``ReLU(SepConv11(d -> 2d))`` + ``SepConv7(d -> d/2)`` zero-padded to 2d (no
   activation, as in the reference), then LayerNorm(2d) and ``SepConv7(2d -> d)``;
3. self-attention (``config.heads`` heads);
4. encoder attention (``config.heads`` heads);
5. feed-forward ``Linear(d, 4d)``, Swish, LayerNorm(4d) (as in the reference code),
   ``Linear(4d, d)``.

The inner widths are the reference's fixed multiples of d (4d, 2d, d/2); ``config.ffn_mult``
is not used. Layer counts follow the reference, whose cells are about twice as deep as a
Transformer layer: it pairs a 6 + 6 layer Transformer with 3 encoder and 4 decoder cells,
so a config of L_enc + L_dec Transformer layers gives ``ceil(L_enc / 2)`` encoder cells and
``round(2 L_dec / 3)`` decoder cells (:func:`evolved_cells`). Dropout
(``config.dropout``) is applied where the reference applies it: after each branch, on
every block output, inside the feed-forward layers, on the attention probabilities.

Padding: every convolution zeroes its padded input positions (source padding in the
encoder, target padding in a full decoder call), attention masks padded keys, and block
outputs at padded positions are zero. Incremental decoding: each causal convolution keeps
its last (width - 1) inputs, self-attention its keys and values, encoder attention the
projected memory, all under ``id(module)`` in the shared state dict, which
:meth:`mdarts.model.Seq2Seq.reorder_state` reindexes for beam search.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .model import Seq2Seq, run_blocks
from .ops import (
    CandidateOp,
    CrossAttention,
    Dropout,
    FeedForward,
    OpContext,
    SelfAttention,
    _check_width,
    _extended_input,
    _zero_padded,
)

REFERENCE_WIDE_HEADS = 16
"""Heads of the decoder's first self-attention in the reference (``max(16, num_heads)``)."""


def evolved_cells(config: ModelConfig) -> tuple[int, int]:
    """(encoder cells, decoder cells) for the Transformer depth of ``config``:
    ``ceil(L_enc / 2)`` and ``round(2 L_dec / 3)``, so 3 and 4 for 6 + 6 layers as in the
    reference, 2 and 3 for 4 + 4, 1 and 1 for 1 + 1."""
    return (config.encoder_layers + 1) // 2, (2 * config.decoder_layers + 1) // 3


def wide_heads(config: ModelConfig) -> int:
    """Heads of the decoder's first self-attention: the most heads, from config.heads up to
    max(16, config.heads), that divide d_model (16 when heads <= 16 and 16 divides d_model;
    config.heads at worst)."""
    top = max(REFERENCE_WIDE_HEADS, config.heads)
    return max(h for h in range(config.heads, top + 1) if config.d_model % h == 0)


class Conv(CandidateOp):
    """Convolution over time from d_in to d_out channels, zero-padded, centred or causal.

    ``separable``: a depthwise ``Conv1d`` (one width-tap filter per channel, no bias) then a
    pointwise ``Conv1d(d_in, d_out, 1)`` with bias, as Keras' ``SeparableConv1D``:
    d_in * width + d_in * d_out + d_out parameters. Otherwise one full
    ``Conv1d(d_in, d_out, width)``: d_in * d_out * width + d_out. Padded input positions
    (``ctx.pad_mask``) are zeroed first; no activation, no dropout. Incremental decoding
    (causal only) keeps the last width - 1 inputs.
    """

    mixes_time = True

    def __init__(self, d_in: int, d_out: int, width: int, causal: bool, separable: bool) -> None:
        super().__init__(f"{'sep' if separable else ''}conv{width}", causal)
        _check_width(width, causal)
        self.width = width
        if separable:
            self.conv = nn.Sequential(nn.Conv1d(d_in, d_in, width, groups=d_in, bias=False), nn.Conv1d(d_in, d_out, 1))
        else:
            self.conv = nn.Conv1d(d_in, d_out, width)

    def forward(self, h: Tensor, ctx: OpContext) -> Tensor:
        """h (batch, time, d_in) -> (batch, time, d_out)."""
        x = _extended_input(_zero_padded(h, ctx.pad_mask), self.width, self.causal, self._op_state(ctx))
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def _widen(x: Tensor, width: int) -> Tensor:
    """x (batch, time, c) zero-padded on the channel axis to (batch, time, width)."""
    return F.pad(x, (0, width - x.shape[-1]))


class EncoderCell(nn.Module):
    """One Evolved Transformer encoder cell (see the module docstring); d even."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, p = config.d_model, config.dropout
        self.glu_norm = nn.LayerNorm(d)
        self.glu = nn.Linear(d, 2 * d)  # values, then gates
        self.branch_norm = nn.LayerNorm(d)
        self.left = nn.Linear(d, 4 * d)
        self.right = Conv(d, d // 2, 3, causal=False, separable=False)
        self.merge_norm = nn.LayerNorm(4 * d)
        self.merge = Conv(4 * d, d // 2, 9, causal=False, separable=True)
        self.attention_norm = nn.LayerNorm(d)
        self.attention = SelfAttention(d, False, config.heads, p)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(d, False, 4, p)
        self.dropout = Dropout(p)

    def forward(self, x: Tensor, ctx: OpContext) -> Tensor:
        """x (batch, src_len, d) -> (batch, src_len, d); ctx.pad_mask (batch, src_len)."""
        d, pad = x.shape[-1], ctx.pad_mask
        x = x + _zero_padded(self.dropout(F.glu(self.glu(self.glu_norm(x)), dim=-1)), pad)
        h = self.branch_norm(x)
        left = self.dropout(F.relu(self.left(h)))
        right = self.dropout(F.relu(self.right(h, ctx)))
        h = self.merge(self.merge_norm(left + _widen(right, 4 * d)), ctx)
        x = x + _zero_padded(self.dropout(_widen(h, d)), pad)
        x = x + self.attention(self.attention_norm(x), ctx)
        return x + self.ffn(self.ffn_norm(x), ctx)


class DecoderCell(nn.Module):
    """One Evolved Transformer decoder cell (see the module docstring); d even."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, p = config.d_model, config.dropout
        self.first_norm = nn.LayerNorm(d)
        self.wide_attention = SelfAttention(d, True, wide_heads(config), p)
        self.first_cross = CrossAttention(d, True, config.heads, p, d)
        self.branch_norm = nn.LayerNorm(d)
        self.left = Conv(d, 2 * d, 11, causal=True, separable=True)
        self.right = Conv(d, d // 2, 7, causal=True, separable=True)
        self.merge_norm = nn.LayerNorm(2 * d)
        self.merge = Conv(2 * d, d, 7, causal=True, separable=True)
        self.attention_norm = nn.LayerNorm(d)
        self.attention = SelfAttention(d, True, config.heads, p)
        self.cross_norm = nn.LayerNorm(d)
        self.cross = CrossAttention(d, True, config.heads, p, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, 4 * d), nn.SiLU(), Dropout(p), nn.LayerNorm(4 * d), nn.Linear(4 * d, d), Dropout(p)
        )
        self.dropout = Dropout(p)

    def forward(self, y: Tensor, ctx: OpContext) -> Tensor:
        """y (batch, tgt_len, d) -> (batch, tgt_len, d); ctx as in :class:`OpContext`
        (memory (batch, src_len, d), or the incremental state)."""
        d, pad = y.shape[-1], ctx.pad_mask
        h = self.first_norm(y)
        y = y + self.wide_attention(h, ctx) + self.first_cross(h, ctx)
        h = self.branch_norm(y)
        left = self.dropout(F.relu(self.left(h, ctx)))
        right = self.dropout(self.right(h, ctx))
        h = self.merge(self.merge_norm(left + _widen(right, 2 * d)), ctx)
        y = y + _zero_padded(self.dropout(h), pad)
        y = y + self.attention(self.attention_norm(y), ctx)
        y = y + self.cross(self.cross_norm(y), ctx)
        return y + _zero_padded(self.ffn(self.ffn_norm(y)), pad)


class EvolvedTransformer(Seq2Seq):
    """The Evolved Transformer with the shared embedding and output path of
    :class:`mdarts.model.Seq2Seq` (whose final LayerNorms close the pre-norm stacks).

    ``(src (batch, src_len), tgt_in (batch, tgt_len)) -> logits (batch, tgt_len, vocab)``.
    Uses d_model (even), heads, dropout and the cell counts of :func:`evolved_cells`; see
    :func:`mdarts.sizing.sized_config` to size it to a parameter count.
    """

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        if config.d_model % 2:
            raise ValueError(f"ModelConfig.d_model: the Evolved Transformer needs an even width, got {config.d_model}")
        super().__init__(config, vocab_size)
        encoder_cells, decoder_cells = evolved_cells(config)
        self.encoder_cells = nn.ModuleList(EncoderCell(config) for _ in range(encoder_cells))
        self.decoder_cells = nn.ModuleList(DecoderCell(config) for _ in range(decoder_cells))

    def encoder_body(self, x: Tensor, op_ctx: OpContext) -> Tensor:
        return run_blocks(self.encoder_cells, x, op_ctx)

    def decoder_body(self, y: Tensor, op_ctx: OpContext) -> Tensor:
        return run_blocks(self.decoder_cells, y, op_ctx)

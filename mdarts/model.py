"""The networks: DARTS supernet, derived network and Transformer baseline (docs/design.md 1.1, 1.2).

All three map ``(src (batch, src_len), tgt_in (batch, tgt_len))`` token ids to logits
``(batch, tgt_len, vocab)``, with padding marked by ``config.pad_id``, and share one
embedding and output path: factorised embeddings (vocab x e, then e x d), sinusoidal
positions, a final LayerNorm, then the projection d -> e and the tied output layer e -> vocab.

* :class:`Supernet`: encoder of multi-split reversible layers with ``encoder_splits`` parts,
  decoder with ``decoder_splits`` parts whose last is fixed cross-attention; every other part
  is a DARTS node (:class:`Node`) over the candidate ops, with architecture logits per
  (unit layer, split), shared by every ``unit_layers``-th layer.
* :class:`DerivedNet`: the same skeleton with the one op per node a :class:`Genotype` names.
* :class:`TransformerBaseline`: the standard post-LN encoder-decoder Transformer.

Every decoder supports incremental decoding: :meth:`Seq2Seq.decode` with a ``state`` dict
continues the prefix decoded so far without recomputing it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mdarts_kernels as mk

from .config import ModelConfig
from .genotype import Genotype
from .ops import (
    DECODER_FIXED_OP,
    CrossAttention,
    Dropout,
    FeedForward,
    OpContext,
    SelfAttention,
    build_candidate,
    op_spec,
    reorder_state,
)
from .reversible import ReversibleLayer, ReversibleSequence


class Node(nn.Module):
    """A DARTS node over ``candidates``: G(H) = sum_o w_o op~(H), w = softmax(alpha).

    op~(H) = LayerNorm_o(H + o(H)) for parametric ops; the parameter-free ops are computed
    here: identity~(H) = H (an op registered with ``skip``), zero~(H) = 0.
    The parametric terms go through one fused ``mixed_ln_sum`` (no K x N temporaries).
    With one candidate and no alpha, the node is that op alone (a derived network's node).

    Args:
        candidates: op names; dim: width of H (batch, time, dim); causal: decoder side;
        alpha: (len(candidates),) architecture logits (may be shared with other nodes), or
        None for a single fixed op; d_memory: width of the encoder memory; dropped: indices of
        candidates removed by progressive shrinking (a list shared with the nodes of the same
        alpha and changed in place): weight 0, never computed.
    """

    def __init__(
        self,
        candidates: Sequence[str],
        dim: int,
        causal: bool,
        config: ModelConfig,
        alpha: Optional[nn.Parameter] = None,
        d_memory: Optional[int] = None,
        dropped: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        self.candidates = tuple(candidates)
        self.dropped = [] if dropped is None else dropped
        if alpha is None and len(self.candidates) != 1:
            raise ValueError(f"Node: a node of {len(self.candidates)} candidates needs architecture logits (alpha)")
        if alpha is not None and alpha.shape != (len(self.candidates),):
            raise ValueError(f"Node: alpha must have shape ({len(self.candidates)},), got {tuple(alpha.shape)}")
        self.alpha = alpha
        self.path: Optional[int] = None  # a single path (weight sharing): the one candidate used, see Supernet.use_path
        self.gumbel: Optional[tuple[Tensor, float]] = None  # (noise, tau) of a path sampled from alpha (GDAS)
        specs = [op_spec(name) for name in self.candidates]
        self.parametric = [i for i, spec in enumerate(specs) if spec.parametric]
        skips = [i for i, spec in enumerate(specs) if spec.skip]
        if len(skips) > 1:
            raise ValueError(f"Node: at most one skip op (such as identity), got {[self.candidates[i] for i in skips]}")
        self.identity = skips[0] if skips else None
        self.ops = nn.ModuleList(
            build_candidate(self.candidates[i], dim, causal, config, d_memory) for i in self.parametric
        )
        if self.parametric:
            self.ln_weight = nn.Parameter(torch.ones(len(self.parametric), dim))
            self.ln_bias = nn.Parameter(torch.zeros(len(self.parametric), dim))

    def weights(self) -> Tensor:
        """softmax(alpha) over the candidates, (len(candidates),); [1.] for a fixed op."""
        if self.alpha is None:
            return torch.ones(1)
        return masked_softmax(self.alpha, self.dropped)

    def forward(self, h: Tensor, op_ctx: Optional[OpContext] = None) -> Tensor:
        """G(h) for h (batch, time, dim)."""
        return self.coupled(None, h, 1.0, op_ctx)

    def coupled(self, x: Optional[Tensor], h: Tensor, sign: float, op_ctx: Optional[OpContext] = None) -> Tensor:
        """x + sign * G(h), fused, summed in float32 (x None means 0); shapes (batch, time, dim)."""
        if self.path is not None:
            return self._single_path(x, h, sign, op_ctx)
        weights = self.weights().to(h.device)
        residual = None if x is None else x
        if self.identity is not None and self.identity not in self.dropped:
            acc = mk.accumulation_dtype(h.dtype)
            term = sign * weights[self.identity].to(acc) * h.to(acc)
            residual = term if residual is None else residual.to(acc) + term
        if residual is not None:
            residual = residual.to(h.dtype)
        kept = [j for j, i in enumerate(self.parametric) if i not in self.dropped]
        if not kept:
            return residual if residual is not None else torch.zeros_like(h)
        outs = [self.ops[j](h, op_ctx).to(h.dtype) for j in kept]
        if self.alpha is None:
            return mk.mixed_ln_sum(h, outs, weights, self.ln_weight, self.ln_bias, residual=residual, sign=sign)
        chosen = weights[[self.parametric[j] for j in kept]]
        ln_weight, ln_bias = (
            (self.ln_weight, self.ln_bias) if len(kept) == len(self.ops) else (self.ln_weight[kept], self.ln_bias[kept])
        )
        return mk.mixed_ln_sum(h, outs, chosen, ln_weight, ln_bias, residual=residual, sign=sign)

    def _single_path(self, x: Optional[Tensor], h: Tensor, sign: float, op_ctx: Optional[OpContext]) -> Tensor:
        """x + sign * g op~(h) for the one candidate ``self.path``, computing that op alone; g is
        1, and with :attr:`gumbel` set it carries the gradient of the path's sampled weight."""
        gate = self._path_gate(h.device)
        if self.path in self.parametric:
            j = self.parametric.index(self.path)
            out = self.ops[j](h, op_ctx).to(h.dtype)
            weight, bias = self.ln_weight[j : j + 1], self.ln_bias[j : j + 1]
            return mk.mixed_ln_sum(h, [out], gate, weight, bias, residual=x, sign=sign)
        update = sign * (gate.to(h.dtype) * h) if self.path == self.identity else torch.zeros_like(h)
        return update if x is None else x + update

    def _path_gate(self, device: torch.device) -> Tensor:
        """(1,): 1 on a fixed path; on a path sampled by Gumbel-softmax (GDAS) the straight-through
        weight s_path + (1 - s_path).detach(), s = softmax((alpha + noise) / tau) over the kept
        candidates: 1 forward, the gradient of s_path backward (computed here from alpha, so
        that a reversible layer's recomputation gives it again)."""
        if self.gumbel is None:
            return torch.ones(1, device=device)
        noise, tau = self.gumbel
        soft = masked_softmax((self.alpha + noise.to(self.alpha.device)) / tau, self.dropped)[self.path]
        return (soft + (1.0 - soft).detach()).reshape(1).to(device)


def masked_softmax(alpha: Tensor, dropped: Sequence[int]) -> Tensor:
    """softmax(alpha) with the ``dropped`` entries at 0 (and no gradient to them); alpha (K,)."""
    if dropped:
        alpha = alpha.index_fill(0, torch.tensor(dropped, device=alpha.device), float("-inf"))
    return torch.softmax(alpha, dim=0)


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """(length, dim) sinusoidal position encodings (Vaswani et al. 2017)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    rates = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * rates)
    table[:, 1::2] = torch.cos(position * rates[: dim // 2])
    return table


class Embedding(nn.Module):
    """Tokens (batch, len) -> (batch, len, d): vocab x e table (scaled by sqrt(e)), e -> d
    projection (none when e == d), sinusoidal positions from ``start``, dropout."""

    def __init__(self, vocab_size: int, config: ModelConfig) -> None:
        super().__init__()
        self.pad_id = config.pad_id
        self.max_positions = config.max_positions
        self.table = nn.Embedding(vocab_size, config.embed_dim, padding_idx=config.pad_id)
        nn.init.normal_(self.table.weight, std=config.embed_dim**-0.5)
        with torch.no_grad():
            self.table.weight[config.pad_id].zero_()
        self.project = (
            nn.Linear(config.embed_dim, config.d_model, bias=False) if config.embed_dim != config.d_model else None
        )
        self.register_buffer("positions", sinusoidal_positions(config.max_positions, config.d_model), persistent=False)
        self.dropout = Dropout(config.dropout)
        self.scale = math.sqrt(config.embed_dim)

    def forward(self, tokens: Tensor, start: int = 0) -> Tensor:
        length = tokens.shape[1]
        if start + length > self.max_positions:
            raise ValueError(
                f"sequence of {start + length} positions exceeds ModelConfig.max_positions={self.max_positions}"
            )
        x = self.table(tokens) * self.scale
        if self.project is not None:
            x = self.project(x)
        return self.dropout(x + self.positions[start : start + length])


class Seq2Seq(nn.Module):
    """Shared embedding and output path; subclasses provide ``encoder_body`` and ``decoder_body``."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size: expected a positive integer, got {vocab_size!r}")
        if config.pad_id >= vocab_size:
            raise ValueError(f"ModelConfig.pad_id: {config.pad_id} is outside the vocabulary of {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.src_embed = Embedding(vocab_size, config)
        self.tgt_embed = self.src_embed if config.share_embeddings else Embedding(vocab_size, config)
        self.encoder_norm = nn.LayerNorm(config.d_model)
        self.decoder_norm = nn.LayerNorm(config.d_model)
        d, e = config.d_model, config.embed_dim
        self.out_project = nn.Linear(d, e, bias=False) if e != d else None
        self.out_layer = None if config.tie_output else nn.Linear(e, vocab_size, bias=False)

    # subclasses ----------------------------------------------------------------
    def encoder_body(self, x: Tensor, op_ctx: OpContext) -> Tensor:
        raise NotImplementedError

    def decoder_body(self, y: Tensor, op_ctx: OpContext) -> Tensor:
        raise NotImplementedError

    # shared path -----------------------------------------------------------------
    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (batch, src_len) -> (memory (batch, src_len, d), src_pad_mask (batch, src_len))."""
        _check_tokens(src, "src", self.vocab_size)
        src_pad = src.eq(self.config.pad_id)
        x = self.src_embed(src)
        memory = self.encoder_body(x, OpContext(pad_mask=src_pad))
        return self.encoder_norm(memory), src_pad

    def decode_features(self, tgt_in: Tensor, memory: Tensor, src_pad: Tensor, state: Optional[dict] = None) -> Tensor:
        """Decoder output before the vocabulary projection, (batch, tgt_len, e).

        With ``state`` (a dict owned by the caller, empty at the first call), ``tgt_in`` holds
        only the new tokens and the call continues the prefix the state has seen."""
        _check_tokens(tgt_in, "tgt_in", self.vocab_size)
        start = 0
        if state is not None:
            start = state.get("position", 0)
            state["position"] = start + tgt_in.shape[1]
        tgt_pad = None if state is not None else tgt_in.eq(self.config.pad_id)
        y = self.tgt_embed(tgt_in, start=start)
        y = self.decoder_body(y, OpContext(pad_mask=tgt_pad, memory=memory, memory_pad_mask=src_pad, state=state))
        y = self.decoder_norm(y)
        return self.out_project(y) if self.out_project is not None else y

    def output_weight(self) -> Tensor:
        """(vocab, e) weight of the output layer (the target embedding table when tied)."""
        return self.tgt_embed.table.weight if self.out_layer is None else self.out_layer.weight

    def decode(self, tgt_in: Tensor, memory: Tensor, src_pad: Tensor, state: Optional[dict] = None) -> Tensor:
        """Logits (batch, tgt_len, vocab); see :meth:`decode_features` for ``state``."""
        return F.linear(self.decode_features(tgt_in, memory, src_pad, state), self.output_weight())

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Logits (batch, tgt_len, vocab) of tgt_in (batch, tgt_len) given src (batch, src_len)."""
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)

    @staticmethod
    def reorder_state(state: dict, new_order: Tensor) -> None:
        """Reindex the batch of an incremental decoding state (beam search)."""
        reorder_state(state, new_order)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def run_blocks(blocks: nn.ModuleList, x: Tensor, op_ctx: OpContext) -> Tensor:
    """``x`` (batch, time, d) through each block ``block(x, op_ctx)`` in turn."""
    for block in blocks:
        x = block(x, op_ctx)
    return x


def _check_tokens(tokens: Tensor, name: str, vocab_size: int) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32):
        raise ValueError(
            f"{name}: expected (batch, length) integer token ids, got {tuple(tokens.shape)} {tokens.dtype}"
        )
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"{name}: token ids must lie in [0, {vocab_size}), got [{tokens.min().item()}, {tokens.max().item()}]"
        )


class _ReversibleNet(Seq2Seq):
    """Encoder and decoder of multi-split reversible layers built from nodes."""

    def __init__(self, config: ModelConfig, vocab_size: int, memory_mode: str) -> None:
        config.check_splits()
        super().__init__(config, vocab_size)
        self.memory_mode = memory_mode

    def _build(self, encoder_nodes, decoder_nodes) -> None:
        """encoder_nodes(layer) / decoder_nodes(layer) give each layer's list of searched nodes."""
        config = self.config
        enc_layers = [ReversibleLayer(encoder_nodes(i), pool=config.pool) for i in range(config.encoder_layers)]
        dec_layers = []
        for i in range(config.decoder_layers):
            cross = Node(
                (DECODER_FIXED_OP,), config.d_model // config.decoder_splits, True, config, d_memory=config.d_model
            )
            dec_layers.append(ReversibleLayer([*decoder_nodes(i), cross], pool=config.pool))
        self.encoder = ReversibleSequence(enc_layers, mode=self.memory_mode)
        self.decoder = ReversibleSequence(dec_layers, mode=self.memory_mode)

    def encoder_body(self, x: Tensor, op_ctx: OpContext) -> Tensor:
        return self.encoder(x, op_ctx=op_ctx)

    def decoder_body(self, y: Tensor, op_ctx: OpContext) -> Tensor:
        if op_ctx.state is not None:  # incremental decoding: no backward, run the layers plainly
            for layer in self.decoder.layers:
                y = layer(y, op_ctx=op_ctx)
            return y
        return self.decoder(y, op_ctx=op_ctx)


class Supernet(_ReversibleNet):
    """The DARTS supernet of docs/design.md 1.2 on multi-split reversible layers.

    Architecture logits: ``alpha_encoder[i][k]`` (len(encoder_candidates),) and
    ``alpha_decoder[i][k]`` (len(decoder_candidates),) for unit layer i < unit_layers and
    searched split k; layer l uses unit layer l % unit_layers.
    """

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__(config, vocab_size, config.memory_mode)
        s = config.unit_layers
        self.alpha_encoder = nn.ParameterList(
            nn.Parameter(1e-3 * torch.randn(len(config.encoder_candidates))) for _ in range(s * config.encoder_splits)
        )
        self.alpha_decoder = nn.ParameterList(
            nn.Parameter(1e-3 * torch.randn(len(config.decoder_candidates)))
            for _ in range(s * (config.decoder_splits - 1))
        )
        # candidates removed by progressive shrinking, per architecture logit (see shrink)
        self.dropped: list[list[int]] = [[] for _ in self.arch_parameters()]
        enc_dim = config.d_model // config.encoder_splits
        dec_dim = config.d_model // config.decoder_splits

        def encoder_nodes(layer: int) -> list[Node]:
            unit = layer % s
            return [
                Node(
                    config.encoder_candidates,
                    enc_dim,
                    False,
                    config,
                    self.alpha_encoder[unit * config.encoder_splits + k],
                    dropped=self.dropped[unit * config.encoder_splits + k],
                )
                for k in range(config.encoder_splits)
            ]

        def decoder_nodes(layer: int) -> list[Node]:
            unit = layer % s
            searched = config.decoder_splits - 1
            return [
                Node(
                    config.decoder_candidates,
                    dec_dim,
                    True,
                    config,
                    self.alpha_decoder[unit * searched + k],
                    config.d_model,
                    self.dropped[len(self.alpha_encoder) + unit * searched + k],
                )
                for k in range(searched)
            ]

        self._build(encoder_nodes, decoder_nodes)

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture logits (encoder then decoder)."""
        return [*self.alpha_encoder, *self.alpha_decoder]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture logit."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def shrink(self, keep: int) -> None:
        """Progressive shrinking (P-DARTS): every node keeps its ``keep`` candidates of highest
        weight (the first of equal ones); the others get weight 0 and are no longer computed."""
        for alpha, dropped in zip(self.arch_parameters(), self.dropped):
            weights = masked_softmax(alpha.detach().float(), dropped).tolist()
            order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
            if keep < len(order):
                dropped[:] = sorted(order[keep:])

    def set_dropped(self, dropped: list[list[int]]) -> None:
        """Restore the shrinking state (:attr:`dropped`, e.g. from a checkpoint), in place."""
        if len(dropped) != len(self.dropped):
            raise ValueError(f"dropped: expected {len(self.dropped)} lists (one per logit), got {len(dropped)}")
        for mine, saved in zip(self.dropped, dropped):
            mine[:] = saved

    def arch_weights(self) -> dict[str, list[list[list[float]]]]:
        """softmax(alpha) per side, unit layer and split."""
        config = self.config
        result = {}
        for side, alphas, splits in (
            ("encoder", self.alpha_encoder, config.encoder_splits),
            ("decoder", self.alpha_decoder, config.decoder_splits - 1),
        ):
            offset = 0 if side == "encoder" else len(self.alpha_encoder)
            probs = [
                masked_softmax(a.detach().float(), self.dropped[offset + i]).tolist() for i, a in enumerate(alphas)
            ]
            result[side] = [probs[i * splits : (i + 1) * splits] for i in range(config.unit_layers)]
        return result

    @contextlib.contextmanager
    def use_path(self, genotype: Genotype) -> Iterator[None]:
        """Within: every node computes only the op ``genotype`` names for it (a single path of
        the supernet, for random search with weight sharing); the architecture logits are unused.
        Run the backward within too: the reversible modes recompute the layers in it."""
        alphas = {
            id(alpha): getattr(self.config, f"{side}_candidates").index(op)
            for side, params in (("encoder", self.alpha_encoder), ("decoder", self.alpha_decoder))
            for alpha, op in zip(params, (op for layer in getattr(genotype, side) for op in layer))
        }
        nodes = [node for node in iter_nodes(self) if node.alpha is not None]
        for node in nodes:
            node.path = alphas[id(node.alpha)]
        try:
            yield
        finally:
            for node in nodes:
                node.path = None

    @contextlib.contextmanager
    def sample_path(self, tau: float, generator: torch.Generator) -> Iterator[Genotype]:
        """Within: the single path drawn by the Gumbel-max trick from softmax(alpha) (GDAS, Dong
        and Yang 2019): every node computes only op argmax(alpha + g), g Gumbel noise from
        ``generator`` (CPU), scaled by the straight-through weight of softmax((alpha + g) / tau)
        so that the loss has a gradient for alpha. The op that cuts the connection (zero) and the
        candidates shrinking removed are never drawn. Yields the path's genotype; run the
        backward within."""
        noises = [
            -torch.log(-torch.log(torch.rand(a.shape, generator=generator).clamp_min(1e-20)))
            for a in self.arch_parameters()
        ]
        chosen = {}
        for side, alphas in (("encoder", self.alpha_encoder), ("decoder", self.alpha_decoder)):
            candidates = getattr(self.config, f"{side}_candidates")
            offset = 0 if side == "encoder" else len(self.alpha_encoder)
            ops = []
            for i, alpha in enumerate(alphas):
                dropped = self.dropped[offset + i]
                allowed = [k for k, op in enumerate(candidates) if op_spec(op).connects and k not in dropped]
                scores = alpha.detach().float().cpu() + noises[offset + i]
                ops.append(candidates[max(allowed, key=lambda k: scores[k].item())])
            splits = len(ops) // self.config.unit_layers
            chosen[side] = [ops[k : k + splits] for k in range(0, len(ops), splits)]
        path = Genotype(
            chosen["encoder"], chosen["decoder"], self.config.encoder_candidates, self.config.decoder_candidates
        )
        noise_of = {id(alpha): noise for alpha, noise in zip(self.arch_parameters(), noises)}
        nodes = [node for node in iter_nodes(self) if node.alpha is not None]
        with self.use_path(path):
            for node in nodes:
                node.gumbel = (noise_of[id(node.alpha)], tau)
            try:
                yield path
            finally:
                for node in nodes:
                    node.gumbel = None

    def genotype(self, exclude_zero: bool = True) -> Genotype:
        """The argmax op of every node; the op that cuts the connection (zero, see
        :attr:`mdarts.ops.OpSpec.connects`) excluded unless ``exclude_zero`` is False."""
        config = self.config
        weights = self.arch_weights()
        chosen = {}
        for side in ("encoder", "decoder"):
            candidates = getattr(config, f"{side}_candidates")
            allowed = [i for i, name in enumerate(candidates) if op_spec(name).connects or not exclude_zero] or list(
                range(len(candidates))
            )
            chosen[side] = [
                [candidates[max(allowed, key=lambda i: node[i])] for node in layer] for layer in weights[side]
            ]
        return Genotype(
            encoder=chosen["encoder"],
            decoder=chosen["decoder"],
            encoder_candidates=config.encoder_candidates,
            decoder_candidates=config.decoder_candidates,
            weights=weights,
        )


class DerivedNet(_ReversibleNet):
    """The discrete network of a genotype: the supernet's skeleton with one op per node.

    Trained with plain backprop by default (``memory_mode="store"``); the reversible modes
    are available."""

    def __init__(self, genotype: Genotype, config: ModelConfig, vocab_size: int, memory_mode: str = "store") -> None:
        genotype.validate(config)
        config = config.replace(memory_mode=memory_mode)
        super().__init__(config, vocab_size, memory_mode)
        self.genotype = genotype
        s = config.unit_layers
        enc_dim = config.d_model // config.encoder_splits
        dec_dim = config.d_model // config.decoder_splits
        self._build(
            lambda layer: [Node((op,), enc_dim, False, config) for op in genotype.encoder[layer % s]],
            lambda layer: [
                Node((op,), dec_dim, True, config, d_memory=config.d_model) for op in genotype.decoder[layer % s]
            ],
        )


class _EncoderLayer(nn.Module):
    """Post-LN Transformer encoder layer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.attention = SelfAttention(d, False, config.heads, config.dropout)
        self.ffn = FeedForward(d, False, config.ffn_mult, config.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: Tensor, op_ctx: OpContext) -> Tensor:
        x = self.norm1(x + self.attention(x, op_ctx))
        return self.norm2(x + self.ffn(x, op_ctx))


class _DecoderLayer(nn.Module):
    """Post-LN Transformer decoder layer: causal self-attention, cross-attention, FFN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.attention = SelfAttention(d, True, config.heads, config.dropout)
        self.cross = CrossAttention(d, True, config.heads, config.dropout, d)
        self.ffn = FeedForward(d, True, config.ffn_mult, config.dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, y: Tensor, op_ctx: OpContext) -> Tensor:
        y = self.norm1(y + self.attention(y, op_ctx))
        y = self.norm2(y + self.cross(y, op_ctx))
        return self.norm3(y + self.ffn(y, op_ctx))


class TransformerBaseline(Seq2Seq):
    """The standard (post-LN) encoder-decoder Transformer with the shared embedding and output path.

    Uses d_model, heads, ffn_mult (FFN hidden = ffn_mult * d_model), dropout and the layer
    counts of ``config``; :func:`mdarts.sizing.sized_config` sizes it to a parameter count."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__(config, vocab_size)
        self.encoder_layers = nn.ModuleList(_EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(_DecoderLayer(config) for _ in range(config.decoder_layers))

    def encoder_body(self, x: Tensor, op_ctx: OpContext) -> Tensor:
        return run_blocks(self.encoder_layers, x, op_ctx)

    def decoder_body(self, y: Tensor, op_ctx: OpContext) -> Tensor:
        return run_blocks(self.decoder_layers, y, op_ctx)


def iter_nodes(model: nn.Module) -> Iterator[Node]:
    """Every DARTS node of a supernet or derived network."""
    return (m for m in model.modules() if isinstance(m, Node))

"""Candidate operations of the DARTS Transformer search space (docs/design.md 1.1, 1.4).

Every op has one interface: ``op(h, ctx) -> y`` where ``h`` is the pooled hidden state
(batch, time, d_model), ``ctx`` an :class:`OpContext`, and ``y`` has the shape of ``h``.
Every op

* ignores what lies behind ``ctx.pad_mask``: padded inputs are zeroed before convolutions,
  padded keys are masked in attention, and outputs at padded positions are set to 0;
* with ``causal=True`` (decoder) never looks ahead: convolutions are left-padded, attention
  is causal;
* supports incremental decoding when ``ctx.state`` is set (see :class:`OpContext`), giving
  the same outputs as the full-sequence causal call; :func:`reorder_state` reindexes the
  cached batch for beam search.

Choices: the standard convolution is depthwise-separable (one w-tap filter per channel,
then a pointwise ``Linear(d, d)``), which keeps a w = 11 op at d * 11 + d * d weights
instead of d * d * 11. Every parametric op ends with dropout on its output (residual
dropout); FFN adds dropout after its ReLU, dynamic convolution drops kernel weights
(DropConnect), attention drops attention probabilities. Zero and identity have no
parameters; the LayerNorm of docs/design.md 1.1 wraps the parametric ops elsewhere.

The ops are known by name through one registry: :func:`register_op` adds an op with its
factory, the sides it is a candidate on and how its decoder form is causal, whether it has
weights, and the memory planner's formula of the bytes it saves for backward; the model and
the planner read those properties with :func:`op_spec`. A new op is one call, e.g.::

    register_op("linear", lambda d_model, causal, config, d_memory: MyLinear(d_model),
                lambda rows, seq_len, d_model, config, f: f * rows * d_model, causal="position-wise")

after which a search space (``ModelConfig.encoder_candidates``) may name it.
:data:`ENCODER_CANDIDATES` and :data:`DECODER_CANDIDATES` are the built-in ops.

Dropout (:class:`Dropout`, :func:`dropout`) is the counter-based
``mdarts_kernels.seeded_dropout``: a seed drawn from the CPU RNG per call, the mask rebuilt
from it in the backward, so autograd saves no mask and a reconstruction replays the same
mask from the restored RNG state. Attention probabilities use it too on the CPU (an
unfused attention when training); on CUDA they keep the fused dropout of
``F.scaled_dot_product_attention``, whose Philox state the reversible layers replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mdarts_kernels

from .config import DEFAULT_DECODER_CANDIDATES, DEFAULT_ENCODER_CANDIDATES, OP_NAMES, ModelConfig

CONV_WIDTHS: tuple[int, ...] = (3, 5, 7, 11)
DYNCONV_WIDTHS: tuple[int, ...] = (3, 7, 11, 15)


@dataclass
class OpContext:
    """What an op may read besides its input ``h`` (batch, time, d_model).

    Attributes:
        pad_mask: (batch, time) bool, True at padding positions of ``h``; None: no padding.
            In incremental decoding it covers the current chunk only.
        memory: (batch, src_time, d_memory) encoder output; read by cross-attention only.
        memory_pad_mask: (batch, src_time) bool, True at padding positions of ``memory``.
        state: incremental decoding state, a dict owned by the caller, one per decoding
            session (it may be shared by all ops of a model: each op keeps its tensors in a
            sub-dict under the key ``id(op)``). None: the call sees the whole sequence.
            When set, ``h`` (batch, t, d_model), usually t = 1, continues the prefix seen by
            the earlier calls with the same dict, and the op returns the outputs of the full
            causal call at those t positions.
    """

    pad_mask: Optional[Tensor] = None
    memory: Optional[Tensor] = None
    memory_pad_mask: Optional[Tensor] = None
    state: Optional[dict] = None


def reorder_state(state: dict, new_order: Tensor) -> None:
    """Reindex in place the batch dimension of every tensor cached in ``state``.

    Args:
        state: an :attr:`OpContext.state` dict (nested dicts are walked).
        new_order: (new_batch,) long; new entry i is old entry ``new_order[i]``. Repeated
            indices copy a hypothesis, as beam search needs.
    """
    for key, value in state.items():
        if isinstance(value, Tensor):
            state[key] = value.index_select(0, new_order.to(value.device))
        elif isinstance(value, dict):
            reorder_state(value, new_order)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``x`` with each element zeroed with probability p and the rest scaled by 1 / (1 - p)
    when training; ``x`` itself otherwise. Any shape. One seed is drawn from the CPU RNG."""
    if not training or p == 0.0:
        return x
    return mdarts_kernels.seeded_dropout(x, p, mdarts_kernels.draw_seed())


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout(p)`` built on :func:`dropout`: the same distribution of masks,
    nothing saved for the backward."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be a probability in [0, 1), got {p!r}")
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        """x (any shape) -> the same shape."""
        return dropout(x, self.p, self.training)


def _context(ctx: Optional[OpContext]) -> OpContext:
    """``ctx``, or an empty context (no padding, no memory, no state) when None."""
    return OpContext() if ctx is None else ctx


def _zero_padded(x: Tensor, pad_mask: Optional[Tensor]) -> Tensor:
    """``x`` (batch, time, d) with the rows where ``pad_mask`` (batch, time) is True set to 0."""
    if pad_mask is None:
        return x
    return x.masked_fill(pad_mask.unsqueeze(-1), 0.0)


def _check_positive(field: str, value: int) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is a positive int."""
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


def _check_heads(d_model: int, heads: int) -> None:
    """Raise ValueError unless ``heads`` is positive and divides ``d_model``."""
    _check_positive("heads", heads)
    if d_model % heads:
        raise ValueError(f"heads={heads} must divide d_model={d_model}")


def _check_width(width: int, causal: bool) -> None:
    """Raise ValueError unless ``width`` is positive, and odd when the op is not causal
    (a centred window needs (width - 1) / 2 positions on each side)."""
    _check_positive("width", width)
    if not causal and width % 2 == 0:
        raise ValueError(f"width={width} must be odd for a non-causal convolution")


class CandidateOp(nn.Module):
    """Base of all candidate ops: ``forward(h, ctx) -> tensor shaped like h``.

    Attributes:
        name: the op's name in the search space (e.g. "conv7").
        causal: True in the decoder (no look-ahead).
        mixes_time: True for ops whose output at t reads other positions (convolutions,
            self-attention); only these need ``causal=True`` for incremental decoding.
    """

    mixes_time: bool = False

    def __init__(self, name: str, causal: bool) -> None:
        super().__init__()
        self.name = name
        self.causal = causal

    def extra_repr(self) -> str:
        return f"name={self.name!r}, causal={self.causal}"

    def _op_state(self, ctx: OpContext) -> Optional[dict]:
        """This op's sub-dict of ``ctx.state`` (created on first use); None outside
        incremental decoding."""
        if ctx.state is None:
            return None
        if self.mixes_time and not self.causal:
            raise ValueError(f"{self.name}: incremental decoding needs causal=True")
        return ctx.state.setdefault(id(self), {})


def _extended_input(x: Tensor, width: int, causal: bool, op_state: Optional[dict]) -> Tensor:
    """Extend ``x`` (batch, t, d) along time so that output position i reads the window
    ``extended[:, i : i + width]``; returns (batch, t + width - 1, d).

    Full call: zero padding, width - 1 on the left when causal, (width - 1) / 2 on each
    side otherwise. Incremental (``op_state`` given): the last width - 1 inputs kept in
    ``op_state["history"]`` (zeros at the start) are prepended, then replaced by the
    newest width - 1.
    """
    if op_state is None:
        left = width - 1 if causal else (width - 1) // 2
        return F.pad(x, (0, 0, left, width - 1 - left))
    history = op_state.get("history")
    if history is None:
        history = x.new_zeros(x.shape[0], width - 1, x.shape[2])
    extended = torch.cat([history, x], dim=1)
    op_state["history"] = extended[:, extended.shape[1] - (width - 1) :]
    return extended


class StandardConv(CandidateOp):
    """Depthwise-separable w x 1 convolution over time: a depthwise ``Conv1d`` (one w-tap
    filter per channel), a pointwise ``Linear(d, d)``, dropout.

    Parameters: d * w + d (depthwise) + d * d + d (pointwise).
    """

    mixes_time = True

    def __init__(self, d_model: int, causal: bool, width: int, dropout: float = 0.1) -> None:
        super().__init__(f"conv{width}", causal)
        _check_positive("d_model", d_model)
        _check_width(width, causal)
        self.width = width
        self.depthwise = nn.Conv1d(d_model, d_model, width, groups=d_model)
        self.pointwise = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, h: Tensor, ctx: Optional[OpContext] = None) -> Tensor:
        """h (batch, time, d_model) -> (batch, time, d_model)."""
        ctx = _context(ctx)
        x = _extended_input(_zero_padded(h, ctx.pad_mask), self.width, self.causal, self._op_state(ctx))
        y = self.depthwise(x.transpose(1, 2)).transpose(1, 2)
        return _zero_padded(self.dropout(self.pointwise(y)), ctx.pad_mask)


class DynamicConv(CandidateOp):
    """Dynamic convolution (Wu et al. 2019) of width w over time.

    ``Linear(d, 2d)`` + GLU gives x; at every position a ``Linear(d, heads * w)`` of x
    predicts one kernel per head, softmax-normalised over the w taps, shared by the
    d / heads channels of that head and dropped with DropConnect; the kernels are applied
    to the w-window of x ending at (causal) or centred on the position; then
    ``Linear(d, d)`` and dropout. The window sum runs as w shifted products of the padded x
    with one tap of the kernels each: no (batch, time, d, w) window tensor is made, and
    autograd keeps only views of the padded x and of the kernels (memory O(batch * time * d)).
    """

    mixes_time = True

    def __init__(self, d_model: int, causal: bool, width: int, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__(f"dynconv{width}", causal)
        _check_heads(d_model, heads)
        _check_width(width, causal)
        self.width = width
        self.heads = heads
        self.weight_dropout = dropout
        self.input_proj = nn.Linear(d_model, 2 * d_model)
        self.kernel_proj = nn.Linear(d_model, heads * width)
        self.output_proj = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, h: Tensor, ctx: Optional[OpContext] = None) -> Tensor:
        """h (batch, time, d_model) -> (batch, time, d_model)."""
        ctx = _context(ctx)
        x = _zero_padded(F.glu(self.input_proj(h), dim=-1), ctx.pad_mask)
        time, d_model = x.shape[1], x.shape[2]
        extended = _extended_input(x, self.width, self.causal, self._op_state(ctx))
        extended = extended.unflatten(
            -1, (self.heads, d_model // self.heads)
        )  # (batch, time + w - 1, heads, d / heads)
        kernels = self._kernels(x)
        y = extended[:, :time] * kernels[..., 0, None]
        for tap in range(1, self.width):  # output position i reads extended[:, i + tap]
            y = y + extended[:, tap : tap + time] * kernels[..., tap, None]
        y = self.output_proj(y.flatten(-2))
        return _zero_padded(self.dropout(y), ctx.pad_mask)

    def _kernels(self, x: Tensor) -> Tensor:
        """x (batch, time, d_model) -> kernels (batch, time, heads, width), summing to 1
        over width before DropConnect."""
        logits = self.kernel_proj(x).unflatten(-1, (self.heads, self.width))
        return dropout(logits.softmax(dim=-1), self.weight_dropout, self.training)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(batch, time, d) -> (batch, heads, time, d / heads)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _visible_keys(
    key_pad: Optional[Tensor], q_len: int, k_len: int, causal: bool, device: torch.device
) -> Optional[Tensor]:
    """Which keys each query may see: bool (batch or 1, 1, q_len, k_len), None when all.

    The queries are the last ``q_len`` of the ``k_len`` positions (incremental decoding
    has a cached prefix of k_len - q_len). ``key_pad`` (batch, k_len) is True at padding.
    """
    visible = None
    if causal:
        query_pos = torch.arange(k_len - q_len, k_len, device=device)
        visible = (torch.arange(k_len, device=device) <= query_pos[:, None])[None, None]
    if key_pad is not None:
        keys = ~key_pad[:, None, None, :]
        visible = keys if visible is None else visible & keys
    return visible


def _attend(q: Tensor, k: Tensor, v: Tensor, visible: Optional[Tensor], dropout: float) -> Tensor:
    """Scaled dot-product attention with the heads merged back.

    q (batch, heads, q_len, d_head), k and v (batch, heads, k_len, d_head), ``visible`` from
    :func:`_visible_keys`; returns (batch, q_len, heads * d_head). A query that sees no key
    (a padded query at the start of a causal sequence, or an all-padding memory) yields 0
    instead of NaN.
    """
    blind = None if visible is None else ~visible.any(dim=-1, keepdim=True)
    mask = None if visible is None else visible | blind
    if dropout > 0.0 and q.device.type == "cpu":
        out = _attend_seeded_dropout(q, k, v, mask, p=dropout)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    if blind is not None:
        out = out.masked_fill(blind, 0.0)
    return out.transpose(1, 2).flatten(2)


def _attend_seeded_dropout(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    """softmax(q k^T / sqrt(d_head), keys where ``mask`` is False excluded) with seeded
    dropout on the probabilities, times v: (batch, heads, q_len, d_head). The CPU training
    path: there scaled_dot_product_attention falls back to its unfused form with torch's
    dropout, whose Bernoulli mask costs more than the attention itself at small widths and
    is saved for the backward."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return dropout(scores.softmax(dim=-1), p, True) @ v


def _extend_cache(op_state: dict, k: Tensor, v: Tensor, key_pad: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Append this chunk's keys and values (batch, heads, t, d_head) and key padding
    (batch, t) to the cache in ``op_state``; return the cached (batch, heads, P + t, d_head)
    keys, values and (batch, P + t) padding."""
    if key_pad is None:
        key_pad = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    if "k" in op_state:
        k = torch.cat([op_state["k"], k], dim=2)
        v = torch.cat([op_state["v"], v], dim=2)
        key_pad = torch.cat([op_state["key_pad"], key_pad], dim=1)
    op_state.update(k=k, v=v, key_pad=key_pad)
    return k, v, key_pad


class SelfAttention(CandidateOp):
    """Multi-head self-attention (``F.scaled_dot_product_attention``) with a key padding
    mask, causal in the decoder; ``Linear(d, 3d)`` for queries, keys and values,
    ``Linear(d, d)`` out, dropout on the attention probabilities and on the output."""

    mixes_time = True

    def __init__(self, d_model: int, causal: bool, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__("attention", causal)
        _check_heads(d_model, heads)
        self.heads = heads
        self.attn_dropout = dropout
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, h: Tensor, ctx: Optional[OpContext] = None) -> Tensor:
        """h (batch, time, d_model) -> (batch, time, d_model)."""
        ctx = _context(ctx)
        q, k, v = (_split_heads(x, self.heads) for x in self.qkv_proj(h).chunk(3, dim=-1))
        key_pad = ctx.pad_mask
        op_state = self._op_state(ctx)
        if op_state is not None:
            k, v, key_pad = _extend_cache(op_state, k, v, key_pad)
        visible = _visible_keys(key_pad, q.shape[2], k.shape[2], self.causal, h.device)
        y = _attend(q, k, v, visible, self.attn_dropout if self.training else 0.0)
        return _zero_padded(self.dropout(self.out_proj(y)), ctx.pad_mask)


class CrossAttention(CandidateOp):
    """Multi-head attention from ``h`` to ``ctx.memory`` (decoder), masking
    ``ctx.memory_pad_mask``; ``Linear(d, d)`` queries, ``Linear(d_memory, 2d)`` keys and
    values, ``Linear(d, d)`` out, dropout as in :class:`SelfAttention`. In incremental
    decoding the projected memory keys and values are computed once and cached."""

    def __init__(
        self, d_model: int, causal: bool, heads: int = 8, dropout: float = 0.1, d_memory: Optional[int] = None
    ) -> None:
        super().__init__("cross_attention", causal)
        _check_heads(d_model, heads)
        d_memory = d_model if d_memory is None else d_memory
        _check_positive("d_memory", d_memory)
        self.heads = heads
        self.attn_dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_memory, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, h: Tensor, ctx: Optional[OpContext] = None) -> Tensor:
        """h (batch, time, d_model), ctx.memory (batch, src_time, d_memory)
        -> (batch, time, d_model)."""
        ctx = _context(ctx)
        k, v, key_pad = self._memory_keys(ctx)
        q = _split_heads(self.q_proj(h), self.heads)
        visible = _visible_keys(key_pad, q.shape[2], k.shape[2], False, h.device)
        y = _attend(q, k, v, visible, self.attn_dropout if self.training else 0.0)
        return _zero_padded(self.dropout(self.out_proj(y)), ctx.pad_mask)

    def _memory_keys(self, ctx: OpContext) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Keys and values (batch, heads, src_time, d_head) projected from ctx.memory and
        its padding mask (batch, src_time) or None; taken from the cache when decoding
        incrementally after the first step."""
        op_state = self._op_state(ctx)
        if op_state is not None and "k" in op_state:
            return op_state["k"], op_state["v"], op_state.get("key_pad")
        if ctx.memory is None:
            raise ValueError("cross_attention needs ctx.memory (batch, src_time, d_memory)")
        k, v = (_split_heads(x, self.heads) for x in self.kv_proj(ctx.memory).chunk(2, dim=-1))
        key_pad = ctx.memory_pad_mask
        if op_state is not None:
            op_state.update(k=k, v=v)
            if key_pad is not None:
                op_state["key_pad"] = key_pad
        return k, v, key_pad


class FeedForward(CandidateOp):
    """Position-wise ``Linear(d, ffn_mult * d)`` - ReLU - dropout - ``Linear(ffn_mult * d, d)``
    - dropout."""

    def __init__(self, d_model: int, causal: bool, ffn_mult: int = 4, dropout: float = 0.1) -> None:
        super().__init__("ffn", causal)
        _check_positive("d_model", d_model)
        _check_positive("ffn_mult", ffn_mult)
        self.net = nn.Sequential(
            nn.Linear(d_model, ffn_mult * d_model),
            nn.ReLU(),
            Dropout(dropout),
            nn.Linear(ffn_mult * d_model, d_model),
            Dropout(dropout),
        )

    def forward(self, h: Tensor, ctx: Optional[OpContext] = None) -> Tensor:
        """h (batch, time, d_model) -> (batch, time, d_model)."""
        return _zero_padded(self.net(h), _context(ctx).pad_mask)


class GatedLinear(CandidateOp):
    """Position-wise gated linear unit: ``Linear(d, 2d)``, GLU, ``Linear(d, d)``, dropout."""

    def __init__(self, d_model: int, causal: bool, dropout: float = 0.1) -> None:
        super().__init__("glu", causal)
        _check_positive("d_model", d_model)
        self.in_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, h: Tensor, ctx: Optional[OpContext] = None) -> Tensor:
        """h (batch, time, d_model) -> (batch, time, d_model)."""
        y = self.dropout(self.out_proj(F.glu(self.in_proj(h), dim=-1)))
        return _zero_padded(y, _context(ctx).pad_mask)


class Zero(CandidateOp):
    """The "zero" op: no connection; returns zeros shaped like h."""

    def __init__(self, d_model: int, causal: bool) -> None:
        super().__init__("zero", causal)

    def forward(self, h: Tensor, ctx: Optional[OpContext] = None) -> Tensor:
        """h (batch, time, d_model) -> zeros (batch, time, d_model)."""
        return torch.zeros_like(h)


class Identity(CandidateOp):
    """The "identity" op (skip connection): returns h unchanged, padding included."""

    def __init__(self, d_model: int, causal: bool) -> None:
        super().__init__("identity", causal)

    def forward(self, h: Tensor, ctx: Optional[OpContext] = None) -> Tensor:
        """h (batch, time, d_model) -> h."""
        return h


# ----------------------------------------------------------------------------- the registry

SIDES: tuple[str, ...] = ("encoder", "decoder")
CAUSAL_FORMS: dict[str, str] = {
    "position-wise": "reads its own position only, so it is causal as it is",
    "left-padded": "a window of w positions ending at its own (w - 1 zeros on the left)",
    "masked": "attention whose mask hides the later keys",
    "memory": "reads the target at its own position only, and the encoder memory",
}

OpFactory = Callable[[int, bool, ModelConfig, Optional[int]], CandidateOp]
"""``factory(d_model, causal, config, d_memory)``: the op for input (batch, time, d_model),
with ``causal`` True on the decoder side, ``config`` the sizes the ops share (heads, dropout,
ffn_mult) and ``d_memory`` the width of the encoder memory (None: d_model)."""

SavedBytes = Callable[[int, int, int, ModelConfig, int], int]
"""``saved_bytes(rows, seq_len, d_model, config, f)``: bytes autograd saves inside the op for
backward on an input h of (rows = batch x seq_len, d_model), training mode, f bytes per
activation element; read by the memory planner (:mod:`mdarts.plan`). The op's input h, its
parameters and the encoder memory are not counted (they belong to the layer). Dropout (the
seeded one of this module) saves nothing; the attention probabilities' dropout inside
scaled_dot_product_attention does. The formulas of the built-in ops are
``saved_tensors_hooks`` counts, float32, CPU (tests/test_plan.py checks them)."""


@dataclass(frozen=True)
class OpSpec:
    """A candidate op of the registry; see :func:`register_op` for the fields."""

    name: str
    factory: OpFactory
    saved_bytes: Optional[SavedBytes]
    sides: tuple[str, ...]
    causal: Optional[str]
    parametric: bool
    skip: bool

    @property
    def connects(self) -> bool:
        """False for the op that cuts the connection (zero): derive never picks it."""
        return self.parametric or self.skip


_REGISTRY: dict[str, OpSpec] = {}


def register_op(
    name: str,
    factory: OpFactory,
    saved_bytes: Optional[SavedBytes] = None,
    *,
    sides: tuple[str, ...] = SIDES,
    causal: Optional[str] = None,
    parametric: bool = True,
    skip: bool = False,
) -> OpSpec:
    """Add the candidate op ``name`` to the registry, after the ops already there (the order
    of :func:`registered_ops`); a search space (``ModelConfig.encoder_candidates`` /
    ``decoder_candidates``) may then name it.

    Args:
        name: its name in search spaces and genotypes (e.g. "conv7").
        factory: builds the op, see :data:`OpFactory`.
        saved_bytes: the memory planner's formula, see :data:`SavedBytes`; required for a
            parametric op, none for a parameter-free one.
        sides: where it is a candidate: "encoder", "decoder" or both.
        causal: how its decoder form sees no later position, a key of :data:`CAUSAL_FORMS`;
            required on the decoder side.
        parametric: it has weights: a node builds it with ``factory`` and wraps it in a
            LayerNorm (docs/design.md 1.1). A parameter-free op is computed by the node
            itself, which saves nothing for it: with ``skip`` its input passed through
            (identity), else zero.
        skip: see ``parametric``.

    Raises:
        ValueError naming the op: the name is taken, the planner formula is missing (or given
        to a parameter-free op), a side or causal form is unknown, or a parametric op skips.
    """
    where = f"register_op({name!r})"
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_op: expected a non-empty op name, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"{where}: an op of that name is already registered (unregister_op it first)")
    if parametric and saved_bytes is None:
        raise ValueError(
            f"{where}: no saved_bytes, the memory planner's formula saved_bytes(rows, seq_len, d_model, config, f) "
            "of the bytes the op saves for backward (mdarts.plan needs it for every parametric op)"
        )
    if not parametric and saved_bytes is not None:
        raise ValueError(f"{where}: a parameter-free op is computed by the node, which saves nothing: no saved_bytes")
    if parametric and skip:
        raise ValueError(f"{where}: skip (the input passed through) is for a parameter-free op")
    if not sides or any(side not in SIDES for side in sides):
        raise ValueError(f"{where}: sides must be some of {', '.join(SIDES)}, got {sides!r}")
    if "decoder" in sides and causal not in CAUSAL_FORMS:
        raise ValueError(f"{where}: a decoder op needs causal, one of {', '.join(CAUSAL_FORMS)}; got {causal!r}")
    spec = OpSpec(name, factory, saved_bytes, tuple(sides), causal, parametric, skip)
    _REGISTRY[name] = spec
    for side in spec.sides:
        OP_NAMES[side][name] = None  # what ModelConfig accepts
    return spec


def unregister_op(name: str) -> None:
    """Remove op ``name`` from the registry (ValueError when it is not there)."""
    op_spec(name)
    del _REGISTRY[name]
    for names in OP_NAMES.values():
        names.pop(name, None)


def op_spec(name: str) -> OpSpec:
    """The registry's entry of op ``name``; ValueError listing the registered ops otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown candidate op {name!r}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def registered_ops(side: Optional[str] = None) -> tuple[str, ...]:
    """The registered op names in registration order: all, or those of ``side`` ("encoder" or "decoder")."""
    return tuple(name for name, spec in _REGISTRY.items() if side is None or side in spec.sides)


def parameter_free_ops() -> tuple[str, ...]:
    """The registered ops without weights (zero, identity), in registration order."""
    return tuple(name for name, spec in _REGISTRY.items() if not spec.parametric)


def build_candidate(
    name: str, d_model: int, causal: bool, config: ModelConfig, d_memory: Optional[int] = None
) -> CandidateOp:
    """Build the registered candidate op called ``name`` with its factory.

    Args:
        name: op name, e.g. "conv7", "dynconv15", "attention", "cross_attention".
        d_model: feature size d of the op's input and output.
        causal: True in the decoder (no look-ahead).
        config: the sizes the ops share: ``heads`` (attention heads, and kernel-sharing channel
            groups of dynamic convolutions; must divide d_model for those ops), ``dropout``
            and ``ffn_mult`` (hidden size of "ffn" as a multiple of d_model).
        d_memory: feature size of the encoder memory read by cross-attention (default d_model).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names) or bad sizes.
    """
    return op_spec(name).factory(d_model, causal, config, d_memory)


# ----------------------------------------------------------------------------- the built-in ops


def _conv(width: int, d_model: int, causal: bool, config: ModelConfig, d_memory: Optional[int]) -> StandardConv:
    """The :data:`OpFactory` of "conv<width>": (batch, time, d_model) -> (batch, time, d_model)."""
    return StandardConv(d_model, causal, width, config.dropout)


def _dynconv(width: int, d_model: int, causal: bool, config: ModelConfig, d_memory: Optional[int]) -> DynamicConv:
    """The :data:`OpFactory` of "dynconv<width>": (batch, time, d_model) -> (batch, time, d_model)."""
    return DynamicConv(d_model, causal, width, config.heads, config.dropout)


def _conv_saved_bytes(width: int, rows: int, seq_len: int, d_model: int, config: ModelConfig, f: int) -> int:
    """Padded input (seq_len + w - 1 rows a sequence), depthwise output."""
    return f * (2 * rows * d_model + (rows // seq_len) * (width - 1) * d_model)


def _dynconv_saved_bytes(width: int, rows: int, seq_len: int, d_model: int, config: ModelConfig, f: int) -> int:
    """GLU input (2d) and output (d), the output padded along time (w - 1 more rows a
    sequence), kernels before and after DropConnect (heads x w each), output projection."""
    return f * (rows * (5 * d_model + 2 * config.heads * width) + (rows // seq_len) * (width - 1) * d_model)


def _attention_saved_bytes(rows: int, seq_len: int, d_model: int, config: ModelConfig, f: int) -> int:
    """q, k, v, attention output; probabilities before and after dropout (heads x seq_len a
    row); the (causal) key mask and the rows that see no key, as bytes."""
    return f * (4 * rows * d_model + 2 * rows * config.heads * seq_len) + rows * seq_len + rows


def _cross_attention_saved_bytes(rows: int, seq_len: int, d_model: int, config: ModelConfig, f: int) -> int:
    """q, output; keys and values of the source (as many rows as the target); probabilities
    before and after dropout; the source key mask and the sequences that see no key, as bytes."""
    return f * (2 * rows * d_model + 2 * rows * d_model + 2 * rows * config.heads * seq_len) + rows + rows // seq_len


def _register_builtin_ops() -> None:
    """The search space of docs/design.md 1.4, in the order of ``ModelConfig``'s default candidates."""
    for width in CONV_WIDTHS:
        register_op(f"conv{width}", partial(_conv, width), partial(_conv_saved_bytes, width), causal="left-padded")
    for width in DYNCONV_WIDTHS:
        register_op(
            f"dynconv{width}", partial(_dynconv, width), partial(_dynconv_saved_bytes, width), causal="left-padded"
        )
    register_op(
        "attention",
        lambda d_model, causal, config, d_memory: SelfAttention(d_model, causal, config.heads, config.dropout),
        _attention_saved_bytes,
        causal="masked",
    )
    register_op(
        "ffn",
        lambda d_model, causal, config, d_memory: FeedForward(d_model, causal, config.ffn_mult, config.dropout),
        lambda rows, seq_len, d_model, config, f: f * rows * d_model * 2 * config.ffn_mult,  # the hidden layer
        causal="position-wise",
    )
    register_op(
        "glu",
        lambda d_model, causal, config, d_memory: GatedLinear(d_model, causal, config.dropout),
        lambda rows, seq_len, d_model, config, f: f * rows * d_model * 3,  # GLU input (2d) and output (d)
        causal="position-wise",
    )
    register_op(
        "zero",
        lambda d_model, causal, config, d_memory: Zero(d_model, causal),
        causal="position-wise",
        parametric=False,
    )
    register_op(
        "identity",
        lambda d_model, causal, config, d_memory: Identity(d_model, causal),
        causal="position-wise",
        parametric=False,
        skip=True,
    )
    register_op(
        "cross_attention",
        lambda d_model, causal, config, d_memory: CrossAttention(
            d_model, causal, config.heads, config.dropout, d_memory
        ),
        _cross_attention_saved_bytes,
        sides=("decoder",),
        causal="memory",
    )


_register_builtin_ops()

ENCODER_CANDIDATES: tuple[str, ...] = registered_ops("encoder")
"""The built-in encoder ops (13), ``ModelConfig``'s default encoder search space."""
DECODER_CANDIDATES: tuple[str, ...] = registered_ops("decoder")
"""The built-in decoder ops (14): the encoder's made causal, and cross-attention."""
PARAMETRIC: frozenset[str] = frozenset(DECODER_CANDIDATES) - set(parameter_free_ops())
"""The built-in ops with weights (of any registered op: ``op_spec(name).parametric``)."""
DECODER_FIXED_OP = "cross_attention"
"""The op of the fixed last part of every decoder layer (docs/design.md 1.2)."""


def _check_default_candidates() -> None:
    """Raise RuntimeError unless every op of ModelConfig's default search space is registered
    on its side: ModelConfig names its defaults as plain data and looks up only other ops."""
    defaults = {"encoder": DEFAULT_ENCODER_CANDIDATES, "decoder": DEFAULT_DECODER_CANDIDATES}
    missing = [f"{op} ({side})" for side, ops in defaults.items() for op in ops if op not in registered_ops(side)]
    if missing:
        raise RuntimeError(f"mdarts.ops: ModelConfig's default candidates are not registered: {', '.join(missing)}")


_check_default_candidates()

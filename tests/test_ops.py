"""Tests of the candidate ops (mdarts.ops): shapes, padding, causality, incremental
decoding and beam reordering, the registries and the factory."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from helpers import TOLERANCES
from torch import Tensor

from mdarts.config import ModelConfig
from mdarts.memory import saved_tensor_bytes
from mdarts.ops import (
    DECODER_CANDIDATES,
    ENCODER_CANDIDATES,
    PARAMETRIC,
    Dropout,
    FeedForward,
    OpContext,
    build_candidate,
    op_spec,
    parameter_free_ops,
    register_op,
    registered_ops,
    reorder_state,
    unregister_op,
)

D, D_MEM, HEADS, BATCH, TIME, SRC_TIME = 16, 24, 4, 2, 10, 7
SIZES = ModelConfig(d_model=D, heads=HEADS, dropout=0.1)  # the heads, dropout and FFN width of the ops


def make_op(name: str, causal: bool, train: bool = False) -> torch.nn.Module:
    """A small op with fixed weights, in eval mode unless ``train``."""
    torch.manual_seed(0)
    op = build_candidate(name, D, causal, SIZES, d_memory=D_MEM)
    return op.train(train)


def inputs(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """h (BATCH, TIME, D), memory (BATCH, SRC_TIME, D_MEM), memory padding (BATCH, SRC_TIME)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(BATCH, TIME, D, generator=gen)
    memory = torch.randn(BATCH, SRC_TIME, D_MEM, generator=gen)
    memory_pad = torch.zeros(BATCH, SRC_TIME, dtype=torch.bool)
    memory_pad[1, -3:] = True
    return h, memory, memory_pad


def right_padding() -> Tensor:
    """(BATCH, TIME) bool: sequence 1 has its last 3 positions padded."""
    pad = torch.zeros(BATCH, TIME, dtype=torch.bool)
    pad[1, -3:] = True
    return pad


def mixed_padding() -> Tensor:
    """(BATCH, TIME) bool: padding at the end, at the start and in the middle."""
    pad = right_padding()
    pad[0, :2] = True
    pad[0, 5] = True
    return pad


def context(
    memory: Tensor, memory_pad: Tensor, pad: Optional[Tensor] = None, state: Optional[dict] = None
) -> OpContext:
    return OpContext(pad_mask=pad, memory=memory, memory_pad_mask=memory_pad, state=state)


ENCODER_OPS = [(name, False) for name in ENCODER_CANDIDATES]
DECODER_OPS = [(name, True) for name in DECODER_CANDIDATES]
ALL_OPS = ENCODER_OPS + DECODER_OPS


def op_id(case: tuple[str, bool]) -> str:
    name, causal = case
    return f"{name}-{'dec' if causal else 'enc'}"


@pytest.mark.parametrize("case", ALL_OPS, ids=op_id)
def test_op_keeps_shape_and_name(case: tuple[str, bool]) -> None:
    name, causal = case
    op = make_op(name, causal, train=True)
    h, memory, memory_pad = inputs()
    out = op(h, context(memory, memory_pad, mixed_padding()))
    assert op.name == name
    assert out.shape == h.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", ALL_OPS, ids=op_id)
def test_padded_inputs_do_not_change_unpadded_outputs(case: tuple[str, bool]) -> None:
    name, causal = case
    op = make_op(name, causal)
    h, memory, memory_pad = inputs()
    pad = mixed_padding()
    noisy_h = h + 100.0 * torch.randn_like(h) * pad.unsqueeze(-1)
    noisy_memory = memory + 100.0 * torch.randn_like(memory) * memory_pad.unsqueeze(-1)
    out = op(h, context(memory, memory_pad, pad))
    noisy_out = op(noisy_h, context(noisy_memory, memory_pad, pad))
    keep = ~pad
    torch.testing.assert_close(noisy_out[keep], out[keep])
    if name in PARAMETRIC:
        assert (out[pad] == 0).all()


@pytest.mark.parametrize("case", DECODER_OPS, ids=op_id)
def test_decoder_op_does_not_look_ahead(case: tuple[str, bool]) -> None:
    name, causal = case
    op = make_op(name, causal)
    h, memory, memory_pad = inputs()
    cut = 4
    future_changed = h.clone()
    future_changed[:, cut:] += 100.0 * torch.randn_like(h[:, cut:])
    out = op(h, context(memory, memory_pad, right_padding()))
    changed_out = op(future_changed, context(memory, memory_pad, right_padding()))
    torch.testing.assert_close(changed_out[:, :cut], out[:, :cut])


def decode(
    op: torch.nn.Module,
    h: Tensor,
    memory: Tensor,
    memory_pad: Tensor,
    pad: Tensor,
    chunks: list[int],
    state: Optional[dict] = None,
) -> Tensor:
    """Run ``op`` incrementally over ``h`` (batch, sum(chunks), d) in chunks of the given
    lengths; return the concatenated outputs."""
    state = {} if state is None else state
    outputs, start = [], 0
    for length in chunks:
        step = slice(start, start + length)
        outputs.append(op(h[:, step], context(memory, memory_pad, pad[:, step], state)))
        start += length
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("chunks", [[1] * TIME, [4, 1, 5]], ids=["steps", "chunks"])
@pytest.mark.parametrize("case", DECODER_OPS, ids=op_id)
def test_incremental_decoding_matches_full_causal_call(case: tuple[str, bool], chunks: list[int]) -> None:
    name, causal = case
    op = make_op(name, causal)
    h, memory, memory_pad = inputs()
    pad = right_padding()
    full = op(h, context(memory, memory_pad, pad))
    with torch.no_grad():
        stepped = decode(op, h, memory, memory_pad, pad, chunks)
    torch.testing.assert_close(stepped, full, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("new_order", [[1, 0], [1, 1]], ids=["swap", "repeat"])
@pytest.mark.parametrize("case", DECODER_OPS, ids=op_id)
def test_reorder_state_follows_the_new_batch_order(case: tuple[str, bool], new_order: list[int]) -> None:
    name, causal = case
    op = make_op(name, causal)
    h, memory, memory_pad = inputs()
    pad = torch.zeros(BATCH, TIME, dtype=torch.bool)
    order = torch.tensor(new_order)
    expected = op(h[order], context(memory[order], memory_pad[order], pad))
    state: dict = {}
    with torch.no_grad():
        prefix = decode(op, h[:, :2], memory, memory_pad, pad, [1, 1], state)
        reorder_state(state, order)
        later = [1] * (TIME - 2)
        rest = decode(op, h[order, 2:], memory[order], memory_pad[order], pad, later, state)
    stepped = torch.cat([prefix[order], rest], dim=1)
    torch.testing.assert_close(stepped, expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", ["attention", "cross_attention"])
def test_attention_without_visible_keys_is_finite_and_ignores_padding(name: str) -> None:
    op = make_op(name, causal=True)
    h, memory, _ = inputs()
    h.requires_grad_(True)
    pad = right_padding()
    pad[0, 0] = True
    memory_pad = torch.zeros(BATCH, SRC_TIME, dtype=torch.bool)
    memory_pad[0] = True
    out = op(h, context(memory, memory_pad, pad))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(h.grad).all()
    assert (out[0, 0] == 0).all()
    noisy_out = op(h, context(memory + 100.0 * torch.randn_like(memory), memory_pad, pad))
    torch.testing.assert_close(noisy_out[0], out[0])


@pytest.mark.parametrize("name", sorted(PARAMETRIC))
def test_every_parameter_gets_a_gradient(name: str) -> None:
    op = make_op(name, causal=True, train=True)
    h, memory, memory_pad = inputs()
    op(h, context(memory, memory_pad, right_padding())).pow(2).sum().backward()
    for param_name, param in op.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", ["conv3", "dynconv7", "attention"])
def test_incremental_decoding_needs_a_causal_op(name: str) -> None:
    op = make_op(name, causal=False)
    h, memory, memory_pad = inputs()
    with pytest.raises(ValueError, match="causal"):
        op(h[:, :1], context(memory, memory_pad, state={}))


def test_cross_attention_needs_memory() -> None:
    op = make_op("cross_attention", causal=True)
    with pytest.raises(ValueError, match="memory"):
        op(torch.randn(BATCH, TIME, D), OpContext())


def test_unknown_op_name_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="'conv4'") as error:
        build_candidate("conv4", D, False, SIZES)
    assert all(name in str(error.value) for name in DECODER_CANDIDATES)


@pytest.mark.parametrize("name", ["attention", "dynconv3", "cross_attention"])
def test_heads_must_divide_d_model(name: str) -> None:
    with pytest.raises(ValueError, match="heads"):
        build_candidate(name, 18, True, SIZES)


def test_search_space_counts() -> None:
    assert len(ENCODER_CANDIDATES) == len(set(ENCODER_CANDIDATES)) == 13
    assert len(DECODER_CANDIDATES) == len(set(DECODER_CANDIDATES)) == 14
    assert set(DECODER_CANDIDATES) - set(ENCODER_CANDIDATES) == {"cross_attention"}
    assert PARAMETRIC == set(DECODER_CANDIDATES) - {"zero", "identity"}


def test_the_registry_describes_the_built_in_ops() -> None:
    assert registered_ops("encoder") == ENCODER_CANDIDATES and registered_ops("decoder") == DECODER_CANDIDATES
    assert registered_ops() == DECODER_CANDIDATES
    assert parameter_free_ops() == ("zero", "identity")
    assert [name for name in DECODER_CANDIDATES if op_spec(name).skip] == ["identity"]
    assert [name for name in DECODER_CANDIDATES if not op_spec(name).connects] == ["zero"]
    assert op_spec("cross_attention").sides == ("decoder",) and op_spec("cross_attention").causal == "memory"
    assert {op_spec(f"conv{w}").causal for w in (3, 5, 7, 11)} == {"left-padded"}
    assert ModelConfig().encoder_candidates == ENCODER_CANDIDATES
    assert ModelConfig().decoder_candidates == DECODER_CANDIDATES


def _ffn(d_model: int, causal: bool, config: ModelConfig, d_memory: Optional[int]) -> FeedForward:
    """(batch, time, d_model) -> (batch, time, d_model)."""
    return FeedForward(d_model, causal, config.ffn_mult, config.dropout)


def _ffn_saved_bytes(rows: int, seq_len: int, d_model: int, config: ModelConfig, f: int) -> int:
    return f * rows * d_model * 2 * config.ffn_mult


@pytest.mark.parametrize(
    "name,args,options,message",
    [
        ("wide_ffn", (_ffn,), dict(causal="position-wise"), r"register_op\('wide_ffn'\): no saved_bytes"),
        ("ffn", (_ffn, _ffn_saved_bytes), dict(causal="position-wise"), r"'ffn'.*already registered"),
        ("wide_ffn", (_ffn, _ffn_saved_bytes), {}, r"'wide_ffn'.*a decoder op needs causal"),
        ("wide_ffn", (_ffn, _ffn_saved_bytes), dict(causal="sideways"), r"'wide_ffn'.*one of position-wise"),
        ("wide_ffn", (_ffn, _ffn_saved_bytes), dict(sides=("middle",)), r"'wide_ffn'.*sides"),
        ("nothing", (_ffn, _ffn_saved_bytes), dict(causal="position-wise", parametric=False), "saves nothing"),
        ("wide_ffn", (_ffn, _ffn_saved_bytes), dict(causal="position-wise", skip=True), "parameter-free"),
    ],
)
def test_a_bad_registration_raises_naming_the_op(name: str, args: tuple, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        register_op(name, *args, **options)
    assert registered_ops() == DECODER_CANDIDATES  # nothing was added


def test_an_unknown_op_is_refused_by_the_config_and_the_registry_when_gone() -> None:
    register_op("wide_ffn", _ffn, _ffn_saved_bytes, sides=("encoder",))
    try:
        config = ModelConfig(encoder_candidates=("wide_ffn", "ffn"))
        assert type(build_candidate("wide_ffn", D, False, config)) is FeedForward
        with pytest.raises(ValueError, match=r"ModelConfig.decoder_candidates: unknown op\(s\) wide_ffn"):
            ModelConfig(decoder_candidates=("wide_ffn", "ffn"))  # an encoder-only op
    finally:
        unregister_op("wide_ffn")
    with pytest.raises(ValueError, match=r"ModelConfig.encoder_candidates: unknown op\(s\) wide_ffn; valid: conv3"):
        ModelConfig(encoder_candidates=("wide_ffn", "ffn"))
    with pytest.raises(ValueError, match="unknown candidate op 'wide_ffn'"):
        unregister_op("wide_ffn")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("width", [3, 7])
def test_dynamic_conv_applies_each_position_its_kernel_over_its_window(causal: bool, width: int) -> None:
    """The shifted-product sum against the window formula written out: unfold the padded
    GLU output, weight each window by the position's kernel; forward and backward, float64."""
    op = make_op(f"dynconv{width}", causal).double()
    h = inputs()[0].double().requires_grad_()

    def windowed(h: Tensor) -> Tensor:
        x = torch.nn.functional.glu(op.input_proj(h), dim=-1)
        left = width - 1 if causal else (width - 1) // 2
        windows = torch.nn.functional.pad(x, (0, 0, left, width - 1 - left)).unfold(1, width, 1)
        windows = windows.reshape(BATCH, TIME, HEADS, D // HEADS, width)
        kernels = op.kernel_proj(x).unflatten(-1, (HEADS, width)).softmax(-1)
        return op.output_proj(torch.einsum("bthcw,bthw->bthc", windows, kernels).flatten(-2))

    grad = torch.randn(BATCH, TIME, D, dtype=torch.float64)
    got, want = op(h), windowed(h)
    torch.testing.assert_close(got, want)
    params = [h, *op.parameters()]
    for g, w in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad), strict=True):
        torch.testing.assert_close(g, w)


def test_conv_is_depthwise_separable() -> None:
    op = build_candidate("conv11", D, False, SIZES)
    assert sum(p.numel() for p in op.parameters()) == D * 11 + D + D * D + D


def test_dropout_module_follows_manual_seed_and_saves_nothing():
    x = torch.randn(6, 40, requires_grad=True)
    layer = Dropout(0.3).train()
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the next call draws a new seed
    kept = first != 0
    assert 0.5 < kept.float().mean().item() < 0.9
    torch.testing.assert_close(first[kept], x[kept] / 0.7)
    assert saved_tensor_bytes(lambda: layer(x), [x]) == 0
    assert saved_tensor_bytes(lambda: torch.nn.Dropout(0.3)(x), [x]) > 0  # torch's keeps its mask


def test_dropout_module_is_identity_in_eval_and_checks_p():
    x = torch.randn(3, 4)
    assert Dropout(0.5).eval()(x) is x
    with pytest.raises(ValueError, match=r"Dropout: p must be a probability in \[0, 1\), got 1.0"):
        Dropout(1.0)


@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (True, True), (False, True)])
def test_cpu_training_attention_matches_fused_attention(causal, padded):
    """The unfused CPU path (seeded dropout on the probabilities) equals
    scaled_dot_product_attention when almost nothing is dropped, masks and blind rows included,
    and differs from it with p = 0.5."""
    from mdarts.ops import _attend, _visible_keys

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=gen) for _ in range(3))
    key_pad = torch.zeros(2, 6, dtype=torch.bool)
    if padded:
        key_pad[0, :] = True  # a sequence with no visible key at all
        key_pad[1, 4:] = True
    visible = _visible_keys(key_pad if padded else None, 6, 6, causal, q.device)
    fused = _attend(q, k, v, visible, 0.0)
    unfused = _attend(q, k, v, visible, 1e-9)
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    dropped = _attend(q, k, v, visible, 0.5)
    assert not torch.allclose(dropped, fused, atol=1e-3)

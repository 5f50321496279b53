"""Tests of mdarts.reversible: the three memory modes agree, memory does not grow with depth
in "reconstruct", the layers invert, and bad input fails early with a clear error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES
from torch import Tensor, nn

import mdarts_kernels
from mdarts.memory import saved_tensor_bytes
from mdarts.reversible import ReversibleLayer, ReversibleSequence, reconstruction_error

D = 12
BATCH, TIME, SRC_TIME = 2, 5, 4
# rtol of a whole stack's output and gradients against "store" (up to 12 layers recomputed)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


class FeedForward(nn.Module):
    """h (batch, time, dim) -> Dropout(GELU(Linear(LayerNorm(h)))), zero at padded positions."""

    def __init__(self, dim: int, p: float = 0.2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(p)

    def forward(self, h: Tensor, pad_mask: Optional[Tensor] = None, memory: Optional[Tensor] = None) -> Tensor:
        out = self.dropout(F.gelu(self.linear(self.norm(h))))
        return out if pad_mask is None else out.masked_fill(pad_mask.unsqueeze(-1), 0.0)


class CrossAttention(nn.Module):
    """LayerNorm(h) (batch, time, dim) attends to memory (batch, src_time, D); dropout on the weights."""

    def __init__(self, dim: int, p: float = 0.2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(D, dim, bias=False)  # a key bias has an exactly zero gradient (softmax shift)
        self.value = nn.Linear(D, dim)
        self.dropout = nn.Dropout(p)

    def forward(self, h: Tensor, pad_mask: Optional[Tensor] = None, memory: Optional[Tensor] = None) -> Tensor:
        scores = self.query(self.norm(h)) @ self.key(memory).transpose(1, 2) / h.shape[-1] ** 0.5
        out = self.dropout(scores.softmax(-1)) @ self.value(memory)
        return out if pad_mask is None else out.masked_fill(pad_mask.unsqueeze(-1), 0.0)


class Coupled(FeedForward):
    """A FeedForward that also does the coupling itself, as a fused DARTS node does."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.coupled_calls = 0

    def coupled(self, x: Tensor, h: Tensor, sign: float, **ctx: Tensor) -> Tensor:
        self.coupled_calls += 1
        acc = torch.promote_types(x.dtype, torch.float32)
        return (x.to(acc) + sign * self(h, **ctx).to(acc)).to(x.dtype)


def make_layers(
    n: int, depth: int, dtype: torch.dtype = torch.float64, pool: str = "max", seed: int = 0
) -> list[ReversibleLayer]:
    """depth layers of n fns; the last fn of each layer is cross-attention, the others FFNs."""
    torch.manual_seed(seed)
    layers = [
        ReversibleLayer([FeedForward(D // n) for _ in range(n - 1)] + [CrossAttention(D // n)], pool=pool)
        for _ in range(depth)
    ]
    return [layer.to(dtype) for layer in layers]


def make_inputs(dtype: torch.dtype, x_grad: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """x (BATCH, TIME, D) and ctx: memory (BATCH, SRC_TIME, D) requiring grad, a padding mask."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, TIME, D, dtype=dtype, generator=generator).requires_grad_(x_grad)
    memory = torch.randn(BATCH, SRC_TIME, D, dtype=dtype, generator=generator).requires_grad_()
    pad_mask = torch.zeros(BATCH, TIME, dtype=torch.bool)
    pad_mask[1, -2:] = True
    return x, {"memory": memory, "pad_mask": pad_mask}


def run(
    layers: list[ReversibleLayer], mode: str, x: Tensor, ctx: dict[str, Tensor], seed: int = 2
) -> tuple[Tensor, list[Tensor]]:
    """Output and gradients of a weighted sum of it w.r.t. x (if it requires grad), memory and all parameters."""
    sequence = ReversibleSequence(layers, mode=mode)
    torch.manual_seed(seed)
    y = sequence(x, **ctx)
    weights = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).view_as(y)
    inputs = ([x] if x.requires_grad else []) + [ctx["memory"], *sequence.parameters()]
    return y, list(torch.autograd.grad((y * weights).sum(), inputs))


def assert_tensors_close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """Whole tensors equal within rtol, with an absolute floor of rtol times expected's largest entry."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("depth", [1, 4, 12])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint"])
def test_gradients_match_store_with_dropout_mask_and_context(mode: str, n: int, depth: int, dtype: torch.dtype) -> None:
    layers = make_layers(n, depth, dtype)
    x, ctx = make_inputs(dtype)
    y_ref, grads_ref = run(layers, "store", x, ctx)
    rng_after_store = torch.get_rng_state()
    y, grads = run(layers, mode, x, ctx)
    assert torch.equal(torch.get_rng_state(), rng_after_store), "the recomputation must leave the global RNG alone"
    rtol = TOLERANCE[dtype]
    assert_tensors_close(y, y_ref, rtol)
    assert len(grads) == len(grads_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_tensors_close(grad, grad_ref, rtol)


def test_dropout_is_on_in_the_compared_runs() -> None:
    layers = make_layers(2, 2)
    x, ctx = make_inputs(torch.float64)
    assert not torch.equal(run(layers, "store", x, ctx, seed=2)[0], run(layers, "store", x, ctx, seed=3)[0])


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint"])
def test_backward_fills_grad_like_store_with_mean_pool(mode: str) -> None:
    layers = make_layers(3, 4, pool="mean")
    x, ctx = make_inputs(torch.float64)
    results = []
    for run_mode in ("store", mode):
        sequence = ReversibleSequence(layers, mode=run_mode)
        sequence.zero_grad(set_to_none=True)
        x.grad = ctx["memory"].grad = None
        torch.manual_seed(5)
        sequence(x, **ctx).square().sum().backward()
        results.append([x.grad, ctx["memory"].grad] + [p.grad for p in sequence.parameters()])
    for grad, grad_ref in zip(*results[::-1]):
        assert_tensors_close(grad, grad_ref, TOLERANCE[torch.float64])


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint", "store"])
def test_parameters_get_gradients_when_x_does_not_require_grad(mode: str) -> None:
    layers = make_layers(2, 3)
    x, ctx = make_inputs(torch.float64, x_grad=False)
    _, grads_ref = run(layers, "store", x, ctx)
    _, grads = run(layers, mode, x, ctx)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_tensors_close(grad, grad_ref, TOLERANCE[torch.float64])


def run_without_memory(
    layers: list[ReversibleLayer], mode: str, x: Tensor, ctx: dict[str, Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """Output and gradients of sum(sin(y)) w.r.t. x and all parameters."""
    sequence = ReversibleSequence(layers, mode=mode)
    torch.manual_seed(2)
    y = sequence(x, **ctx)
    return y, list(torch.autograd.grad(y.sin().sum(), [x, *sequence.parameters()]))


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint"])
def test_fused_coupling_protocol_is_used_and_matches_store(mode: str) -> None:
    torch.manual_seed(0)
    layers = [ReversibleLayer([Coupled(D // 2), Coupled(D // 2)]).double() for _ in range(3)]
    x, ctx = make_inputs(torch.float64)
    ctx.pop("memory")
    _, grads_ref = run_without_memory(layers, "store", x, ctx)
    calls_before = sum(fn.coupled_calls for layer in layers for fn in layer.fns)
    _, grads = run_without_memory(layers, mode, x, ctx)
    # forward and recomputation both go through coupled: 2 calls per fn
    assert sum(fn.coupled_calls for layer in layers for fn in layer.fns) - calls_before == 2 * 6
    for grad, grad_ref in zip(grads, grads_ref):
        assert_tensors_close(grad, grad_ref, TOLERANCE[torch.float64])


@dataclass
class Context:
    """Context held in a dataclass, as mdarts.candidates.OpContext holds it."""

    memory: Tensor
    pad_mask: Optional[Tensor] = None


class ContextReader(CrossAttention):
    """CrossAttention that reads its context from a :class:`Context`."""

    def forward(self, h: Tensor, context: Context) -> Tensor:
        return super().forward(h, pad_mask=context.pad_mask, memory=context.memory)


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint"])
def test_tensors_inside_a_dataclass_context_get_gradients(mode: str) -> None:
    torch.manual_seed(0)
    layers = [ReversibleLayer([ContextReader(D // 2), ContextReader(D // 2)]).double() for _ in range(3)]
    x, ctx = make_inputs(torch.float64)
    results = []
    for run_mode in ("store", mode):
        sequence = ReversibleSequence(layers, mode=run_mode)
        torch.manual_seed(2)
        y = sequence(x, context=Context(ctx["memory"], ctx["pad_mask"]))
        results.append(torch.autograd.grad(y.sin().sum(), [x, ctx["memory"], *sequence.parameters()]))
    for grad, grad_ref in zip(results[1], results[0]):
        assert_tensors_close(grad, grad_ref, TOLERANCE[torch.float64])


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint"])
def test_layers_with_different_numbers_of_splits(mode: str) -> None:
    layers = [make_layers(n, 1, seed=n)[0] for n in (2, 3, 4, 3)]
    x, ctx = make_inputs(torch.float64)
    y_ref, grads_ref = run(layers, "store", x, ctx)
    y, grads = run(layers, mode, x, ctx)
    assert_tensors_close(y, y_ref, TOLERANCE[torch.float64])
    for grad, grad_ref in zip(grads, grads_ref):
        assert_tensors_close(grad, grad_ref, TOLERANCE[torch.float64])


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint"])
def test_bf16_autocast_matches_store_loosely(mode: str) -> None:
    layers = make_layers(2, 4, torch.float32)
    x, ctx = make_inputs(torch.float32)
    results = []
    for run_mode in ("store", mode):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sequence = ReversibleSequence(layers, mode=run_mode)
            torch.manual_seed(2)
            y = sequence(x, **ctx)
        # backward outside autocast: the recomputation must re-enter it by itself
        results.append((y, torch.autograd.grad(y.square().sum(), [x, ctx["memory"], *sequence.parameters()])))
    (y_ref, grads_ref), (y, grads) = results
    assert y.dtype == torch.float32
    assert_tensors_close(y, y_ref, 1e-6)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_tensors_close(grad, grad_ref, TOLERANCES[torch.bfloat16]["rtol"])


class BackendRecorder(FeedForward):
    """A FeedForward that records the kernel backend in force at every call."""

    def __init__(self, dim: int, seen: list[str]) -> None:
        super().__init__(dim)
        self.seen = seen

    def forward(self, h: Tensor, **ctx: Tensor) -> Tensor:
        self.seen.append(mdarts_kernels.current_backend())
        return super().forward(h, **ctx)


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint"])
def test_recomputation_runs_under_the_forward_backend(mode: str) -> None:
    seen: list[str] = []
    sequence = ReversibleSequence(
        [ReversibleLayer([BackendRecorder(D // 2, seen) for _ in range(2)]) for _ in range(2)], mode=mode
    )
    with mdarts_kernels.use_backend("reference"):
        y = sequence(torch.randn(BATCH, TIME, D))
    y.sum().backward()
    assert len(seen) == 8 and set(seen) == {"reference"}


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_inverse_of_forward_is_the_input(n: int, pool: str) -> None:
    layer = make_layers(n, 1, pool=pool)[0].eval()
    x, ctx = make_inputs(torch.float64)
    with torch.no_grad():
        y = layer(x, **ctx)
        rebuilt = layer.inverse(y, **ctx)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(rebuilt, x, rtol=0, atol=1e-13)


def test_reconstruction_error_over_depth_1_to_32_in_fp32() -> None:
    layers = make_layers(3, 32, torch.float32)
    x, ctx = make_inputs(torch.float32)
    rng_before = torch.get_rng_state()
    errors = reconstruction_error(ReversibleSequence(layers), x, **ctx)
    assert torch.equal(torch.get_rng_state(), rng_before)
    # errors[l] went through 32 - l inversions: report them by the number of inversions
    by_depth = errors[::-1]
    print("fp32 relative reconstruction error after 1..32 inversions:", " ".join(f"{e:.1e}" for e in by_depth))
    assert len(errors) == 32
    assert max(errors) < 1e-4


def saved_bytes(mode: str, depth: int) -> int:
    """Bytes autograd keeps for the backward of one forward pass, each storage counted once."""
    layers = make_layers(2, depth, torch.float32)
    x, ctx = make_inputs(torch.float32)
    return saved_tensor_bytes(lambda: ReversibleSequence(layers, mode=mode)(x, **ctx))


def test_saved_bytes_do_not_grow_with_depth_in_reconstruct() -> None:
    shallow, deep = saved_bytes("reconstruct", 2), saved_bytes("reconstruct", 16)
    assert shallow > 0
    assert deep <= 1.1 * shallow


def test_saved_bytes_grow_linearly_with_depth_in_store() -> None:
    sizes = {depth: saved_bytes("store", depth) for depth in (2, 4, 8, 16)}
    per_layer = (sizes[16] - sizes[8]) / 8
    assert per_layer > 0
    assert sizes[4] - sizes[2] == pytest.approx(2 * per_layer, rel=0.05)
    assert sizes[8] - sizes[4] == pytest.approx(4 * per_layer, rel=0.05)


class Widening(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim + 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h)


class NoContext(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h.tanh()


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint", "store"])
class TestBadInput:
    def test_d_not_divisible_by_n(self, mode: str) -> None:
        sequence = ReversibleSequence(make_layers(3, 2, torch.float32), mode=mode)
        with pytest.raises(ValueError, match=r"d=10 .* not divisible by the number of splits n=3"):
            sequence(torch.randn(BATCH, TIME, 10, requires_grad=True), memory=torch.randn(BATCH, SRC_TIME, D))

    def test_fn_that_changes_the_shape(self, mode: str) -> None:
        sequence = ReversibleSequence([ReversibleLayer([Widening(D // 2), Widening(D // 2)])], mode=mode)
        with pytest.raises(ValueError, match=r"fns\[0\] returned shape \(2, 5, 7\), expected the shape \(2, 5, 6\)"):
            sequence(torch.randn(BATCH, TIME, D))

    def test_fn_that_rejects_the_context(self, mode: str) -> None:
        sequence = ReversibleSequence([ReversibleLayer([NoContext(), NoContext()])], mode=mode)
        with pytest.raises(ValueError, match=r"fns\[0\] \(NoContext\) failed .* context memory=\(2, 4, 12\)"):
            sequence(torch.randn(BATCH, TIME, D, requires_grad=True), memory=torch.randn(BATCH, SRC_TIME, D))

    def test_context_of_the_wrong_batch_size(self, mode: str) -> None:
        sequence = ReversibleSequence(make_layers(2, 2, torch.float32), mode=mode)
        with pytest.raises(ValueError, match=r"fns\[1\] \(CrossAttention\) failed .* context memory=\(3, 4, 12\)"):
            sequence(torch.randn(BATCH, TIME, D, requires_grad=True), memory=torch.randn(3, SRC_TIME, D))


def test_fewer_than_two_splits() -> None:
    with pytest.raises(ValueError, match="n >= 2"):
        ReversibleLayer([FeedForward(D)])


def test_unknown_pool_and_mode() -> None:
    with pytest.raises(ValueError, match="pool"):
        ReversibleLayer([FeedForward(6), FeedForward(6)], pool="sum")
    with pytest.raises(ValueError, match="mode"):
        ReversibleSequence(make_layers(2, 1), mode="recompute")

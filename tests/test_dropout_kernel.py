"""seeded_dropout: every backend against the reference (bit for bit in float32), its
backward, its mask statistics, opcheck, gradcheck, torch.compile and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import ELEMENTWISE_TOLERANCES, devices, skip_unless_available
from torch.autograd.graph import saved_tensors_hooks

import mdarts_kernels as mk
from mdarts_kernels import ops, reference

BACKENDS = ["cpp", "triton"]
SHAPES = [(0,), (1,), (7, 33), (3, 5, 130), (2050, 9)]


def value_and_grad(backend: str, x: torch.Tensor, p: float, seed: int, grad_out: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    with mk.use_backend(backend):
        y = mk.seeded_dropout(x, p, seed)
        (grad,) = torch.autograd.grad(y, x, grad_out)
    return y.detach(), grad


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p,seed", [(0.0, 3), (0.1, 0), (0.5, 2**40 + 17), (0.9, -12345)])
def test_float32_equals_reference_bit_for_bit(device, backend, shape, p, seed):
    skip_unless_available(backend, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(device)
    grad_out = torch.randn(shape, generator=gen).to(device)
    got, got_grad = value_and_grad(backend, x, p, seed, grad_out)
    want, want_grad = value_and_grad("reference", x, p, seed, grad_out)
    assert torch.equal(got, want)
    assert torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_match_reference(device, backend, dtype):
    skip_unless_available(backend, device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(37, 70, generator=gen, dtype=torch.float64).to(device, dtype)
    grad_out = torch.randn(37, 70, generator=gen, dtype=torch.float64).to(device, dtype)
    got, got_grad = value_and_grad(backend, x, 0.3, 99, grad_out)
    want, want_grad = value_and_grad("reference", x, 0.3, 99, grad_out)
    assert got.dtype == dtype and got_grad.dtype == dtype
    assert torch.equal(got == 0, want == 0)  # the same mask
    torch.testing.assert_close(got, want, **ELEMENTWISE_TOLERANCES[dtype])
    torch.testing.assert_close(got_grad, want_grad, **ELEMENTWISE_TOLERANCES[dtype])


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_mask_statistics(backend):
    """Keep rate 1 - p, scaled mean preserved, and two seeds' masks independent."""
    skip_unless_available(backend, "cpu")
    n = 200_000 if backend == "triton" else 1_000_000
    ones = torch.ones(n)
    with mk.use_backend(backend):
        for p in (0.1, 0.5):
            a = mk.seeded_dropout(ones, p, 1) != 0
            b = mk.seeded_dropout(ones, p, 2) != 0
            tolerance = 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations
            assert abs(a.float().mean().item() - (1 - p)) < tolerance
            both = (a & b).float().mean().item()
            assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 / n) ** 0.5
        y = mk.seeded_dropout(ones, 0.25, 5)
        assert abs(y.mean().item() - 1.0) < 0.01
        assert set(torch.unique(y).tolist()) == {0.0, torch.tensor(1.0 / 0.75).item()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_depends_on_index_not_layout(backend):
    skip_unless_available(backend, "cpu")
    base = torch.randn(40, 60)
    strided = base.t()  # a transposed view: the mask follows the logical (row-major) index
    with mk.use_backend(backend):
        assert torch.equal(mk.seeded_dropout(strided, 0.4, 7), mk.seeded_dropout(strided.contiguous(), 0.4, 7))
        assert not torch.equal(mk.seeded_dropout(base, 0.4, 7), mk.seeded_dropout(base, 0.4, 8))


def test_nan_stays_nan_as_in_torch_dropout():
    x = torch.full((1000,), float("nan"))
    assert torch.isnan(mk.seeded_dropout(x, 0.5, 3)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_gradcheck(backend):
    skip_unless_available(backend, "cpu")
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    with mk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: mk.seeded_dropout(t, 0.3, 1234), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    skip_unless_available(backend, "cpu")
    op = torch.ops.mdarts.seeded_dropout if backend == "cpp" else torch.ops.mdarts.triton_seeded_dropout
    for x in (torch.randn(5, 8, requires_grad=True), torch.randn(4, 6).t(), torch.randn(3, 3, dtype=torch.float64)):
        torch.library.opcheck(op, (x, 0.2, 77))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    skip_unless_available(backend, "cpu")
    torch._dynamo.reset()
    x = torch.randn(8, 16, requires_grad=True)

    def fn(t):
        return mk.seeded_dropout(t * 2.0, 0.2, 4242).sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    with mk.use_backend(backend):
        want = fn(x)
        (want_grad,) = torch.autograd.grad(want.sum(), x)
        got = compiled(x)
        (got_grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_backward_saves_nothing():
    """The mask is rebuilt from the seed: autograd keeps no tensor for the dropout."""
    if ops.EXTENSION_ERROR is not None:
        pytest.fail(ops.EXTENSION_ERROR)
    saved = []
    x = torch.randn(64, 32, requires_grad=True)
    with mk.use_backend("cpp"), saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mk.seeded_dropout(x, 0.1, 5)
    assert saved == []


def test_draw_seed_follows_the_cpu_generator():
    torch.manual_seed(3)
    first = [mk.draw_seed() for _ in range(3)]
    torch.manual_seed(3)
    assert [mk.draw_seed() for _ in range(3)] == first
    assert len(set(first)) == 3 and all(0 <= s < 2**63 for s in first)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: mk.seeded_dropout(torch.ones(3), 1.0, 0), r"p: expected a dropout probability in \[0, 1\), got 1.0"),
        (lambda: mk.seeded_dropout(torch.ones(3), -0.1, 0), r"p: expected a dropout probability"),
        (
            lambda: mk.seeded_dropout(torch.ones(3), 0.1, 1.5),
            r"seed: expected an int in \[-2\*\*63, 2\*\*63\), got 1.5",
        ),
        (lambda: mk.seeded_dropout(torch.ones(3), 0.1, 2**63), r"seed: expected an int"),
        (lambda: mk.seeded_dropout(torch.ones(3, dtype=torch.long), 0.1, 0), r"x: expected a float64, float32"),
        (lambda: mk.seeded_dropout([1.0, 2.0], 0.1, 0), r"x: expected a tensor, got list"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_direct_op_call_checks_p():
    if ops.EXTENSION_ERROR is not None:
        pytest.fail(ops.EXTENSION_ERROR)
    with pytest.raises(RuntimeError, match=r"p: expected a dropout probability in \[0, 1\)"):
        torch.ops.mdarts.seeded_dropout(torch.ones(3), 1.5, 0)


def test_reference_keep_mask_is_the_documented_hash():
    """Element 0 with seed 0 is kept iff mix32(mix32(0) + 0) = 0 >= threshold: only for p = 0."""
    assert reference.dropout_keep((1,), 0.0, 0, torch.device("cpu")).item()
    assert not reference.dropout_keep((1,), 1e-9, 0, torch.device("cpu")).item()

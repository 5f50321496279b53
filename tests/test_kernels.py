"""Every backend of every fused op against the pure-PyTorch reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, devices, skip_unless_available

import mdarts_kernels as mk
from mdarts_kernels import ops, reference

CPU_BACKENDS = ["cpp", "triton"]


def make_inputs(K, D, rows, dtype, device="cpu", noncontiguous=False, seed=0):
    """h, outs (K), residual: (rows, D) data; weights (K,), ln_weight and ln_bias (K, D) in float32."""
    gen = torch.Generator().manual_seed(seed)

    def data():
        if noncontiguous:  # a strided view: every other column of a (rows, 2D) tensor
            return torch.randn(rows, 2 * D, generator=gen, dtype=torch.float64).to(device, dtype)[:, ::2]
        return torch.randn(rows, D, generator=gen, dtype=torch.float64).to(device, dtype)

    h = data()
    outs = [data() for _ in range(K)]
    residual = data()
    weights = torch.softmax(torch.randn(K, generator=gen), 0).to(
        device, torch.float64 if dtype == torch.float64 else torch.float32
    )
    ln_weight = (1 + 0.5 * torch.randn(K, D, generator=gen)).to(device, weights.dtype)
    ln_bias = (0.5 * torch.randn(K, D, generator=gen)).to(device, weights.dtype)
    if noncontiguous:
        assert not h.is_contiguous()
    return h, outs, residual, weights, ln_weight, ln_bias


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run_with_grads(backend, fn, inputs, grad_out):
    """Value of fn(*inputs) and the gradients of <value, grad_out> for every input."""
    inputs = leaves(*inputs)
    with mk.use_backend(backend):
        value = fn(*inputs)
        grads = torch.autograd.grad(value, inputs, grad_out)
    return value.detach(), grads


def assert_matches_reference(backend, fn, inputs, dtype, grad_atol_scale=1.0):
    """Values and input gradients of fn under ``backend`` equal those of the reference."""
    grad_out = torch.randn_like(fn(*inputs).float(), dtype=torch.float64).to(inputs[0].dtype)
    got, got_grads = run_with_grads(backend, fn, inputs, grad_out)
    want, want_grads = run_with_grads("reference", fn, inputs, grad_out)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"forward: {m}")
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        scale = max(1.0, w.abs().max().item()) * grad_atol_scale
        torch.testing.assert_close(
            g, w, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m, i=i: f"grad of input {i}: {m}"
        )


SHAPES = [(1, 1, 3), (2, 7, 33), (5, 64, 130), (14, 960, 9), (14, 64, 2050)]


def shape_id(shape):
    return "K{}-D{}-rows{}".format(*shape)


def triton_too_slow(backend, K, D, rows):
    return backend == "triton" and K * D * rows > 200_000


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("with_residual,sign", [(False, 1.0), (True, 1.0), (True, -1.0)])
def test_mixed_ln_sum_matches_reference_fp32(device, backend, shape, with_residual, sign):
    skip_unless_available(backend, device)
    K, D, rows = shape
    if device == "cpu" and triton_too_slow(backend, K, D, rows):
        pytest.skip("too large for the Triton CPU interpreter; covered on CUDA")
    h, outs, residual, w, lw, lb = make_inputs(K, D, rows, torch.float32, device)

    # with D = 1 the exact gradient through LayerNorm is 0, and the reference's rounding
    # noise is scaled by rstd = 1/sqrt(eps), about 316
    grad_atol_scale = 10.0 if D == 1 else 1.0
    if with_residual:

        def fn(h, w, lw, lb, residual, *outs):
            return mk.mixed_ln_sum(h, list(outs), w, lw, lb, residual=residual, sign=sign)

        assert_matches_reference(backend, fn, [h, w, lw, lb, residual, *outs], torch.float32, grad_atol_scale)
    else:

        def fn(h, w, lw, lb, *outs):
            return mk.mixed_ln_sum(h, list(outs), w, lw, lb, sign=sign)

        assert_matches_reference(backend, fn, [h, w, lw, lb, *outs], torch.float32, grad_atol_scale)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_mixed_ln_sum_other_dtypes(device, backend, dtype):
    skip_unless_available(backend, device)
    h, outs, residual, w, lw, lb = make_inputs(5, 96, 37, dtype, device)

    def fn(h, w, lw, lb, residual, *outs):
        return mk.mixed_ln_sum(h, list(outs), w, lw, lb, residual=residual, sign=-1.0)

    assert_matches_reference(backend, fn, [h, w, lw, lb, residual, *outs], dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mixed_sum_matches_reference(device, backend, shape, dtype):
    skip_unless_available(backend, device)
    K, D, rows = shape
    if device == "cpu" and triton_too_slow(backend, K, D, rows):
        pytest.skip("too large for the Triton CPU interpreter; covered on CUDA")
    _, outs, _, w, _, _ = make_inputs(K, D, rows, dtype, device)

    def fn(w, *outs):
        return mk.mixed_sum(list(outs), w)

    assert_matches_reference(backend, fn, [w, *outs], dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["max", "mean"])
@pytest.mark.parametrize("n,D,rows", [(2, 7, 33), (3, 64, 130), (4, 960, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_split_pool_matches_reference(device, backend, mode, n, D, rows, dtype):
    skip_unless_available(backend, device)
    _, xs, _, _, _, _ = make_inputs(n, D, rows, dtype, device)

    def fn(*xs):
        return mk.split_pool(list(xs), mode)

    assert_matches_reference(backend, fn, xs, dtype)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_split_pool_max_gives_ties_to_the_first(backend):
    skip_unless_available(backend, "cpu")
    a = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    b = torch.tensor([[1.0, 5.0, 3.0]], requires_grad=True)
    c = torch.tensor([[0.0, 5.0, 3.0]], requires_grad=True)
    with mk.use_backend(backend):
        pooled = mk.split_pool([a, b, c], "max")
        pooled.backward(torch.tensor([[10.0, 20.0, 30.0]]))
    assert pooled.tolist() == [[1.0, 5.0, 3.0]]
    assert a.grad.tolist() == [[10.0, 0.0, 30.0]]
    assert b.grad.tolist() == [[0.0, 20.0, 0.0]]
    assert c.grad.tolist() == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_inputs(backend):
    skip_unless_available(backend, "cpu")
    h, outs, residual, w, lw, lb = make_inputs(3, 24, 17, torch.float32, noncontiguous=True)

    def ln_sum(h, w, lw, lb, residual, *outs):
        return mk.mixed_ln_sum(h, list(outs), w, lw, lb, residual=residual)

    assert_matches_reference(backend, ln_sum, [h, w, lw, lb, residual, *outs], torch.float32)
    with mk.use_backend(backend):
        torch.testing.assert_close(mk.mixed_sum(outs, w), reference.mixed_sum(outs, w))
        torch.testing.assert_close(mk.split_pool(outs, "max"), reference.split_pool(outs, "max"))


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_rev_coupling_inverse_undoes_forward(backend):
    skip_unless_available(backend, "cpu")
    h, outs, x, w, lw, lb = make_inputs(5, 32, 21, torch.float64)
    with mk.use_backend(backend):
        y = mk.rev_coupling_forward(x, h, outs, w, lw, lb)
        rebuilt = mk.rev_coupling_inverse(y, h, outs, w, lw, lb)
    torch.testing.assert_close(rebuilt, x, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_gradcheck(backend):
    skip_unless_available(backend, "cpu")
    h, outs, residual, w, lw, lb = make_inputs(3, 5, 4, torch.float64)

    def ln_sum(h, w, lw, lb, residual, *outs):
        return mk.mixed_ln_sum(h, list(outs), w, lw, lb, residual=residual, sign=-1.0)

    def mixed(w, *outs):
        return mk.mixed_sum(list(outs), w)

    def pool(*xs):
        return mk.split_pool(list(xs), "max") + mk.split_pool(list(xs), "mean")

    with mk.use_backend(backend):
        assert torch.autograd.gradcheck(ln_sum, leaves(h, w, lw, lb, residual, *outs))
        assert torch.autograd.gradcheck(mixed, leaves(w, *outs))
        assert torch.autograd.gradcheck(pool, leaves(*outs))


def op_samples(prefix: str):
    """(op, args) for every forward and backward op of one backend (prefix "" or "triton_")."""
    h, outs, residual, w, lw, lb = make_inputs(3, 8, 5, torch.float32)
    grad = torch.randn_like(h)
    ns = torch.ops.mdarts
    args_h = leaves(h, w, lw, lb, residual)
    outs_leaves = leaves(*outs)
    _, mean, rstd = getattr(ns, prefix + "mixed_ln_sum")(h, outs, w, lw, lb, 1e-5, residual, 1.0)
    return [
        (getattr(ns, prefix + "mixed_sum"), (outs_leaves, args_h[1])),
        (getattr(ns, prefix + "mixed_sum_backward"), (grad, outs, w)),
        (
            getattr(ns, prefix + "mixed_ln_sum"),
            (args_h[0], outs_leaves, args_h[1], args_h[2], args_h[3], 1e-5, args_h[4], -1.0),
        ),
        (
            getattr(ns, prefix + "mixed_ln_sum"),
            (args_h[0], outs_leaves, args_h[1], args_h[2], args_h[3], 1e-5, None, 1.0),
        ),
        (getattr(ns, prefix + "mixed_ln_sum_backward"), (grad, h, outs, w, lw, lb, mean, rstd, 1.0)),
        (getattr(ns, prefix + "split_pool"), (outs_leaves, "max")),
        (getattr(ns, prefix + "split_pool"), (outs_leaves, "mean")),
        (getattr(ns, prefix + "split_pool_backward"), (grad, outs, "max")),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_every_op(backend):
    skip_unless_available(backend, "cpu")
    prefix = "" if backend == "cpp" else "triton_"
    for op, args in op_samples(prefix):
        torch.library.opcheck(op, args)


def small_block(h, outs, w, lw, lb, x):
    pooled = mk.split_pool([h, x], "max")
    y = mk.rev_coupling_forward(x, pooled, outs, w, lw, lb)
    return mk.mixed_sum([y, pooled], torch.stack([w[0], w[1]]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    skip_unless_available(backend, "cpu")
    torch._dynamo.reset()
    h, outs, x, w, lw, lb = make_inputs(3, 16, 6, torch.float32)
    grad = torch.randn_like(x)
    inputs = [h, *outs, w, lw, lb, x]

    def fn(h, o0, o1, o2, w, lw, lb, x):
        return small_block(h, [o0, o1, o2], w, lw, lb, x)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    with mk.use_backend(backend):
        want, want_grads = run_with_grads(backend, fn, inputs, grad)
        got, got_grads = run_with_grads(backend, compiled, inputs, grad)
    torch.testing.assert_close(got, want)
    for g, w_ in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w_)


def test_backend_choice_and_availability():
    status = mk.available_backends("cpu")
    assert set(status) == {"reference", "cpp", "triton"}
    assert status["reference"].ok
    assert status["cpp"].ok, status["cpp"].reason  # the extension is part of the package
    assert mk.current_backend() == "auto"
    with mk.use_backend("reference"):
        assert mk.current_backend() == "reference"
        with mk.use_backend("cpp"):
            assert mk.current_backend() == "cpp"
        assert mk.current_backend() == "reference"
    assert mk.current_backend() == "auto"
    cuda = mk.available_backends("cuda")
    if not torch.cuda.is_available():
        assert not cuda["cpp"].ok and "CUDA" in cuda["cpp"].reason


def test_auto_runs_cpp_on_cpu():
    from mdarts_kernels.backend import resolve_backend

    assert resolve_backend(torch.device("cpu")) == "cpp"


def test_unusable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 4)
    with mk.use_backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu"):
        mk.mixed_sum([x], torch.ones(1))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend: expected one of"):
        with mk.use_backend("cuda-fast"):
            pass


def bad_calls():
    h, outs, _, w, lw, lb = make_inputs(3, 8, 4, torch.float32)
    return {
        "outs of different shapes": (
            lambda: mk.mixed_sum([outs[0], outs[1][:, :4]], w[:2]),
            r"outs\[1\]: expected shape \(4, 8\)",
        ),
        "outs of different dtypes": (
            lambda: mk.mixed_sum([outs[0], outs[1].double()], w[:2]),
            r"outs\[1\]: expected dtype torch.float32",
        ),
        "K = 0": (lambda: mk.mixed_sum([], w[:0]), r"outs: expected at least one tensor \(K >= 1\)"),
        "weights too short": (lambda: mk.mixed_sum(outs, w[:2]), r"weights: expected shape \(3,\), got \(2,\)"),
        "integer weights": (
            lambda: mk.mixed_sum(outs, torch.ones(3, dtype=torch.long)),
            r"weights: expected a floating-point tensor",
        ),
        "integer data": (
            lambda: mk.mixed_sum([torch.ones(2, 3, dtype=torch.long)], w[:1]),
            r"outs\[0\]: expected a float64",
        ),
        "a single tensor as outs": (lambda: mk.mixed_sum(outs[0], w), r"outs: expected a list of tensors"),
        "ln_weight not (K, D)": (
            lambda: mk.mixed_ln_sum(h, outs, w, lw[:, :4], lb),
            r"ln_weight: expected shape \(3, 8\)",
        ),
        "ln_bias not (K, D)": (lambda: mk.mixed_ln_sum(h, outs, w, lw, lb[:2]), r"ln_bias: expected shape \(3, 8\)"),
        "h unlike outs": (
            lambda: mk.mixed_ln_sum(h[:2], outs, w, lw, lb),
            r"h: expected shape \(4, 8\) like outs\[0\]",
        ),
        "residual unlike h": (
            lambda: mk.mixed_ln_sum(h, outs, w, lw, lb, residual=h.half()),
            r"residual: expected dtype torch.float32",
        ),
        "eps not positive": (lambda: mk.mixed_ln_sum(h, outs, w, lw, lb, eps=0.0), r"eps: expected a positive float"),
        "unknown pool mode": (lambda: mk.split_pool(outs, "median"), r"mode: expected 'max' or 'mean', got 'median'"),
        "zero-width feature axis": (
            lambda: mk.split_pool([torch.ones(2, 0)] * 2, "max"),
            r"xs: expected a feature axis D >= 1",
        ),
    }


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("case", list(bad_calls()))
def test_bad_input_is_a_clear_error(backend, case):
    skip_unless_available(backend, "cpu")
    call, message = bad_calls()[case]
    with mk.use_backend(backend), pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda o, w: torch.ops.mdarts.mixed_sum([o, o[:, :2]], w), "outs\\[1\\]: expected shape"),
        (lambda o, w: torch.ops.mdarts.mixed_sum([o, o], w[:1]), "weights: expected shape"),
        (lambda o, w: torch.ops.mdarts.split_pool([o, o], "median"), "mode: expected 'max' or 'mean'"),
        (lambda o, w: torch.ops.mdarts.mixed_sum([], w), "outs: expected at least one tensor"),
    ],
)
def test_direct_op_calls_check_their_arguments(call, message):
    if ops.EXTENSION_ERROR is not None:
        pytest.fail(ops.EXTENSION_ERROR)
    o = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=message):
        call(o, torch.ones(2))


def test_backward_saves_only_row_statistics():
    """mixed_ln_sum keeps its inputs and two (K, rows) statistics, never a K x rows x D copy."""
    K, D, rows = 6, 64, 50
    h, outs, residual, w, lw, lb = make_inputs(K, D, rows, torch.float32)
    inputs = leaves(h, residual, w, lw, lb, *outs)
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_storages:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    h, residual, w, lw, lb, *outs = inputs
    with mk.use_backend("cpp"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mk.mixed_ln_sum(h, outs, w, lw, lb, residual=residual)
    assert sum(saved.values()) == 2 * K * rows * 4


def test_mixed_sum_without_weight_grad_saves_no_outs():
    outs = leaves(*make_inputs(4, 16, 10, torch.float32)[1])
    weights = torch.softmax(torch.randn(4), 0)
    saved = []
    with mk.use_backend("cpp"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = mk.mixed_sum(outs, weights)
    assert all(t.numel() == 4 for t in saved)
    grads = torch.autograd.grad(y.sum(), outs)
    for k, g in enumerate(grads):
        torch.testing.assert_close(g, torch.full_like(g, weights[k].item()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_rows(backend):
    skip_unless_available(backend, "cpu")
    h, outs, residual, w, lw, lb = make_inputs(3, 8, 0, torch.float32)
    with mk.use_backend(backend):
        assert mk.mixed_ln_sum(h, outs, w, lw, lb, residual=residual).shape == (0, 8)
        assert mk.mixed_sum(outs, w).shape == (0, 8)
        assert mk.split_pool(outs, "max").shape == (0, 8)


def test_leading_dims_are_flattened_into_rows():
    h, outs, residual, w, lw, lb = make_inputs(2, 12, 24, torch.float32)
    as3d = [t.reshape(2, 3, 4, 12) for t in (h, *outs, residual)]
    with mk.use_backend("cpp"):
        y = mk.mixed_ln_sum(as3d[0], as3d[1:3], w, lw, lb, residual=as3d[3])
    torch.testing.assert_close(y.reshape(24, 12), reference.mixed_ln_sum(h, outs, w, lw, lb, residual=residual))


def test_every_combination_of_shape_parameters_is_listed():
    ks = {s[0] for s in SHAPES}
    ds = {s[1] for s in SHAPES}
    assert {1, 2, 5, 14} <= ks and {1, 7, 64, 960} <= ds
    assert any(rows > 2000 for _, _, rows in SHAPES)
    assert all(rows % 32 not in (0,) for _, _, rows in SHAPES)
    assert CPU_BACKENDS == ["cpp", "triton"]

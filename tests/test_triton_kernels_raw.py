"""Raw Triton launchers of ``mdarts_kernels.triton_kernels`` against ``mdarts_kernels.reference``.

Forward results are compared with the reference op; backward results with
``torch.autograd.grad`` of the reference under the same upstream gradient. Without a GPU the
kernels run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before Triton is imported); on a CUDA machine the same tests run on the GPU,
unless ``TRITON_INTERPRET=1`` is set in the environment.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from types import ModuleType
from typing import Optional

import pytest
import torch
from helpers import REPO_ROOT, TOLERANCES

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

_PACKAGE_DIR = REPO_ROOT / "mdarts_kernels"


def _load(name: str) -> ModuleType:
    """Import ``mdarts_kernels.<name>``; if the package itself fails to import, load the file by path."""
    try:
        return importlib.import_module(f"mdarts_kernels.{name}")
    except ImportError:
        spec = importlib.util.spec_from_file_location(f"_mdarts_raw_{name}", _PACKAGE_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


reference = _load("reference")
tk = _load("triton_kernels")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 but no CUDA device is available", allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KS = [1, 2, 5, 14]
DS = [1, 7, 64, 960]


def _tol(dtype: torch.dtype, d: Optional[int] = None) -> dict[str, float]:
    """Tolerances for ``dtype``. With D == 1 every xhat is 0 and the reference's backward returns
    rounding noise amplified by rstd = 1/sqrt(eps) (~1e-4 in float32) where the kernels return 0."""
    tol = dict(TOLERANCES[dtype])
    if d == 1:
        tol["atol"] = max(tol["atol"], 1e-3)
    return tol


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal tensor of ``shape`` on the test device."""
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, **tol: float) -> None:
    """assert_close that also checks dtype and shape, and that ``actual`` is contiguous."""
    assert actual.is_contiguous()
    torch.testing.assert_close(actual, expected, **tol)


def _grads(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``fn(*leaves)`` w.r.t. fresh leaf copies of ``inputs`` under upstream ``grad``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return list(torch.autograd.grad(fn(*leaves), leaves, grad))


# --------------------------------------------------------------------------------------------
# mixed_sum
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_sum(dtype: torch.dtype, k: int) -> None:
    torch.manual_seed(0)
    shape = (5, 333)  # 1665 elements: not a multiple of the block
    outs = [_randn(*shape, dtype=dtype) for _ in range(k)]
    weights = _randn(k)
    _assert_close(tk.mixed_sum(outs, weights), reference.mixed_sum(outs, weights), **_tol(dtype))

    grad = _randn(*shape, dtype=dtype)
    grad_outs, grad_weights = tk.mixed_sum_backward(grad, outs, weights)
    expected = _grads(lambda w, *xs: reference.mixed_sum(list(xs), w), [weights, *outs], grad)
    assert len(grad_outs) == k
    for actual, exp in zip(grad_outs, expected[1:]):
        _assert_close(actual, exp, **_tol(dtype))
    _assert_close(grad_weights, expected[0], **_tol(dtype))


def test_mixed_sum_noncontiguous_and_weight_dtype() -> None:
    torch.manual_seed(1)
    base = _randn(4, 50, 37)
    outs = [base[i].t() for i in range(3)]  # (37, 50) transposed views
    weights = _randn(6, dtype=torch.float64)[::2]  # strided, float64 weights for float32 data
    _assert_close(tk.mixed_sum(outs, weights), reference.mixed_sum(outs, weights), **_tol(torch.float32))

    grad = _randn(50, 37).t()
    grad_outs, grad_weights = tk.mixed_sum_backward(grad, outs, weights)
    expected = _grads(lambda w, *xs: reference.mixed_sum(list(xs), w), [weights, *outs], grad)
    for actual, exp in zip(grad_outs, expected[1:]):
        _assert_close(actual, exp, **_tol(torch.float32))
    assert grad_weights.dtype == torch.float64
    _assert_close(grad_weights, expected[0], **_tol(torch.float32))


def test_mixed_sum_empty() -> None:
    outs = [_randn(0, 8) for _ in range(3)]
    weights = _randn(3)
    assert tk.mixed_sum(outs, weights).shape == (0, 8)
    grad_outs, grad_weights = tk.mixed_sum_backward(_randn(0, 8), outs, weights)
    assert [g.shape for g in grad_outs] == [(0, 8)] * 3
    torch.testing.assert_close(grad_weights, torch.zeros(3, device=DEVICE))


# --------------------------------------------------------------------------------------------
# mixed_ln_sum
# --------------------------------------------------------------------------------------------


def _check_mixed_ln_sum(
    h: torch.Tensor,
    outs: list[torch.Tensor],
    weights: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    residual: Optional[torch.Tensor],
    sign: float,
    grad: torch.Tensor,
    tol: dict[str, float],
    eps: float = 1e-5,
) -> None:
    """Check forward (out, mean, rstd) and backward of the kernels against the reference."""
    k, d = len(outs), h.shape[-1]
    out, mean, rstd = tk.mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, eps, residual, sign)
    _assert_close(out, reference.mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, eps, residual, sign), **tol)

    acc = reference.accumulation_dtype(h.dtype)
    z = torch.stack([(h.to(acc) + o.to(acc)).reshape(-1, d) for o in outs])  # (K, N, D)
    _assert_close(mean, z.mean(-1), **tol)
    _assert_close(rstd, torch.rsqrt(z.var(-1, unbiased=False) + eps), rtol=tol["rtol"], atol=tol["atol"] * 10)

    got = tk.mixed_ln_sum_backward(grad, h, outs, weights, ln_weight, ln_bias, mean, rstd, sign)
    grad_h, grad_outs, grad_weights, grad_ln_weight, grad_ln_bias = got

    def fn(h_, w_, lw_, lb_, *outs_):
        return reference.mixed_ln_sum(h_, list(outs_), w_, lw_, lb_, eps, residual, sign)

    expected = _grads(fn, [h, weights, ln_weight, ln_bias, *outs], grad)
    _assert_close(grad_h, expected[0], **tol)
    assert len(grad_outs) == k
    for actual, exp in zip(grad_outs, expected[4:]):
        _assert_close(actual, exp, **tol)
    # Column sums over N rows: compare relative to their scale.
    sums_tol = dict(rtol=tol["rtol"], atol=tol["atol"] * 10)
    _assert_close(grad_weights, expected[1], **sums_tol)
    _assert_close(grad_ln_weight, expected[2], **sums_tol)
    _assert_close(grad_ln_bias, expected[3], **sums_tol)


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_ln_sum(dtype: torch.dtype, k: int, d: int) -> None:
    torch.manual_seed(2)
    shape = (37 if d < 512 else 13, d)  # not a multiple of any row tile; fewer long rows for speed
    h = _randn(*shape, dtype=dtype)
    outs = [_randn(*shape, dtype=dtype) for _ in range(k)]
    weights = _randn(k)
    ln_weight = 1.0 + 0.1 * _randn(k, d)
    ln_bias = 0.1 * _randn(k, d)
    residual = _randn(*shape, dtype=dtype)
    grad = _randn(*shape, dtype=dtype)
    _check_mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, residual, -1.0, grad, _tol(dtype, d))


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_ln_sum_residual_sign(dtype: torch.dtype, with_residual: bool, sign: float) -> None:
    torch.manual_seed(3)
    k, shape = 3, (2, 19, 64)  # leading dims are flattened into 38 rows
    h = _randn(*shape, dtype=dtype)
    outs = [_randn(*shape, dtype=dtype) for _ in range(k)]
    residual = _randn(*shape, dtype=dtype) if with_residual else None
    weights = _randn(k)
    ln_weight = _randn(k, 64)
    ln_bias = _randn(k, 64)
    grad = _randn(*shape, dtype=dtype)
    _check_mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, residual, sign, grad, _tol(dtype))


@pytest.mark.parametrize("n_rows, d", [(3001, 7), (301, 960)])
def test_mixed_ln_sum_many_tiles(n_rows: int, d: int) -> None:
    """Several backward programs, each looping over several row tiles (partial-sum accumulation)."""
    torch.manual_seed(4)
    k = 2
    h = _randn(n_rows, d)
    outs = [_randn(n_rows, d) for _ in range(k)]
    _check_mixed_ln_sum(
        h, outs, _randn(k), _randn(k, d), _randn(k, d), _randn(n_rows, d), 1.0, _randn(n_rows, d), _tol(torch.float32)
    )


def test_mixed_ln_sum_noncontiguous_and_param_dtypes() -> None:
    torch.manual_seed(5)
    k, d, n = 2, 48, 29
    h = _randn(d, n).t()  # (n, d) transposed view
    outs = [_randn(n, 2 * d)[:, ::2] for _ in range(k)]  # strided slices
    residual = _randn(n, d + 5)[:, :d]
    weights = _randn(k, dtype=torch.bfloat16)
    ln_weight = _randn(d, k, dtype=torch.float16).t()
    ln_bias = _randn(k, d, dtype=torch.float64)
    grad = _randn(d, n).t()
    # assert_close also checks that each parameter gradient comes back in its parameter's dtype.
    _check_mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, residual, -1.0, grad, _tol(torch.float32), eps=1e-3)


def test_mixed_ln_sum_empty() -> None:
    k, d = 3, 16
    h = _randn(0, d)
    outs = [_randn(0, d) for _ in range(k)]
    weights, ln_weight, ln_bias = _randn(k), _randn(k, d), _randn(k, d)
    out, mean, rstd = tk.mixed_ln_sum(h, outs, weights, ln_weight, ln_bias, 1e-5, None, 1.0)
    assert out.shape == (0, d) and mean.shape == (k, 0) and rstd.shape == (k, 0)
    grad_h, grad_outs, grad_weights, grad_ln_weight, grad_ln_bias = tk.mixed_ln_sum_backward(
        _randn(0, d), h, outs, weights, ln_weight, ln_bias, mean, rstd, 1.0
    )
    assert grad_h.shape == (0, d) and [g.shape for g in grad_outs] == [(0, d)] * k
    assert not grad_weights.any() and not grad_ln_weight.any() and not grad_ln_bias.any()


def test_mixed_ln_sum_rejects_huge_rows() -> None:
    d = 2 * tk.MAX_BLOCK_D
    with pytest.raises(ValueError, match="too large"):
        tk.mixed_ln_sum(_randn(1, d), [_randn(1, d)], _randn(1), _randn(1, d), _randn(1, d), 1e-5, None, 1.0)


# --------------------------------------------------------------------------------------------
# split_pool
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["max", "mean"])
@pytest.mark.parametrize("n", KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_pool(dtype: torch.dtype, n: int, mode: str) -> None:
    torch.manual_seed(6)
    shape = (7, 211)
    xs = [_randn(*shape, dtype=dtype) for _ in range(n)]
    if mode == "max" and dtype in (torch.float16, torch.bfloat16):
        # Break low-precision ties so that autograd's choice of maximum is unambiguous.
        xs = [(x.double() + 1e-3 * i).to(dtype) for i, x in enumerate(xs)]
    _assert_close(tk.split_pool(xs, mode), reference.split_pool(xs, mode), **_tol(dtype))

    grad = _randn(*shape, dtype=dtype)
    grads = tk.split_pool_backward(grad, xs, mode)
    expected = _grads(lambda *ts: reference.split_pool(list(ts), mode), xs, grad)
    assert len(grads) == n
    for actual, exp in zip(grads, expected):
        _assert_close(actual, exp, **_tol(dtype))


def test_split_pool_max_ties_go_to_first() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 0.0], device=DEVICE)
    b = torch.tensor([1.0, 5.0, 3.0, 0.0], device=DEVICE)
    c = torch.tensor([0.0, 5.0, 3.0, 1.0], device=DEVICE)
    grad = torch.tensor([10.0, 20.0, 30.0, 40.0], device=DEVICE)
    torch.testing.assert_close(tk.split_pool([a, b, c], "max"), torch.tensor([1.0, 5.0, 3.0, 1.0], device=DEVICE))
    ga, gb, gc = tk.split_pool_backward(grad, [a, b, c], "max")
    torch.testing.assert_close(ga, torch.tensor([10.0, 0.0, 30.0, 0.0], device=DEVICE))
    torch.testing.assert_close(gb, torch.tensor([0.0, 20.0, 0.0, 0.0], device=DEVICE))
    torch.testing.assert_close(gc, torch.tensor([0.0, 0.0, 0.0, 40.0], device=DEVICE))


def test_split_pool_max_propagates_nan() -> None:
    a = torch.tensor([1.0, float("nan"), 3.0], device=DEVICE)
    b = torch.tensor([float("nan"), 2.0, 4.0], device=DEVICE)
    torch.testing.assert_close(tk.split_pool([a, b], "max"), reference.split_pool([a, b], "max"), equal_nan=True)


def test_split_pool_noncontiguous_and_empty() -> None:
    torch.manual_seed(7)
    xs = [_randn(40, 30).t() for _ in range(3)]
    grad = _randn(60, 40)[::2]
    for mode in ("max", "mean"):
        _assert_close(tk.split_pool(xs, mode), reference.split_pool(xs, mode), **_tol(torch.float32))
        expected = _grads(lambda *ts, mode=mode: reference.split_pool(list(ts), mode), xs, grad)
        for actual, exp in zip(tk.split_pool_backward(grad, xs, mode), expected):
            _assert_close(actual, exp, **_tol(torch.float32))
    empty = [_randn(3, 0) for _ in range(2)]
    assert tk.split_pool(empty, "mean").shape == (3, 0)
    assert [g.shape for g in tk.split_pool_backward(_randn(3, 0), empty, "max")] == [(3, 0)] * 2
    with pytest.raises(ValueError, match="mode"):
        tk.split_pool(xs, "min")


# ----------------------------------------------------------------------------- several GPUs, CUDA graphs


def _list_inputs(device: torch.device, k: int = 3) -> dict[str, torch.Tensor]:
    """Inputs of the list ops on ``device``: K outs (B, T, D), h and grad, weights, LN parameters."""
    shape = (4, 33, 64)
    inputs = {f"x{i}": torch.randn(*shape, device=device) for i in range(k)}
    inputs |= {"h": torch.randn(*shape, device=device), "grad": torch.randn(*shape, device=device)}
    inputs |= {"w": torch.randn(k, device=device), "lnw": torch.randn(k, 64, device=device)}
    return inputs | {"lnb": torch.randn(k, 64, device=device)}


def _list_results(ops, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each list op of ``ops`` (the launchers, or :func:`_reference_launchers`) on inputs ``t``."""
    xs = [t[name] for name in sorted(t) if name.startswith("x")]
    y, mean, rstd = ops.mixed_ln_sum(t["h"], xs, t["w"], t["lnw"], t["lnb"], 1e-5, None, 1.0)
    ln_grads = ops.mixed_ln_sum_backward(t["grad"], t["h"], xs, t["w"], t["lnw"], t["lnb"], mean, rstd, 1.0)
    return {
        "mixed_sum": ops.mixed_sum(xs, t["w"]),
        "mixed_sum_backward": ops.mixed_sum_backward(t["grad"], xs, t["w"])[1],
        "mixed_ln_sum": y,
        "mixed_ln_sum_backward": ln_grads[0],
        "split_pool": ops.split_pool(xs, "max"),
        "split_pool_backward": ops.split_pool_backward(t["grad"], xs, "max")[1],
    }


def _expected_list_results(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What :func:`_list_results` gives, from the reference ops and autograd on the CPU."""
    t = {name: value.detach().cpu().requires_grad_() for name, value in t.items()}
    xs = [t[name] for name in sorted(t) if name.startswith("x")]
    mixed = reference.mixed_sum(xs, t["w"])
    mixed_ln = reference.mixed_ln_sum(t["h"], xs, t["w"], t["lnw"], t["lnb"], 1e-5)
    pooled = reference.split_pool(xs, "max")
    return {
        "mixed_sum": mixed,
        "mixed_sum_backward": torch.autograd.grad(mixed, t["w"], t["grad"])[0],
        "mixed_ln_sum": mixed_ln,
        "mixed_ln_sum_backward": torch.autograd.grad(mixed_ln, t["h"], t["grad"])[0],
        "split_pool": pooled,
        "split_pool_backward": torch.autograd.grad(pooled, xs[1], t["grad"])[0],
    }


def _assert_list_results(results: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
    for name, expected in _expected_list_results(inputs).items():
        torch.testing.assert_close(results[name].cpu(), expected.detach(), rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.skipif(INTERPRETED or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_run_on_the_tensors_device_not_the_current_one() -> None:
    torch.manual_seed(0)
    inputs = _list_inputs(torch.device("cuda", 1))
    with torch.cuda.device(0):
        results = _list_results(tk, inputs)
    torch.cuda.synchronize(1)
    _assert_list_results(results, inputs)


@pytest.mark.skipif(INTERPRETED, reason="needs a CUDA device")
def test_launches_are_captured_in_a_cuda_graph_and_replayed() -> None:
    torch.manual_seed(0)
    inputs = _list_inputs(DEVICE)
    _list_results(tk, inputs)  # compiles every kernel before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # nothing is copied from the host: the launches are captured
        results = _list_results(tk, inputs)
    for _ in range(2):  # new values in the same tensors, the same graph
        for value in inputs.values():
            value.copy_(torch.randn_like(value))
        graph.replay()
        torch.cuda.synchronize()
        _assert_list_results(results, inputs)


def test_the_list_ops_match_the_reference_on_the_test_device() -> None:
    torch.manual_seed(0)
    inputs = _list_inputs(DEVICE)
    _assert_list_results(_list_results(tk, inputs), inputs)


def test_the_kernels_compile_for_an_h100_and_load_the_lists_with_vector_loads() -> None:
    """Ahead-of-time compilation for sm_90 needs no GPU (see .ci/check_triton_kernels.py)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    check = subprocess.run(
        [sys.executable, str(REPO_ROOT / ".ci" / "check_triton_kernels.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "list loads vectorised" in check.stdout

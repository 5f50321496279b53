"""Multi-split reversible layers and backpropagation by reconstruction (docs/design.md 1.2, 1.3, 2.2).

A :class:`ReversibleLayer` splits its input X (batch, time, d) along the feature axis into n
equal parts and updates them in order k = 1..n::

    H_k = pool(Y_1, .., Y_{k-1}, X_{k+1}, .., X_n)      elementwise max or mean
    Y_k = X_k + G_k(H_k)

which it inverts in order k = n..1 with X_k = Y_k - G_k(H_k). Each G_k (a module ``fn``) is
called as ``fn(h, **ctx)``; the context keyword arguments (encoder output, masks, an
``OpContext``...) are passed unchanged to every fn of every layer and are never
reconstructed.

A :class:`ReversibleSequence` stacks layers under one of three memory modes:

* ``"reconstruct"``: autograd keeps only the top layer's output and the context tensors.
  The backward of each layer receives its output Y and dL/dY, and for k = n..1 rebuilds H_k,
  recomputes g = G_k(H_k) with grad enabled, calls ``torch.autograd.grad`` on it (never a
  reentrant ``backward()``) for the gradients of H_k's sources, of G_k's parameters and of
  the context tensors, then rebuilds X_k = Y_k - g. The rebuilt input is handed to the
  backward of the layer below through a slot owned by that one forward call, so every
  layer is its own autograd node: parameter gradients are accumulated (and, under
  DistributedDataParallel, reduced) layer by layer, and activation memory does not grow
  with depth. Compute: about one extra forward pass (4N instead of 3N).
* ``"checkpoint"``: autograd keeps each layer's input; the backward recomputes the layer.
* ``"store"``: plain autograd (what plain DARTS does).

The three modes give the same values and the same gradients (to rounding in the rebuilt
inputs, see :func:`reconstruction_error`) for the input, the parameters and every floating
tensor found in the context: tensors passed directly, or inside lists, tuples, dicts and
dataclasses. Gradients reach the parameters through ``loss.backward()`` and
``torch.autograd.grad(loss, params)`` alike, also when the input does not require grad.
Higher-order gradients are not supported in "reconstruct" and "checkpoint".

Randomness: before each fn call, "reconstruct" records the CPU RNG state and the CUDA RNG
states of the devices of the input and context tensors; "checkpoint" records them once per
layer. The recomputation restores them inside ``torch.random.fork_rng``, so dropout draws
the same masks and the global RNG is left as if no recomputation had happened. Nothing is
reseeded. The recorded states (about 5 KB of CPU state per fn call) live with the graph.

Numerics: the coupling adds in float32 (float64 for float64 inputs) and rounds back to the
input's dtype: y_k = (x_k.float() + g.float()).to(x_k.dtype); the inverse subtracts alike.
A fn may take over the coupling by defining ``coupled(x, h, sign, **ctx)`` returning
x + sign * fn(h, **ctx) computed the same way (the fused ``rev_coupling_*`` kernels).
Rebuilt inputs differ from the true ones by about one rounding of the stream's dtype per
layer: keep the stream (the input x) in float32.

Autocast: under ``torch.autocast`` (bf16 or fp16) the fns run in low precision as usual and
the coupling still adds in float32 and rounds to the stream's dtype. The recomputation in
the backward re-enters the autocast state (enabled flag and dtype of the input's device
type) captured at forward time, whatever the state around ``backward()``, so it computes
the same g as the forward pass. The kernel backend chosen with
``mdarts_kernels.use_backend`` is captured and re-entered the same way (the autograd engine
may run the backward in a thread where it has its default). A float32 stream under bf16
autocast reconstructs to about float32 rounding; a bf16 stream to about bf16 rounding per
layer, which is why the stream should stay float32.

The module holds no global mutable state.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import mdarts_kernels
from mdarts_kernels import accumulation_dtype

from .config import MEMORY_MODES as MODES
from .config import POOLS

Rebuild = Callable[[Iterator[Tensor]], Any]


def _describe(ctx: dict[str, Any]) -> str:
    """The context's names with tensor shapes, for error messages."""
    if not ctx:
        return "no context"
    shown = (
        f"{name}={tuple(v.shape)}" if isinstance(v, Tensor) else f"{name}={type(v).__name__}" for name, v in ctx.items()
    )
    return "context " + ", ".join(shown)


class ReversibleLayer(nn.Module):
    """One multi-split reversible layer (docs/design.md 1.2).

    Args:
        fns: n >= 2 modules G_1..G_n; ``fn(h, **ctx)`` takes h (batch, time, d / n) and
            returns a tensor of the same shape. Optionally ``fn.coupled(x, h, sign, **ctx)``
            returns x + sign * fn(h, **ctx) with the add in float32 (a fused kernel).
        pool: "max" (default) or "mean", the elementwise pooling of the other parts.

    Raises ValueError for n < 2 or an unknown pool here, and for a bad input or context at
    the first forward (see :meth:`split` and :meth:`forward`).
    """

    def __init__(self, fns: Sequence[nn.Module], pool: str = "max") -> None:
        super().__init__()
        fns = list(fns)
        if len(fns) < 2:
            raise ValueError(f"ReversibleLayer: expected n >= 2 fns (one per split), got {len(fns)}")
        if pool not in POOLS:
            raise ValueError(f"ReversibleLayer: pool must be one of {POOLS}, got {pool!r}")
        self.fns = nn.ModuleList(fns)
        self.pool = pool

    @property
    def splits(self) -> int:
        """The number of splits n."""
        return len(self.fns)

    def extra_repr(self) -> str:
        return f"splits={self.splits}, pool={self.pool!r}"

    def split(self, x: Tensor) -> list[Tensor]:
        """The n parts (batch, time, d / n) of x (batch, time, d), as views.

        Raises ValueError when x is not a tensor with a feature axis divisible by n.
        """
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError(f"ReversibleLayer: expected x to be a tensor (batch, time, d), got {type(x).__name__}")
        d = x.shape[-1]
        if d % self.splits:
            raise ValueError(
                f"ReversibleLayer: the feature size d={d} of x {tuple(x.shape)} "
                f"is not divisible by the number of splits n={self.splits}"
            )
        return list(x.split(d // self.splits, dim=-1))

    def _pooled(self, parts: Sequence[Tensor], k: int) -> Tensor:
        """H_k: the pool of all parts but the k-th (each (batch, time, d / n))."""
        return mdarts_kernels.split_pool([p for i, p in enumerate(parts) if i != k], self.pool)

    def _couple(self, k: int, x: Tensor, h: Tensor, sign: float, ctx: dict[str, Any]) -> Tensor:
        """x + sign * G_k(h), added in float32 (float64 for float64 x), in x's dtype."""
        fn = self.fns[k]
        try:
            if hasattr(fn, "coupled"):
                out = fn.coupled(x, h, sign, **ctx)
                expected, what = x, "fns[{k}].coupled(x, h, sign) returned shape {got}, expected the shape {want} of x"
            else:
                out = fn(h, **ctx)
                expected, what = h, "fns[{k}] returned shape {got}, expected the shape {want} of its input h"
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError) as error:
            raise ValueError(
                f"ReversibleLayer: fns[{k}] ({type(fn).__name__}) failed on h {tuple(h.shape)} "
                f"with {_describe(ctx)}: {error}"
            ) from error
        if not isinstance(out, Tensor) or out.shape != expected.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError("ReversibleLayer: " + what.format(k=k, got=got, want=tuple(expected.shape)))
        if hasattr(fn, "coupled"):
            return out
        acc = accumulation_dtype(x.dtype)
        return x.to(acc).add(out.to(acc), alpha=sign).to(x.dtype)

    def forward_parts(
        self, parts: Sequence[Tensor], ctx: dict[str, Any], before: Optional[Callable[[int], None]] = None
    ) -> list[Tensor]:
        """Y_1..Y_n from X_1..X_n (each (batch, time, d / n)); ``before(k)`` runs before G_k."""
        parts = list(parts)
        for k in range(self.splits):
            if before is not None:
                before(k)
            parts[k] = self._couple(k, parts[k], self._pooled(parts, k), 1.0, ctx)
        return parts

    def inverse_parts(
        self, parts: Sequence[Tensor], ctx: dict[str, Any], before: Optional[Callable[[int], None]] = None
    ) -> list[Tensor]:
        """X_1..X_n from Y_1..Y_n (each (batch, time, d / n)), in order k = n..1; ``before(k)`` runs before G_k."""
        parts = list(parts)
        for k in reversed(range(self.splits)):
            if before is not None:
                before(k)
            parts[k] = self._couple(k, parts[k], self._pooled(parts, k), -1.0, ctx)
        return parts

    def forward(self, x: Tensor, **ctx: Any) -> Tensor:
        """y (batch, time, d) from x (batch, time, d); ctx is passed to every fn."""
        return torch.cat(self.forward_parts(self.split(x), ctx), dim=-1)

    def inverse(self, y: Tensor, **ctx: Any) -> Tensor:
        """x (batch, time, d) from y = forward(x) (batch, time, d).

        Exact up to rounding when the fns are deterministic (eval mode); fns that draw random
        numbers draw new ones here (:class:`ReversibleSequence` restores the RNG itself).
        """
        return torch.cat(self.inverse_parts(self.split(y), ctx), dim=-1)


def _resplit(layer: ReversibleLayer, parts: Sequence[Tensor]) -> list[Tensor]:
    """``parts`` as ``layer``'s split (they already are unless layers differ in n)."""
    if len(parts) == layer.splits:
        return list(parts)
    return layer.split(torch.cat(list(parts), dim=-1))


# --- context tensors --------------------------------------------------------------------


def _gather_tensors(value: Any, out: list[Tensor]) -> Rebuild:
    """Append the tensors in ``value`` to ``out``; return a function that rebuilds ``value``
    with the tensors taken, in the same order, from an iterator.

    Tensors are found directly, in lists, tuples (named too), dicts and dataclass instances.
    """
    if isinstance(value, Tensor):
        out.append(value)
        return lambda it: next(it)
    if isinstance(value, (list, tuple)):
        builders = [_gather_tensors(v, out) for v in value]
        kind = type(value)
        if hasattr(value, "_fields"):
            return lambda it: kind(*(b(it) for b in builders))
        return lambda it: kind(b(it) for b in builders)
    if isinstance(value, dict):
        items = [(key, _gather_tensors(v, out)) for key, v in value.items()]
        return lambda it: {key: b(it) for key, b in items}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [(f.name, _gather_tensors(getattr(value, f.name), out)) for f in dataclasses.fields(value) if f.init]
        return lambda it: dataclasses.replace(value, **{name: b(it) for name, b in fields})
    return lambda it: value


# --- recorded state: RNG and autocast ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RngState:
    """The CPU RNG state and the CUDA RNG states of ``devices``."""

    cpu: Tensor
    cuda: tuple[Tensor, ...]

    @staticmethod
    def capture(devices: Sequence[int]) -> "_RngState":
        return _RngState(torch.get_rng_state(), tuple(torch.cuda.get_rng_state(d) for d in devices))

    def restore(self, devices: Sequence[int]) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in zip(devices, self.cuda):
            torch.cuda.set_rng_state(state, device)


@dataclasses.dataclass(frozen=True)
class _Autocast:
    """The autocast state (enabled, dtype) of one device type."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @staticmethod
    def capture(device_type: str) -> "_Autocast":
        return _Autocast(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def enter(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class _Slot:
    """Where the backward of layer l + 1 leaves the rebuilt input parts for layer l."""

    def __init__(self) -> None:
        self.parts: Optional[list[Tensor]] = None

    def take(self) -> list[Tensor]:
        parts, self.parts = self.parts, None
        if parts is None:
            raise RuntimeError("ReversibleSequence: the layer above did not hand down its rebuilt input")
        return parts


@dataclasses.dataclass
class _Plan:
    """Everything one layer's autograd node needs besides its saved tensors."""

    layer: ReversibleLayer
    mode: str
    rebuild_ctx: Rebuild
    n_ctx: int
    params: tuple[nn.Parameter, ...]
    fn_params: tuple[tuple[int, ...], ...]  # for each fn, its parameters' indices in params
    devices: tuple[int, ...]
    autocast: _Autocast
    backend: str
    above: Optional[_Slot]  # "reconstruct": the slot holding this layer's output; None at the top
    below: Optional[_Slot]  # "reconstruct": the slot for this layer's rebuilt input; None at the bottom
    rng: list[_RngState] = dataclasses.field(default_factory=list)

    def context(self, tensors: Sequence[Tensor]) -> dict[str, Any]:
        return self.rebuild_ctx(iter(tensors))

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """The forward pass's backend, autocast state and grad mode, with the RNG forked."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(mdarts_kernels.use_backend(self.backend))
            stack.enter_context(torch.random.fork_rng(devices=list(self.devices), device_type="cuda"))
            stack.enter_context(self.autocast.enter())
            stack.enter_context(torch.enable_grad())
            yield


def _layer_params(layer: ReversibleLayer) -> tuple[tuple[nn.Parameter, ...], tuple[tuple[int, ...], ...]]:
    """The layer's parameters that require grad (each once), and each fn's indices into them."""
    index: dict[int, int] = {}
    params: list[nn.Parameter] = []
    fn_params = []
    for fn in layer.fns:
        mine = []
        for p in fn.parameters():
            if p.requires_grad:
                if id(p) not in index:
                    index[id(p)] = len(params)
                    params.append(p)
                mine.append(index[id(p)])
        fn_params.append(tuple(mine))
    return tuple(params), tuple(fn_params)


def _add(total: Optional[Tensor], grad: Optional[Tensor]) -> Optional[Tensor]:
    """total + grad, where None stands for no gradient (out of place: total may be autograd's)."""
    if grad is None:
        return total
    return grad if total is None else total + grad


class _LayerFunction(torch.autograd.Function):
    """One layer as one autograd node: inputs (plan, *parts, *ctx_tensors, *params), outputs the n parts."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *inputs: Tensor) -> tuple[Tensor, ...]:
        n = plan.layer.splits
        parts, ctx_tensors = inputs[:n], inputs[n : n + plan.n_ctx]
        kwargs = plan.context(ctx_tensors)
        if plan.mode == "checkpoint":
            plan.rng.append(_RngState.capture(plan.devices))
            outs = plan.layer.forward_parts(parts, kwargs)
            ctx.save_for_backward(*parts, *ctx_tensors)
        else:
            outs = plan.layer.forward_parts(
                parts, kwargs, before=lambda k: plan.rng.append(_RngState.capture(plan.devices))
            )
            ctx.save_for_backward(*(outs if plan.above is None else ()), *ctx_tensors)
        ctx.plan = plan
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Optional[Tensor], ...]:
        plan: _Plan = ctx.plan
        n = plan.layer.splits
        saved = ctx.saved_tensors
        ctx_tensors, stream = saved[len(saved) - plan.n_ctx :], saved[: len(saved) - plan.n_ctx]
        need_parts = ctx.needs_input_grad[1 : 1 + n]
        need_ctx = ctx.needs_input_grad[1 + n : 1 + n + plan.n_ctx]
        ctx_leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx_tensors, need_ctx)]
        out = _Gradients(
            kwargs=plan.context(ctx_leaves),
            ctx_inputs=[leaf for leaf, need in zip(ctx_leaves, need_ctx) if need],
            wanted_ctx=[i for i, need in enumerate(need_ctx) if need],
            ctx=[None] * plan.n_ctx,
            params=[None] * len(plan.params),
        )
        with plan.replay():
            if plan.mode == "checkpoint":
                part_grads = _checkpoint_backward(plan, stream, grads, out)
            else:
                ys = list(stream) if plan.above is None else _resplit(plan.layer, plan.above.take())
                part_grads = _reconstruct_backward(plan, ys, grads, out)
        return (None, *(g if need else None for g, need in zip(part_grads, need_parts)), *out.ctx, *out.params)


@dataclasses.dataclass
class _Gradients:
    """What a layer's backward recomputes with and where its gradients go: the keyword context
    built on leaves (``kwargs``), the leaves that need a gradient (``ctx_inputs``, at the
    positions ``wanted_ctx`` of the context tensors), and the gradients of the context tensors
    (``ctx``) and of the layer's parameters (``params``), filled in by the backward."""

    kwargs: dict[str, Any]
    ctx_inputs: list[Tensor]
    wanted_ctx: list[int]
    ctx: list[Optional[Tensor]]
    params: list[Optional[Tensor]]


def _checkpoint_backward(plan: _Plan, xs: Sequence[Tensor], grads: Sequence[Tensor], out: _Gradients) -> list[Tensor]:
    """Recompute the layer from its saved input parts; fill ``out``, return the parts' grads."""
    plan.rng[0].restore(plan.devices)
    leaves = [x.detach().requires_grad_() for x in xs]
    outs = plan.layer.forward_parts(leaves, out.kwargs)
    got = torch.autograd.grad(outs, [*leaves, *out.ctx_inputs, *plan.params], grads, allow_unused=True)
    n, m = len(leaves), len(out.wanted_ctx)
    for i, g in zip(out.wanted_ctx, got[n : n + m]):
        out.ctx[i] = g
    out.params[:] = got[n + m :]
    return [g if g is not None else torch.zeros_like(x) for g, x in zip(got[:n], xs)]


def _reconstruct_backward(plan: _Plan, ys: list[Tensor], grads: Sequence[Tensor], out: _Gradients) -> list[Tensor]:
    """docs/design.md 1.3: for k = n..1 rebuild H_k, backpropagate through g = G_k(H_k), rebuild X_k.

    Fills ``out``, hands the rebuilt input parts to the layer below and
    returns dL/dX_1..dL/dX_n.
    """
    layer = plan.layer
    parts = [y.detach() for y in ys]
    part_grads = list(grads)
    for k in reversed(range(layer.splits)):
        plan.rng[k].restore(plan.devices)
        others = [i for i in range(layer.splits) if i != k]
        leaves = {i: parts[i].detach().requires_grad_() for i in others}
        h = layer._pooled([leaves.get(i, parts[i]) for i in range(layer.splits)], k)
        # parts[k] is Y_k here; coupling with sign -1 gives X_k = Y_k - g, so d(X_k)/dg = -1.
        x_k = layer._couple(k, parts[k], h, -1.0, out.kwargs)
        own = plan.fn_params[k]
        inputs = [*(leaves[i] for i in others), *out.ctx_inputs, *(plan.params[j] for j in own)]
        got = torch.autograd.grad(x_k, inputs, -part_grads[k], allow_unused=True)
        for i, g in zip(others, got):
            part_grads[i] = _add(part_grads[i], g)
        m = len(others) + len(out.wanted_ctx)
        for i, g in zip(out.wanted_ctx, got[len(others) : m]):
            out.ctx[i] = _add(out.ctx[i], g)
        for j, g in zip(own, got[m:]):
            out.params[j] = _add(out.params[j], g)
        parts[k] = x_k.detach()
    if plan.below is not None:
        plan.below.parts = parts
    return part_grads


class ReversibleSequence(nn.Module):
    """A stack of :class:`ReversibleLayer` under one memory mode (docs/design.md 2.2).

    Args:
        layers: the layers, applied in order; they share the feature size d.
        mode: "reconstruct" (keep only the last output; rebuild each layer's input in the
            backward), "checkpoint" (keep each layer's input; recompute the layer) or
            "store" (plain autograd). See the module docstring.
    """

    def __init__(self, layers: Sequence[ReversibleLayer], mode: str = "reconstruct") -> None:
        super().__init__()
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, ReversibleLayer):
                raise ValueError(
                    f"ReversibleSequence: layers[{i}] is a {type(layer).__name__}, expected a ReversibleLayer"
                )
        if mode not in MODES:
            raise ValueError(f"ReversibleSequence: mode must be one of {MODES}, got {mode!r}")
        self.layers = nn.ModuleList(layers)
        self.mode = mode

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def forward(self, x: Tensor, **ctx: Any) -> Tensor:
        """y (batch, time, d) from x (batch, time, d); ctx is passed to every fn of every layer."""
        if self.mode not in MODES:
            raise ValueError(f"ReversibleSequence: mode must be one of {MODES}, got {self.mode!r}")
        if not self.layers:
            return x
        parts = self.layers[0].split(x)
        ctx_tensors: list[Tensor] = []
        rebuild_ctx = _gather_tensors(ctx, ctx_tensors)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or any(t.requires_grad for t in ctx_tensors)
            or any(p.requires_grad for p in self.parameters())
        )
        if self.mode == "store" or not needs_grad:
            for layer in self.layers:
                parts = layer.forward_parts(_resplit(layer, parts), ctx)
            return torch.cat(parts, dim=-1)
        devices = tuple(sorted({t.device.index for t in (x, *ctx_tensors) if t.is_cuda}))
        autocast = _Autocast.capture(x.device.type)
        backend = mdarts_kernels.current_backend()
        slots = [_Slot() for _ in range(len(self.layers) - 1)] if self.mode == "reconstruct" else []
        for i, layer in enumerate(self.layers):
            params, fn_params = _layer_params(layer)
            plan = _Plan(
                layer=layer,
                mode=self.mode,
                rebuild_ctx=rebuild_ctx,
                n_ctx=len(ctx_tensors),
                params=params,
                fn_params=fn_params,
                devices=devices,
                autocast=autocast,
                backend=backend,
                above=slots[i] if slots and i < len(slots) else None,
                below=slots[i - 1] if slots and i > 0 else None,
            )
            parts = list(_LayerFunction.apply(plan, *_resplit(layer, parts), *ctx_tensors, *params))
        return torch.cat(parts, dim=-1)


@torch.no_grad()
def reconstruction_error(sequence: ReversibleSequence, x: Tensor, **ctx: Any) -> list[float]:
    """Per-layer relative error of inputs rebuilt by inverting the stack from the top.

    Runs the stack forward from x (batch, time, d), then inverts it layer by layer from the
    top output, with each fn's RNG state restored as in "reconstruct" mode. Entry l is
    ||rebuilt input of layer l - true input|| / ||true input|| (Frobenius norms, float64),
    so entry 0 has gone through all len(sequence.layers) inversions. The global RNG is left
    untouched.
    """
    ctx_tensors: list[Tensor] = []
    _gather_tensors(ctx, ctx_tensors)
    devices = sorted({t.device.index for t in (x, *ctx_tensors) if t.is_cuda})
    truths: list[Tensor] = []
    states: list[list[_RngState]] = []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        parts = sequence.layers[0].split(x) if sequence.layers else [x]
        for layer in sequence.layers:
            parts = _resplit(layer, parts)
            truths.append(torch.cat(parts, dim=-1))
            recorded: list[_RngState] = []
            parts = layer.forward_parts(
                parts, ctx, before=lambda k, recorded=recorded: recorded.append(_RngState.capture(devices))
            )
            states.append(recorded)
        errors: list[float] = []
        for layer, truth, recorded in reversed(list(zip(sequence.layers, truths, states))):
            parts = layer.inverse_parts(
                _resplit(layer, parts), ctx, before=lambda k, recorded=recorded: recorded[k].restore(devices)
            )
            rebuilt = torch.cat(parts, dim=-1).double()
            errors.append(((rebuilt - truth.double()).norm() / truth.double().norm()).item())
    return errors[::-1]

"""Memory planner: predicted peak memory of one supernet training step (docs/design.md 4).

:func:`predict_memory` models one step (forward, backward, Adam on the weights and on the
architecture logits) of a :class:`~mdarts.model.Supernet` analytically:

* parameters, their gradients and the Adam state (2 x parameters), float32, counted exactly
  by building the supernet on the meta device;
* the activations autograd saves for backward, per candidate op and per layer: every layer
  in "store" (plain DARTS), the input of every layer in "checkpoint", only the top output of
  each stack in "reconstruct"; plus the ends (embeddings, final norms, output projection);
* the logits: (tokens x vocab) log-probabilities and their gradients, or one
  (chunk_rows x vocab) block with the chunked loss (:func:`mdarts.loss.chunked_output_loss`);
* the peak transient of the backward: the loss backward, or the recomputed graph of one node
  ("reconstruct") or one layer ("checkpoint") with the gradients flowing through it, and
  the optimizer's temporaries.

The bytes each candidate op saves are its ``saved_bytes`` formula in the op registry
(:func:`mdarts.ops.register_op`); those of the built-in ops were read off
``saved_tensors_hooks`` counts on the CPU (each storage once, parameters excluded), are exact
there for float32, and ``tests/test_plan.py`` checks them against those counts. The transient
terms were fitted to the peaks measured by ``benchmarks/memory.py``.

Units: bytes. ``tokens`` is the number of target tokens per batch (batch x seq_len); the
source has as many. Attention terms grow with ``seq_len`` (tokens x seq_len per head).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .config import MEMORY_MODES, ModelConfig
from .model import Supernet
from .ops import DECODER_FIXED_OP, op_spec
from .sizing import count_parameters as network_parameters
from .sizing import d_step

DEVICES = ("cpu", "cuda")
MAX_LAYERS = 24
"""Deepest stack (encoder or decoder) a plan models: counting the supernet's parameters builds
it (on the meta device) at three widths, about 0.1 s a layer; at 24 a plan answers in about
3 s on a busy CPU core. Four times the presets' depth."""
MAX_D_MODEL = 16384
"""Widest d_model a plan models (and :func:`largest_d` looks up to)."""
FLOAT32 = 4  # parameters, gradients, Adam state and LayerNorm statistics stay float32
INDEX = 8  # token ids (int64)
# memory the first training step of a process takes besides tensors (thread pools, kernel
# caches, the autograd engine's thread), measured on the CPU as the offset of the peak
# resident set at constant slope in tokens x vocab; on CUDA the cuBLAS workspace
RUNTIME_OVERHEAD = {"cpu": 20 * 2**20, "cuda": 8 * 2**20}
# page rounding of the many small saved tensors (each mmapped block takes whole pages plus a
# header on the CPU), as a fraction of the saved bytes: fitted to the store-mode peaks
ALLOCATOR_SLACK = {"cpu": 0.05, "cuda": 0.0}


def _op_saved_bytes(name: str, rows: int, seq_len: int, width: int, config: ModelConfig, f: int) -> int:
    """Bytes autograd saves inside the parametric candidate op ``name`` on an input h of
    (rows = batch x seq_len, width), f bytes per element: its registered formula
    (:data:`mdarts.ops.SavedBytes`). ValueError for an unknown op."""
    return op_spec(name).saved_bytes(rows, seq_len, width, config, f)


def _node_saved_bytes(
    candidates: Sequence[str], rows: int, seq_len: int, width: int, config: ModelConfig, f: int
) -> int:
    """A node's saved bytes: its ops plus the fused LayerNorm-sum (op outputs and the 2 x K
    row statistics); the pooled input h is counted by the layer."""
    parametric = [name for name in candidates if op_spec(name).parametric]
    ops = sum(_op_saved_bytes(name, rows, seq_len, width, config, f) for name in parametric)
    return ops + len(parametric) * (f * rows * width + 2 * FLOAT32 * rows)


def _node_backward_bytes(
    candidates: Sequence[str], rows: int, seq_len: int, width: int, config: ModelConfig, f: int
) -> int:
    """Transient of a node's backward beyond its saved bytes: the K gradients of the op outputs,
    made at once by the fused LayerNorm-sum. The ops' inner gradients live one op at a time
    and are freed with its saved tensors; the measured peaks of benchmarks/memory.py (d 96 to
    528, 512 to 2048 tokens) show nothing beyond the K gradients."""
    parametric = [name for name in candidates if op_spec(name).parametric]
    return len(parametric) * f * rows * width


def _side(config: ModelConfig, side: str) -> tuple[int, int, list[tuple[str, ...]]]:
    """(layers, splits, candidate lists of the nodes of one layer) of the encoder or decoder."""
    if side == "encoder":
        return config.encoder_layers, config.encoder_splits, [config.encoder_candidates] * config.encoder_splits
    searched = [config.decoder_candidates] * (config.decoder_splits - 1)
    return config.decoder_layers, config.decoder_splits, [*searched, (DECODER_FIXED_OP,)]


def _layer_saved_bytes(config: ModelConfig, side: str, rows: int, seq_len: int, f: int) -> int:
    """Saved bytes of one layer in plain autograd: its n outputs (the next layer's input),
    the pooled inputs when n > 2 (n = 2 pools one part, which is that part), and its nodes."""
    _, splits, nodes = _side(config, side)
    width = config.d_model // splits
    stream = f * rows * config.d_model * (2 if splits > 2 else 1)
    return stream + sum(_node_saved_bytes(node, rows, seq_len, width, config, f) for node in nodes)


def count_parameters(config: ModelConfig, vocab_size: int) -> tuple[int, int]:
    """(number of weights, number of architecture logits) of the supernet.

    The weight count is a quadratic polynomial in d_model (every weight matrix is d/n x d/n,
    d/n x d, d x e or vocab x e, every vector d/n or d long): it is counted exactly by building
    the supernet on the meta device (:func:`mdarts.sizing.count_parameters`) at the three
    smallest valid widths and interpolating.
    """
    step = d_step(config)
    arch = config.unit_layers * (
        config.encoder_splits * len(config.encoder_candidates)
        + (config.decoder_splits - 1) * len(config.decoder_candidates)
    )
    counts = _counts_at_small_widths(config.replace(d_model=step), vocab_size)
    m = config.d_model // step  # counts[i] is the count at d = (i + 1) * step
    c0, c1, c2 = (count - arch for count in counts)
    # Lagrange interpolation through (1, c0), (2, c1), (3, c2)
    weights = (c0 * (m - 2) * (m - 3) - 2 * c1 * (m - 1) * (m - 3) + c2 * (m - 1) * (m - 2)) // 2
    return weights, arch


@functools.lru_cache(maxsize=64)
def _counts_at_small_widths(config: ModelConfig, vocab_size: int) -> tuple[int, ...]:
    """Parameter counts (weights and logits) of the supernet at d = 1, 2 and 3 times
    config.d_model."""

    def build(c: ModelConfig) -> Supernet:
        return Supernet(c.replace(memory_mode="store"), vocab_size)

    return tuple(network_parameters(build, config.replace(d_model=k * config.d_model))[0] for k in (1, 2, 3))


def _largest_parameter(config: ModelConfig, vocab_size: int) -> int:
    """Elements of the largest parameter tensor (the embedding table or an op's weight)."""
    d, c = config.d_model, config.d_model // min(config.encoder_splits, config.decoder_splits)
    return max(
        vocab_size * config.embed_dim,
        d * config.embed_dim,
        config.ffn_mult * c * c,
        2 * d * (d // config.decoder_splits),
    )


def predict_memory(
    config: ModelConfig,
    vocab_size: int,
    tokens: int,
    mode: str,
    chunk_rows: int = 0,
    dtype_bytes: int = 4,
    seq_len: Optional[int] = None,
    device: str = "cpu",
) -> dict:
    """Predicted memory of one supernet training step, by component, in bytes.

    Args:
        config: the search space (its ``memory_mode`` is ignored: ``mode`` decides).
        vocab_size: V, rows of the (tied) output layer.
        tokens: target tokens per batch (batch x seq_len); the source batch has as many.
        mode: "reconstruct", "checkpoint" or "store".
        chunk_rows: 0 for the full (tokens x V) logits, else the chunked loss's block rows.
        dtype_bytes: bytes per activation element (4: float32).
        seq_len: tokens per sequence, for the attention terms (default min(tokens, 64,
            config.max_positions)).
        device: "cpu" (Adam updates one tensor at a time) or "cuda" (foreach Adam, whose
            temporaries span all parameters).

    Returns a dict with ``parameters``, ``gradients``, ``optimizer_state``, ``setup`` (their
    sum), ``activations`` (saved for backward at the end of the forward, logits included),
    ``activations_by_part`` (a dict: embeddings, encoder, decoder, output, logits), ``logits``
    (bytes of the log-probabilities or chunk held), ``backward_transient`` (the largest
    transient above what is saved), ``optimizer_transient``, ``runtime_overhead`` (non-tensor
    memory of the first step), ``allocator_slack``, ``peak_above_setup`` (what benchmarks/memory.py measures)
    and ``total`` (setup + peak_above_setup), all ints.

    Raises ValueError naming the field for a d_model that does not split (ModelConfig.
    check_splits), and naming the argument for an unknown mode or device, tokens < 1,
    vocab_size < 1, chunk_rows < 0, dtype_bytes not in (2, 4, 8) or seq_len < 1.
    """
    seq_len = _check_plan_inputs(config, vocab_size, tokens, mode, chunk_rows, dtype_bytes, seq_len, device)
    f, rows = dtype_bytes, tokens
    weights, arch = count_parameters(config, vocab_size)
    parameters = FLOAT32 * (weights + arch)
    gradients = parameters
    optimizer_state = 2 * parameters
    ends = _ends_bytes(config, vocab_size, rows, chunk_rows, f)
    body, recompute = _body_bytes(config, mode, rows, seq_len, f)
    activations = ends["embeddings"] + body["encoder"] + body["decoder"] + ends["output"] + ends["logits"]
    if mode == "store":
        # the loss backward, or the first node's backward with every layer still saved
        transient = max(ends["logits_live"], ends["loss_backward"], recompute["decoder"])
    else:
        # after the loss backward, the decoder recomputes with the encoder's ends still held
        transient = max(
            ends["logits_live"], ends["loss_backward"], recompute["decoder"], recompute["encoder"] - body["decoder"]
        )
    largest = FLOAT32 * _largest_parameter(config, vocab_size)
    optimizer_transient = parameters if device == "cuda" else 2 * largest
    slack = int(ALLOCATOR_SLACK[device] * activations)
    peak = max(activations + transient + slack, optimizer_transient) + RUNTIME_OVERHEAD[device]
    setup = parameters + gradients + optimizer_state
    return {
        "mode": mode,
        "parameters": parameters,
        "gradients": gradients,
        "optimizer_state": optimizer_state,
        "setup": setup,
        "activations": activations,
        "activations_by_part": {
            "embeddings": ends["embeddings"],
            "encoder": body["encoder"],
            "decoder": body["decoder"],
            "output": ends["output"],
            "logits": ends["logits"],
        },
        "logits": ends["logits"],
        "backward_transient": transient,
        "optimizer_transient": optimizer_transient,
        "runtime_overhead": RUNTIME_OVERHEAD[device],
        "allocator_slack": slack,
        "peak_above_setup": peak,
        "total": setup + peak,
    }


def _check_plan_inputs(
    config: ModelConfig,
    vocab_size: int,
    tokens: int,
    mode: str,
    chunk_rows: int,
    dtype_bytes: int,
    seq_len: Optional[int],
    device: str,
) -> int:
    """Raise ValueError for the inputs :func:`predict_memory` refuses; the sequence length to use."""
    config.check_splits()
    for name in ("encoder_layers", "decoder_layers"):
        if getattr(config, name) > MAX_LAYERS:
            raise ValueError(f"{name}: expected at most {MAX_LAYERS} layers to plan, got {getattr(config, name)}")
    if config.d_model > MAX_D_MODEL:
        raise ValueError(f"d_model: expected at most {MAX_D_MODEL} to plan, got {config.d_model}")
    if mode not in MEMORY_MODES:
        raise ValueError(f"mode: expected one of {', '.join(MEMORY_MODES)}, got {mode!r}")
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    for name, value in (("tokens", tokens), ("vocab_size", vocab_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not isinstance(chunk_rows, int) or chunk_rows < 0:
        raise ValueError(f"chunk_rows: expected 0 (full logits) or a positive integer, got {chunk_rows!r}")
    if dtype_bytes not in (2, 4, 8):
        raise ValueError(f"dtype_bytes: expected 2, 4 or 8, got {dtype_bytes!r}")
    if seq_len is None:
        seq_len = min(tokens, 64, config.max_positions)
    if not isinstance(seq_len, int) or not 1 <= seq_len <= config.max_positions:
        longest = config.max_positions
        raise ValueError(f"seq_len: expected an integer from 1 to max_positions {longest}, got {seq_len!r}")
    return seq_len


def _ends_bytes(config: ModelConfig, vocab: int, rows: int, chunk_rows: int, f: int) -> dict[str, int]:
    """Bytes of the network's ends: ``embeddings``, ``output`` and ``logits`` saved for backward,
    ``logits_live`` (held until the loss is formed) and ``loss_backward`` (its gradients)."""
    d, e = config.d_model, config.embed_dim
    # the ends: per side the embedding (ids, projection input), the final LayerNorm's input
    # and statistics; the encoder memory (read by every cross-attention)
    embed = INDEX * rows + (f * rows * e if e != d else 0)
    norm = f * rows * d + 2 * FLOAT32 * rows
    embeddings = 2 * embed
    output = 2 * norm + f * rows * d + (f * rows * d if e != d else 0) + INDEX * rows
    if chunk_rows:
        logits = FLOAT32 * (rows * e + vocab * e)  # the chunked loss keeps its two gradients
        logits_live = 3 * FLOAT32 * min(chunk_rows, rows) * vocab  # logits, log-probs, product
        loss_backward = FLOAT32 * (rows * e + vocab * e)
    else:
        output += f * rows * e  # the features, saved by the output projection
        logits = FLOAT32 * rows * vocab  # log-probabilities saved by log_softmax
        logits_live = FLOAT32 * rows * vocab  # the logits themselves, until the loss is formed
        loss_backward = 2 * FLOAT32 * rows * vocab  # gradients of log-probabilities and logits
    return {
        "embeddings": embeddings,
        "output": output,
        "logits": logits,
        "logits_live": logits_live,
        "loss_backward": loss_backward,
    }


def _body_bytes(
    config: ModelConfig, mode: str, rows: int, seq_len: int, f: int
) -> tuple[dict[str, int], dict[str, int]]:
    """Per side (encoder, decoder): bytes held through the forward in ``mode``, and the largest
    transient of its backward (what is rebuilt, plus a node's backward)."""
    d = config.d_model
    body: dict[str, int] = {}
    recompute: dict[str, int] = {}
    for side in ("encoder", "decoder"):
        layers, splits, nodes = _side(config, side)
        width = d // splits
        layer = _layer_saved_bytes(config, side, rows, seq_len, f)
        node_backward = max(_node_backward_bytes(node, rows, seq_len, width, config, f) for node in nodes)
        node_peak = max(
            _node_saved_bytes(node, rows, seq_len, width, config, f)
            + _node_backward_bytes(node, rows, seq_len, width, config, f)
            for node in nodes
        )
        # part gradients (input and output of the layer) and, in the decoder, the memory's
        grads = 2 * f * rows * d + (2 * f * rows * d if side == "decoder" else 0)
        if mode == "store":
            body[side] = layers * layer
            recompute[side] = node_backward + grads  # the node's saved tensors are counted in body
        elif mode == "checkpoint":
            body[side] = layers * f * rows * d
            recompute[side] = layer + node_backward + grads  # one layer rebuilt, then its backward
        else:
            body[side] = f * rows * d  # the top layer's output
            recompute[side] = f * rows * d * (2 if splits > 2 else 1) + node_peak + grads  # one node rebuilt
    return body, recompute


def largest_d(
    budget_bytes: int, config: ModelConfig, vocab_size: int, tokens: int, mode: str, chunk_rows: int = 0, **kwargs
) -> Optional[int]:
    """The largest valid d_model (at most :data:`MAX_D_MODEL`) whose predicted total (set-up + peak) fits in
    ``budget_bytes``, with the other sizes of ``config``; None when even the smallest valid d
    does not fit. ``kwargs`` go to :func:`predict_memory` (dtype_bytes, seq_len, device).

    Raises ValueError naming the argument for a budget < 1 (and as predict_memory).
    """
    if not isinstance(budget_bytes, (int, float)) or budget_bytes < 1:
        raise ValueError(f"budget_bytes: expected a positive number of bytes, got {budget_bytes!r}")
    step = d_step(config)

    def fits(multiple: int) -> bool:
        candidate = config.replace(d_model=multiple * step)
        return predict_memory(candidate, vocab_size, tokens, mode, chunk_rows, **kwargs)["total"] <= budget_bytes

    if not fits(1):
        return None
    low, high = 1, max(1, MAX_D_MODEL // step)  # fits(low); the predicted total grows with d
    if fits(high):
        return high * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * step


def _gib(value: int) -> str:
    return f"{value / 2**30:.3f}"


def format_plan(
    config: ModelConfig,
    vocab_size: int,
    tokens: int,
    budget_bytes: Optional[int] = None,
    modes: Sequence[str] = MEMORY_MODES,
    **options: Any,
) -> str:
    """A markdown table of :func:`predict_memory` (GiB) with one column per mode, and with a
    ``budget_bytes`` the largest d that fits it per mode (or a message when none does).
    ``options`` go to :func:`predict_memory` (chunk_rows, dtype_bytes, seq_len, device)."""
    plans = [predict_memory(config, vocab_size, tokens, mode, **options) for mode in modes]
    chunk_rows, device = options.get("chunk_rows", 0), options.get("device", "cpu")
    title = (
        f"Predicted memory (GiB) of one training step: d {config.d_model}, "
        f"{config.encoder_layers}+{config.decoder_layers} layers, "
        f"{len(config.encoder_candidates)}/{len(config.decoder_candidates)} candidate ops, "
        f"{tokens} tokens, vocab {vocab_size}, "
        f"{'chunked loss (' + str(chunk_rows) + ' rows)' if chunk_rows else 'full logits'}, {device}"
    )
    lines = [title, "", "| component | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    rows = [
        ("parameters", lambda p: p["parameters"]),
        ("gradients", lambda p: p["gradients"]),
        ("optimizer state (Adam)", lambda p: p["optimizer_state"]),
        *(
            (f"saved: {part}", lambda p, part=part: p["activations_by_part"][part])
            for part in ("embeddings", "encoder", "decoder", "output", "logits")
        ),
        ("saved for backward (total)", lambda p: p["activations"]),
        ("backward transient", lambda p: p["backward_transient"]),
        ("peak above set-up", lambda p: p["peak_above_setup"]),
        ("**total peak**", lambda p: p["total"]),
    ]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(_gib(get(p)) for p in plans) + " |")
    if budget_bytes is not None:
        lines += ["", f"Largest d that fits {budget_bytes / 2**30:.1f} GiB (other sizes as above):"]
        for mode in modes:
            best = largest_d(budget_bytes, config, vocab_size, tokens, mode, **options)
            if best is None:
                lines.append(f"- {mode}: no valid d fits (even d = {d_step(config)} needs more than the budget)")
            else:
                lines.append(f"- {mode}: d = {best}")
    return "\n".join(lines)


def default_memory_budget(device: torch.device) -> int:
    """Bytes a training step may use when none is given: 90% of the GPU's memory, or 80% of
    the memory the system has available now (Linux ``MemAvailable``; 8 GiB when unknown)."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(0.8 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 8 * 2**30


def choose_memory_mode(
    config: ModelConfig,
    vocab_size: int,
    tokens: int,
    device: torch.device,
    budget_bytes: int,
    dtype_bytes: int = 4,
    chunk_rows: int = 0,
) -> tuple[str, str]:
    """The fastest memory mode whose predicted step fits ``budget_bytes`` (store, else
    checkpoint, else reconstruct, which is returned when none fits) and the reason, for the log.
    ``chunk_rows``: 0 for the full logits, else the chunked loss's block rows."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    for mode in ("store", "checkpoint", "reconstruct"):
        prediction = predict_memory(config, vocab_size, tokens, mode, chunk_rows, dtype_bytes, device=kind)
        total = prediction["total"]
        if total <= budget_bytes:
            return mode, f"{mode}: predicted {_gib(total)} GiB fits the budget of {_gib(budget_bytes)} GiB"
    return "reconstruct", f"reconstruct: no mode is predicted to fit {_gib(budget_bytes)} GiB (reconstruct needs least)"

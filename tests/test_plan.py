"""Tests of mdarts.plan: the analytic activation model against saved_tensors_hooks counts
(per candidate op and for whole supernets in every mode), its shape in depth, largest_d and
bad input.

Tolerance: the saved-bytes model is exact up to small bookkeeping tensors (masks, indices),
so it is held to 5% here, tighter than the 15% target on peaks; the peak itself is measured
in fresh processes by benchmarks/memory.py (an in-process RSS peak is not reliable).
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY

from mdarts.config import ModelConfig
from mdarts.loss import sequence_loss
from mdarts.memory import saved_tensor_bytes
from mdarts.model import Supernet
from mdarts.ops import DECODER_CANDIDATES, OpContext, build_candidate
from mdarts.plan import _op_saved_bytes, count_parameters, format_plan, largest_d, predict_memory

VOCAB = 120
TOLERANCE = 0.05


@pytest.mark.parametrize("name", [op for op in DECODER_CANDIDATES if op not in ("zero", "identity")])
@pytest.mark.parametrize("batch,time,width,heads", [(2, 12, 24, 4), (3, 8, 16, 2)])
def test_op_constants_match_saved_tensor_counts(name: str, batch: int, time: int, width: int, heads: int) -> None:
    config = TINY.replace(heads=heads, ffn_mult=3)
    op = build_candidate(name, width, True, config, d_memory=3 * width).train()
    h = torch.randn(batch, time, width, requires_grad=True)
    memory = torch.randn(batch, time, 3 * width, requires_grad=True)
    ctx = OpContext(
        pad_mask=torch.zeros(batch, time, dtype=torch.bool),
        memory=memory,
        memory_pad_mask=torch.zeros(batch, time, dtype=torch.bool),
    )
    measured = saved_tensor_bytes(lambda: op(h, ctx), [h, memory, ctx.pad_mask, ctx.memory_pad_mask, *op.parameters()])
    predicted = _op_saved_bytes(name, batch * time, time, width, config, 4)
    assert predicted == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint", "store"])
@pytest.mark.parametrize(
    "config,chunk_rows",
    [
        (TINY, 0),
        (TINY.replace(encoder_layers=3, decoder_layers=3, d_model=96, embed_dim=96), 16),
        (
            TINY.replace(
                encoder_candidates=("zero", "identity", "conv3", "attention"),
                decoder_candidates=("zero", "identity", "dynconv7", "cross_attention"),
            ),
            0,
        ),
    ],
)
def test_saved_bytes_of_supernet_match_prediction(mode: str, config: ModelConfig, chunk_rows: int) -> None:
    config = config.replace(memory_mode=mode)
    torch.manual_seed(0)
    model = Supernet(config, VOCAB).train()
    batch, time = 3, 10
    src = torch.randint(1, VOCAB, (batch, time))
    tgt = torch.randint(1, VOCAB, (batch, time))
    measured = saved_tensor_bytes(
        lambda: sequence_loss(model, src, tgt, tgt, 0.1, chunk_rows), list(model.parameters())
    )
    predicted = predict_memory(config, VOCAB, batch * time, mode, chunk_rows, seq_len=time)["activations"]
    assert predicted == pytest.approx(measured, rel=TOLERANCE)


def test_parameter_count_is_exact() -> None:
    for d in (48, 96, 240):
        config = TINY.replace(d_model=d, encoder_layers=3, unit_layers=1)
        model = Supernet(config, VOCAB)
        weights = sum(p.numel() for p in model.weight_parameters())
        arch = sum(p.numel() for p in model.arch_parameters())
        assert count_parameters(config, VOCAB) == (weights, arch)


def test_store_grows_with_depth_and_reconstruct_stays_flat() -> None:
    def peak(layers: int, mode: str) -> int:
        config = TINY.replace(encoder_layers=layers, decoder_layers=layers)
        return predict_memory(config, VOCAB, 256, mode, seq_len=32)["peak_above_setup"]

    stores = [peak(n, "store") for n in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(stores, stores[1:]))
    assert stores[-1] > 8 * (stores[0] - predict_memory(TINY, VOCAB, 256, "store", seq_len=32)["runtime_overhead"])
    assert peak(16, "reconstruct") == peak(2, "reconstruct")
    checkpoints = [peak(n, "checkpoint") for n in (2, 16)]
    assert checkpoints[0] < checkpoints[1] < stores[-1]


def test_largest_d_is_monotone_in_the_budget_and_none_when_nothing_fits() -> None:
    config = TINY.replace(encoder_layers=4, decoder_layers=4)
    results = [largest_d(gib * 2**30, config, 1000, 1024, "store", seq_len=32) for gib in (0.25, 0.5, 1, 2, 4)]
    assert all(r is not None for r in results)
    assert results == sorted(results)
    assert results[0] < results[-1]
    for d in results:
        config.replace(d_model=d)  # a valid width
    assert largest_d(1024, config, 1000, 1024, "reconstruct") is None
    reconstruct = largest_d(2 * 2**30, config, 1000, 1024, "reconstruct", seq_len=32)
    assert reconstruct >= results[3]


def test_format_plan_lists_modes_and_reports_an_impossible_budget() -> None:
    text = format_plan(TINY, VOCAB, 64, budget_bytes=1024)
    for mode in ("reconstruct", "checkpoint", "store"):
        assert mode in text
        assert f"- {mode}: no valid d fits" in text
    assert "d = " in format_plan(TINY, VOCAB, 64, budget_bytes=2**30)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"mode": "plain"}, "mode"),
        ({"tokens": 0}, "tokens"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"chunk_rows": -1}, "chunk_rows"),
        ({"dtype_bytes": 3}, "dtype_bytes"),
        ({"seq_len": 0}, "seq_len"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, argument: str) -> None:
    call = {"config": TINY, "vocab_size": VOCAB, "tokens": 64, "mode": "store", **kwargs}
    with pytest.raises(ValueError, match=argument):
        predict_memory(**call)


def test_largest_d_rejects_a_non_positive_budget() -> None:
    with pytest.raises(ValueError, match="budget_bytes"):
        largest_d(0, TINY, VOCAB, 64, "store")


def test_a_width_that_does_not_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="d_model"):
        predict_memory(TINY.replace(d_model=128), VOCAB, 64, "store")

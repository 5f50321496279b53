"""Helpers shared by the test modules (fixtures live in conftest.py).

    from helpers import TINY, TOLERANCES, devices, skip_unless_available

* :data:`REPO_ROOT`: the repository checkout (README.md, mdarts_kernels/ ...).
* :func:`devices`: ``@pytest.mark.parametrize("device", devices())``: "cpu", and "cuda"
  skipped where no CUDA device is present.
* :func:`skip_unless_available`: skip the test when a kernel backend cannot run on a device.
* :data:`TOLERANCES`, :data:`ELEMENTWISE_TOLERANCES`: ``assert_close`` keyword arguments per dtype.
* :data:`TINY`: the one tiny :class:`~mdarts.config.ModelConfig` of the suite.
* :func:`head`: the first ``n`` pairs of an encoded split (of the ``multi30k_corpus`` fixture).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from mdarts.config import ModelConfig, TrainConfig
    from mdarts.prepare import EncodedSplit

# Nothing of mdarts or mdarts_kernels is imported here at import time: test_triton_kernels_raw
# must still load the raw kernels when the package itself fails to import, and the kernel
# tests need none of the engine's dependencies (sentencepiece, ...).

REPO_ROOT = Path(__file__).resolve().parents[1]

# A fused op (a sum of K weighted terms, a LayerNorm, a pooling) against the eager reference,
# values and input gradients: the kernels round differently from the reference's eager ops.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# An elementwise op (seeded dropout: x * mask * scale) against the reference: one rounding of
# the output, except that float64 is scaled by a float32 1 / (1 - p) in the Triton kernels.
ELEMENTWISE_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=0.0, atol=0.0),  # bit for bit
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def _tiny() -> "ModelConfig":
    """TINY, the tiny model of every test that needs one: 2 + 2 layers, d 24 (encoder parts 12,
    decoder parts 8, each divisible by 2 heads), embeddings 16, every candidate op, 32
    positions. Tests that need another size or search space derive it with TINY.replace(...)."""
    from mdarts.config import ModelConfig

    return ModelConfig(d_model=24, embed_dim=16, encoder_layers=2, decoder_layers=2, heads=2, max_positions=32)


def search_config() -> "ModelConfig":
    """The tiny supernet of the search tests: TINY with one layer a side and one unit layer, 256
    positions, and five candidates a node (three ops, zero and identity)."""
    ops = ("conv3", "attention", "ffn", "zero", "identity")
    return _tiny().replace(
        encoder_layers=1,
        decoder_layers=1,
        unit_layers=1,
        max_positions=256,
        encoder_candidates=ops,
        decoder_candidates=(*ops, "cross_attention"),
    )


def short_training(**changes) -> "TrainConfig":
    """A few updates of a tiny training run on the CPU (lr 2e-3, warm-up 10, 512-position batches,
    6 steps, validation every 3, a log line every step, 2 step checkpoints); ``changes`` override."""
    from mdarts.config import TrainConfig

    values = dict(lr=2e-3, warmup_steps=10, max_tokens=512, max_steps=6, valid_interval=3, log_interval=1)
    return TrainConfig(**{**values, "keep_last": 2, "device": "cpu", **changes})


def __getattr__(name: str):
    """``from helpers import TINY`` builds it on first use (see _tiny), importing mdarts then."""
    if name == "TINY":
        globals()["TINY"] = _tiny()
        return globals()["TINY"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def devices() -> list:
    """Devices to parametrize a test over: "cpu", and "cuda" (skipped without a CUDA device)."""
    return [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    ]


def skip_unless_available(backend: str, device: str) -> None:
    """Skip the calling test unless mdarts_kernels' ``backend`` can run on ``device``
    ("reference" always can); the skip reason says why not."""
    import mdarts_kernels

    status = mdarts_kernels.available_backends(device)[backend]
    if not status.ok:
        pytest.skip(f"backend {backend} on {device}: {status.reason}")


def head(split: "EncodedSplit", n: int) -> "EncodedSplit":
    """The first ``n`` pairs of ``split``: raw text and ids, still aligned (a new object; the
    session's corpus is shared by every test and must not be changed in place)."""
    from mdarts.prepare import EncodedSplit

    corpus = split.corpus
    text = type(corpus)(corpus.src_lang, corpus.tgt_lang, corpus.split, corpus.src[:n], corpus.tgt[:n])
    return EncodedSplit(text, split.src_ids[:n], split.tgt_ids[:n])


def exit_status(argv: list[str]) -> int:
    """``mdarts.cli.main(argv)``'s exit status, whether the parser exits (SystemExit) or main returns it."""
    from mdarts.cli import main

    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code

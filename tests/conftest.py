"""Test set-up: Triton kernels run under the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models gain nothing from more, and on shared
    cores the thread hand-offs of many small ops cost more than the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    """The Multi30k raw-data folder: $MDARTS_DATA, else ../shared/data/multi30k beside the repo."""
    path = Path(os.environ.get("MDARTS_DATA", SHARED_DATA))
    if not (path / "train.en.gz").exists():
        pytest.fail(f"Multi30k data not found in {path}: set MDARTS_DATA to the folder holding train.en.gz")
    return path

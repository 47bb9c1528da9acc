"""Kernel tests run on a GPU when there is one, else under the Triton interpreter on CPU tensors.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when cxrfm.kernels is first imported, so it is set
here, before the test modules import it. (Importing torch does not import triton.)
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; a NaN or inf anywhere fails every tolerance."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture
def rel_err():
    return _rel_err


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

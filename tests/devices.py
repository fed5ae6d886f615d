"""The GPU marks, declared once: tests that need CUDA are marked `gpu` and skip cleanly without it."""

from __future__ import annotations

import pytest
import torch

CUDA_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# For tests parametrized over devices: the CPU always, CUDA where there is a device.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def needs_cuda(test):
    """Marks one test as a GPU test."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test

"""pytest plugin: the CUDA memory each test leaves allocated, and its peak, one line per test.

What holds device memory from one test to the next: a tensor kept alive (allocated stays up after
gc) or garbage in reference cycles (it drops at gc). Lines go to $CUDA_MEMORY_LOG (default stderr).

    CUDA_MEMORY_LOG=mem.log PYTHONPATH=benchmarks python3 -m pytest -p cuda_memory_report tests/...
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

GiB = 2**30


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown, so what they held is gone
def pytest_runtest_teardown(item, nextitem) -> None:
    if not torch.cuda.is_initialized():
        return
    left = torch.cuda.memory_allocated() / GiB
    gc.collect()
    after_gc = torch.cuda.memory_allocated() / GiB
    peak = torch.cuda.max_memory_allocated() / GiB
    torch.cuda.reset_peak_memory_stats()
    line = f"{item.nodeid}: left {left:.2f} GiB, after gc {after_gc:.2f}, peak {peak:.2f}\n"
    path = os.environ.get("CUDA_MEMORY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line)
    else:
        sys.stderr.write(line)

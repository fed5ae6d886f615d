"""pytest plugin: the CUDA memory each test leaves allocated, and its peak, one line per test.

What holds device memory from one test to the next: a tensor kept alive (allocated stays up after
gc) or garbage in reference cycles (it drops at gc). When a test leaves more than 64 MiB alive, the
first few such tests also log who holds their largest CUDA tensor (its chain of referrers). Lines go
to $CUDA_MEMORY_LOG (default stderr).

    CUDA_MEMORY_LOG=mem.log PYTHONPATH=benchmarks python3 -m pytest -p cuda_memory_report tests/...
"""

from __future__ import annotations

import gc
import os
import sys
import types
import warnings

import pytest
import torch

GiB = 2**30
_state = {"after_gc": 0.0, "traced": 0}


def _describe(obj: object) -> str:
    if isinstance(obj, types.FrameType):
        return f"frame {obj.f_code.co_name} ({obj.f_code.co_filename}:{obj.f_lineno})"
    if isinstance(obj, types.TracebackType):
        return f"traceback at {obj.tb_frame.f_code.co_name}"
    if isinstance(obj, BaseException):
        return f"exception {type(obj).__name__}: {str(obj)[:80]}"
    if isinstance(obj, dict):
        return f"dict with keys {list(obj)[:6]}"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} of {len(obj)}"
    if isinstance(obj, torch.Tensor):
        return f"tensor {tuple(obj.shape)} {obj.dtype} {obj.device}"
    return type(obj).__qualname__


def _ours(obj: object) -> bool:
    return isinstance(obj, types.FrameType) and obj.f_code.co_filename == __file__


def _holders(leaked: torch.Tensor, depth: int = 6) -> list[str]:
    """Who keeps `leaked` alive: its referrers, then the first referrer's, `depth` levels up."""
    lines, obj, seen = [], leaked, {id(leaked)}
    for level in range(depth):
        refs = [r for r in gc.get_referrers(obj) if id(r) not in seen and not _ours(r)]
        seen.add(id(refs))  # the next level's referrers include this list
        if not refs:
            lines.append(f"  {'  ' * level}(no further referrer)")
            break
        lines += [f"  {'  ' * level}<- {_describe(r)}" for r in refs[:3]]
        obj = refs[0]
        seen.add(id(obj))
    return lines


def _trace(device: str = "cuda") -> list[str]:
    with warnings.catch_warnings():  # isinstance() touches deprecated torch attributes
        warnings.simplefilter("ignore")
        alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type == device]
    if not alive:
        return [f"  no {device} tensor is tracked by gc (held outside Python: C++ or a cache)"]
    largest = max(alive, key=lambda t: t.untyped_storage().nbytes())
    head = f"  {len(alive)} {device} tensors alive; largest {_describe(largest)}"
    del alive  # not a referrer to report
    return [head, *_holders(largest)]


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown, so what they held is gone
def pytest_runtest_teardown(item, nextitem) -> None:
    if not torch.cuda.is_initialized():
        return
    left = torch.cuda.memory_allocated() / GiB
    gc.collect()
    after_gc = torch.cuda.memory_allocated() / GiB
    peak = torch.cuda.max_memory_allocated() / GiB
    torch.cuda.reset_peak_memory_stats()
    lines = [f"{item.nodeid}: left {left:.2f} GiB, after gc {after_gc:.2f}, peak {peak:.2f}"]
    if after_gc - _state["after_gc"] > 1 / 16 and _state["traced"] < 3:
        _state["traced"] += 1
        lines += _trace()
    _state["after_gc"] = after_gc
    text = "\n".join(lines) + "\n"
    path = os.environ.get("CUDA_MEMORY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(text)
    else:
        sys.stderr.write(text)

"""Every ```python block in README.md runs.

Blocks run in order, each in a fresh namespace that starts with the names the README's first block
(the shared model) defines, so a block can use `model` and `x` the way the README says. Markers on a
block's first line:
  `# needs: cuda`        skipped without a CUDA device;
  `# pending: NAME`      the block uses `normpass.NAME`, not landed yet: skipped while it is missing.
Shell blocks are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import normpass

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


BLOCKS = python_blocks()


def run_block(line: int, code: str, namespace: dict) -> None:
    exec(compile(code, f"{README}:{line}", "exec"), namespace)


@pytest.fixture(scope="module")
def shared() -> dict:
    """The names the first block defines (the shared model), run once."""
    namespace: dict = {"__name__": "readme"}
    run_block(*BLOCKS[0], namespace)
    return namespace


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 6
    assert "class RMSNorm" in BLOCKS[0][1]


@pytest.mark.parametrize("line, code", BLOCKS[1:], ids=[f"README.md:{line}" for line, _ in BLOCKS[1:]])
def test_readme_block(line, code, shared):
    first = code.splitlines()[0]
    if first.startswith("# needs: cuda") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pending = re.match(r"# pending: (\w+)", first)
    if pending and not hasattr(normpass, pending.group(1)):
        pytest.skip(f"normpass.{pending.group(1)} has not landed yet")
    torch.manual_seed(0)
    run_block(line, code, {**shared, "x": torch.randn(2, 16, 64)})

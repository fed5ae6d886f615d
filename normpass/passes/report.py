"""The report: one row per normalization site found, what was done with it, and why."""

from __future__ import annotations

import dataclasses
import re

from torch import fx


@dataclasses.dataclass(frozen=True)
class Row:
    """One site. `op` is the normpass op it became, or None when it was left alone."""

    where: str  # module path (or node name when the graph does not record one)
    source: str  # file:line, when the graph records a stack trace
    form: str  # e.g. "call:nn.LayerNorm", "R1 llama upcast", "look-alike: unbiased var"
    decision: str  # "rewritten" or "left alone"
    op: str | None
    reason: str
    node: str  # the graph node the row is about

    @property
    def rewritten(self) -> bool:
        return self.op is not None


@dataclasses.dataclass
class Report:
    """Rows for every site; `str(report)` is a table, `report.rows` the data."""

    policy: str
    rows: list[Row] = dataclasses.field(default_factory=list)

    @property
    def rewritten(self) -> list[Row]:
        return [r for r in self.rows if r.rewritten]

    @property
    def left_alone(self) -> list[Row]:
        return [r for r in self.rows if not r.rewritten]

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        head = (
            f"normpass report (policy={self.policy}): {len(self.rows)} site(s), "
            f"{len(self.rewritten)} rewritten, {len(self.left_alone)} left alone"
        )
        if not self.rows:
            return head
        cols = ("where", "form", "decision", "reason")
        table = [cols] + [
            (
                r.where + (f" ({r.source})" if r.source else ""),
                r.form,
                r.decision + (f" -> {r.op}" if r.op else ""),
                r.reason,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
        lines = [head]
        for row in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
        return "\n".join(line.rstrip() for line in lines)

    __repr__ = __str__


_DYNAMO_PREFIX = re.compile(r"^L\['[^']*'\]\.?")


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = _DYNAMO_PREFIX.sub("", str(path))
        path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
        path = re.sub(r"\[(\d+)\]", r".\1", path)
        return path.lstrip(".") or "<root>"
    if node.op == "call_module":
        return str(node.target)
    return None


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _source(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace")
    if not trace:
        return ""
    frames = _FRAME.findall(trace)
    if not frames:
        return ""
    # The innermost frame outside torch itself: the model's line, not nn.LayerNorm.forward's.
    user = [f for f in frames if "/torch/" not in f[0]]
    path, line = (user or frames)[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def locate(node: fx.Node, prefix: str = "") -> tuple[str, str]:
    """(where, source) for a node: its module path and file:line when the graph records them."""
    where = _module_path(node) or node.name
    return (f"{prefix}{where}" if prefix else where), _source(node)

"""Patterns and the registry they live in.

A `Pattern` is a match function over the canonical view, the canonical ops it can start from
(`anchors`), optional extra `checks` and an optional custom `replacement`. A `PatternRegistry` holds
them by name (registering the same pattern twice is a no-op) and scopes them: `with registry:` makes
it the registry that `normpass.register_pattern` and `normpass.rewrite` use inside the block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from torch import fx

from normpass.passes.canonical import Term
from normpass.passes.match import Matcher, Site

MatchFn = Callable[[Term, Matcher], "Site | None"]
CheckFn = Callable[[Site], "str | None"]
ReplaceFn = Callable[[fx.Graph, Site], fx.Node]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A normalization form normpass can find.

    match: (term, matcher) -> Site, None, or raises Reject(form, reason) / NoMatch.
    anchors: canonical ops (see normpass.passes.canonical) whose nodes `match` is tried on.
    checks: each returns a reason to leave the site alone, or None.
    replacement: (graph, site) -> node computing the site's output, inserted before site.output;
        None means the normpass op the policy picks.
    """

    name: str
    match: MatchFn
    anchors: tuple[str, ...]
    family: str = "user"
    checks: tuple[CheckFn, ...] = ()
    replacement: ReplaceFn | None = None


class PatternRegistry:
    """A set of patterns: the built-in ones (unless builtins=False) and the user's, which are tried
    first at each anchor (they refine the built-in ones).

    Example:
        >>> with normpass.PatternRegistry() as reg:     # nothing registered here leaks out
        ...     normpass.register_pattern("my_norm", my_match, anchors=("mul",))
        ...     normpass.rewrite(gm)                      # uses reg
    """

    def __init__(self, *, builtins: bool = True) -> None:
        self._patterns: dict[str, Pattern] = {}
        if builtins:
            from normpass.patterns import BUILTIN

            for pattern in BUILTIN:
                self._patterns[pattern.name] = pattern
        self._by_anchor: dict[str, list[Pattern]] | None = None

    def register(self, pattern: Pattern, *, replace: bool = False) -> Pattern:
        """Add a pattern. The same one again is a no-op; another under a taken name needs replace=True."""
        old = self._patterns.get(pattern.name)
        if old is not None and old != pattern and not replace:
            raise ValueError(
                f"normpass: a different pattern named {pattern.name!r} is already registered; "
                "pass replace=True to replace it"
            )
        self._patterns[pattern.name] = pattern
        self._by_anchor = None
        return pattern

    def unregister(self, name: str) -> None:
        self._patterns.pop(name, None)
        self._by_anchor = None

    def __contains__(self, name: str) -> bool:
        return name in self._patterns

    def __iter__(self) -> Iterator[Pattern]:
        return iter(self._patterns.values())

    def __len__(self) -> int:
        return len(self._patterns)

    def for_anchor(self, op: str) -> list[Pattern]:
        if self._by_anchor is None:
            by: dict[str, list[Pattern]] = {}
            # User patterns first: they are more specific than the built-in ones they refine.
            for p in sorted(self._patterns.values(), key=lambda p: p.family != "user"):
                for a in p.anchors:
                    by.setdefault(a, []).append(p)
            self._by_anchor = by
        return self._by_anchor.get(op, [])

    def __enter__(self) -> PatternRegistry:
        _STACK.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _STACK.remove(self)

    def __repr__(self) -> str:
        return f"PatternRegistry({list(self._patterns)})"


_STACK: list[PatternRegistry] = []
_DEFAULT: PatternRegistry | None = None


def current_registry() -> PatternRegistry:
    """The innermost `with registry:` block's registry, else the process-wide default one."""
    global _DEFAULT
    if _STACK:
        return _STACK[-1]
    if _DEFAULT is None:
        _DEFAULT = PatternRegistry()
    return _DEFAULT

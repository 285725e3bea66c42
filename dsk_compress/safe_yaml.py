"""YAML for recipes and ``--set`` values, parsed with limits: no alias bomb, no runaway nesting, no huge file.

PyYAML's ``SafeLoader`` builds no objects beyond plain data, but it expands nothing lazily: a 427-byte
"billion laughs" document (nine anchors, each a list of ten aliases of the previous one) becomes a
graph that pydantic then walks as 10^9 leaves, and its composer recurses once per nesting level, so a
50,000-deep ``[[[...]]]`` raises RecursionError. :class:`LimitedLoader` counts while composing: every
alias use, the number of nodes the document stands for once aliases are expanded, and the nesting
depth, and stops at the first limit with :class:`YAMLLimitError`, in milliseconds.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_BYTES = 1_000_000
"""Largest YAML text accepted (a recipe is a few kB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists (a recipe nests 4 levels)."""
MAX_ALIASES = 100
"""Most alias uses (``*name``) in one document."""
MAX_NODES = 100_000
"""Most nodes a document may stand for with every alias expanded."""


class YAMLLimitError(ValueError):
    """A YAML document over one of the limits (size, depth, aliases, expanded nodes)."""


class LimitedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents over :data:`MAX_DEPTH`, :data:`MAX_ALIASES` or :data:`MAX_NODES`."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._nodes = 0
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YAMLLimitError(f"more than {MAX_ALIASES} aliases (*name)")
            node = super().compose_node(parent, index)
            self._count(self._sizes.get(id(node), 1))
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels at line {mark.line + 1}")
        try:
            before = self._nodes
            node = super().compose_node(parent, index)
            self._count(1)
            self._sizes[id(node)] = self._nodes - before
            return node
        finally:
            self._depth -= 1

    def _count(self, n: int) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            raise YAMLLimitError(f"stands for more than {MAX_NODES:,} values once its aliases are expanded")


_QUOTED_OR_COMMENT = re.compile(r"'[^'\n]*'|\"(?:[^\"\\\n]|\\.)*\"|(?:^|(?<=\s))#[^\n]*", re.MULTILINE)


def _check_flow_depth(text: str) -> None:
    """Refuse deep ``[[[...`` / ``{{{...`` before the scanner sees it: it looks ahead over every open bracket, in
    time that grows with the square of the nesting, long before the composer's depth count would stop it."""
    depth = 0
    for m in re.finditer(r"[\[\]{}]", _QUOTED_OR_COMMENT.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels")


def safe_load(text: str) -> Any:
    """Parse one YAML document into plain data (dicts, lists, str, int, float, bool, None, dates), within the limits.

    Raises:
        YAMLLimitError: the text is over :data:`MAX_BYTES` or the document over a limit of :class:`LimitedLoader`.
        yaml.YAMLError: the text is not valid YAML (``problem_mark`` says where).
    """
    if len(text) > MAX_BYTES:
        raise YAMLLimitError(f"{len(text):,} characters, more than the {MAX_BYTES:,} a recipe may have")
    _check_flow_depth(text)
    loader = LimitedLoader(text)
    try:
        return loader.get_single_data()
    except (ValueError, TypeError, OverflowError) as e:
        if isinstance(e, YAMLLimitError):
            raise
        # a scalar the constructor cannot turn into a value (e.g. an integer of more than 4300 digits)
        raise YAMLLimitError(f"a value cannot be read: {str(e).splitlines()[0][:120]}") from None
    finally:
        loader.dispose()

"""Generic helpers for config dataclasses: build one from a mapping (unknown keys name the closest
known one), read the docstrings under its fields (the ``--help`` text), and a field's default."""

from __future__ import annotations

import difflib
from dataclasses import MISSING, fields
from typing import Any

from ..errors import LorakitError

__all__ = ["from_dict", "field_docs", "default_of"]


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; an unknown key is an error naming the closest known one."""
    if not isinstance(data, dict):
        raise LorakitError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise LorakitError(f"{where}: unknown key {key!r}{hint}")
    return cls(**data)


def field_docs(cls: type) -> dict[str, str]:
    """Read the string literal under each dataclass field from the class source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def default_of(cls: type, name: str) -> Any:
    """The declared default of field ``name`` of dataclass ``cls`` (so no default is written twice)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)

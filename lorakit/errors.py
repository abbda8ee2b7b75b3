"""The one exception type for mistakes a user can fix; the CLI prints it without a traceback."""

from __future__ import annotations

import importlib.util

__all__ = ["LorakitError", "require_extra"]


class LorakitError(ValueError):
    """Bad input (file, key, module name, value): the message says what, where, and what to do."""


def require_extra(extra: str, modules: tuple[str, ...], purpose: str) -> None:
    """Say how to install lorakit's optional ``extra`` when one of its ``modules`` is missing
    (checked without importing them, so it is cheap to call before any slow work)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LorakitError(f"{purpose} needs {' and '.join(missing)} (lorakit's '{extra}' extra); install it with: "
                           f"pip install 'lorakit[{extra}]' (in a lorakit checkout: scripts/setup {extra})")

"""The one exception type for mistakes a user can fix; the CLI prints it without a traceback."""

from __future__ import annotations

__all__ = ["LorakitError"]


class LorakitError(ValueError):
    """Bad input (file, key, module name, value): the message says what, where, and what to do."""

"""The one exception type for mistakes a user can fix; the CLI prints it without a traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["LorakitError", "require_extra", "read_text"]


class LorakitError(ValueError):
    """Bad input (file, key, module name, value): the message says what, where, and what to do."""


def require_extra(extra: str, modules: tuple[str, ...], purpose: str) -> None:
    """Say how to install lorakit's optional ``extra`` when one of its ``modules`` is missing
    (checked without importing them, so it is cheap to call before any slow work)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LorakitError(f"{purpose} needs {' and '.join(missing)} (lorakit's '{extra}' extra); install it with: "
                           f"pip install 'lorakit[{extra}]' (in a lorakit checkout: scripts/setup {extra})")


def read_text(path: str | Path, what: str) -> str:
    """A user's UTF-8 text file (a BOM is allowed), or a LorakitError that names it: missing, a
    folder, unreadable, or not UTF-8 (with the byte offset). ``what`` names it ("config file")."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LorakitError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise LorakitError(f"{what} {path} is a folder; give the file itself") from None
    except PermissionError:
        raise LorakitError(f"{what} {path}: permission denied") from None
    except UnicodeDecodeError as err:
        raise LorakitError(f"{path}: not UTF-8 text (byte offset {err.start}); save it as UTF-8") from None

"""Writing so that a reader never sees half a file: write under a temporary name in the same
folder, then rename. ``tempfile`` makes its names private (files 0600, folders 0700); what is
renamed into place gets the permissions a plain ``open``/``mkdir`` would have given (0666/0777
less the umask), so run folders, adapters and caches stay readable by whoever could read them
before — a server running as another user, a shared disk."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_file", "shareable"]


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder made by ``tempfile.mkdtemp``) the default permissions."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


@contextmanager
def atomic_file(dest: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; when the block ends without an error it becomes
    ``dest`` (replacing it), else it is removed and ``dest`` is untouched."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        shareable(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

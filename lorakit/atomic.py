"""Writing so that a reader never sees half a file: write under a temporary name in the same
folder, then rename. ``tempfile`` makes its names private (files 0600, folders 0700); what is
renamed into place gets the permissions a plain ``open``/``mkdir`` would have given (0666/0777
less the umask), so run folders, adapters and caches stay readable by whoever could read them
before — a server running as another user, a shared disk.

A disk that fills up mid-write is said in words (``DiskFull``: which folder, how much was
written, how much is free), and what was there before stays as it was."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import LorakitError

__all__ = ["atomic_file", "atomic_dir", "remove_stale", "shareable", "disk_size", "DiskFull"]


class DiskFull(LorakitError):
    """The disk filled up while lorakit wrote something; nothing half-written was left behind."""


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save and safetensors report a full disk as their own errors, with the OS message inside
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text or "StorageFull" in text


def disk_size(path: Path) -> int:
    """Bytes in a file, or in every file under a folder (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _disk_full(dest: Path, tmp: Path, need: int | None) -> DiskFull:
    written = disk_size(tmp)
    free = shutil.disk_usage(dest.parent).free
    needed = f"it needs about {_mib(need)}" if need else f"it needs more than the {_mib(written)} written so far"
    return DiskFull(f"the disk holding {dest.parent} is full while writing {dest.name} ({needed}; "
                    f"{_mib(free)} free there once the partial copy is removed). Nothing half-written was kept"
                    f"{' and the previous ' + dest.name + ' is intact' if dest.exists() else ''}: free some space "
                    "or choose a folder on another disk")


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
    except BaseException as err:
        full = _disk_full(dest, Path(tmp), None) if _is_disk_full(err) else None
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from None
        raise


@contextmanager
def atomic_dir(dest: str | os.PathLike, need_bytes: int | None = None, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``dest``; when the block ends without an error it
    becomes ``dest`` (an existing ``dest`` is replaced only then; with ``keep_existing`` one that
    appeared meanwhile, e.g. written by another process, is kept and the new copy dropped), else it
    is removed and ``dest`` is untouched. ``need_bytes``, where known, is said if the disk fills up."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        yield tmp
        shareable(tmp)
        if dest.exists() and keep_existing:
            shutil.rmtree(tmp, ignore_errors=True)
        elif dest.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as err:
        full = _disk_full(dest, tmp, need_bytes) if _is_disk_full(err) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise


def remove_stale(folder: Path, name: str) -> None:
    """Remove the temporary folders of ``atomic_dir(folder / name)`` left by a process killed mid-write."""
    for stale in list(folder.glob(f".{name}.*.tmp")) + list(folder.glob(f".{name}.*.old")):
        shutil.rmtree(stale, ignore_errors=True)

"""Training runs under mimalloc instead of glibc's malloc (Linux).

PyTorch on CPU takes every activation from the C allocator. glibc's malloc keeps what a
training step frees in its heaps and arenas, fragmented, so the process's resident memory
runs ~1.6× the tensors alive at the peak (SmolLM2-135M, 1,024 tokens a step: 3.4 GB resident
for ~2 GB live). Its settings that return memory to the OS (a fixed mmap threshold, trimming)
cost 45–70% of the step's speed here. mimalloc (the ``cmeel-mimalloc`` wheel, a dependency on
Linux), jemalloc and tcmalloc reuse freed blocks by size class instead: ~2.1 GB resident for
the same step, at the same or better speed (docs/benchmarks.md, "The memory allocator").

An allocator replaces malloc only when loaded before the program starts, so ``lorakit train``
restarts itself once, at once (before torch is imported), with the library in ``LD_PRELOAD``;
PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``) does the same with jemalloc or
tcmalloc. The restarted process puts the environment back as it was, so the programs it starts
get the user's own. ``LORAKIT_ALLOCATOR``: ``auto`` (the default: mimalloc where its wheel is
installed, else nothing changes), ``system`` (the C library's malloc), or the path of a
malloc library (``/usr/lib/x86_64-linux-gnu/libjemalloc.so.2``...).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from ..errors import LorakitError

__all__ = ["ALLOCATOR_ENV", "allocator_library", "restart_with_allocator", "settle_restarted_process", "allocator_in_use"]

ALLOCATOR_ENV = "LORAKIT_ALLOCATOR"
_ACTIVE = "LORAKIT_ALLOCATOR_ACTIVE"  # set for the restarted process: the library it was given
_PREVIOUS = "LORAKIT_ALLOCATOR_PREVIOUS_PRELOAD"  # the user's own LD_PRELOAD ("" when unset)
_ADDED = "LORAKIT_ALLOCATOR_ADDED"  # the allocator settings the restart added
_MIMALLOC_DIST = "cmeel-mimalloc"
# mimalloc returns freed memory to the OS 10 ms after a free by default; a training step frees
# and re-takes the same activation sizes every step, so it keeps them (measured: ~10% faster,
# +2% resident memory).
_MIMALLOC_DEFAULTS = {"MIMALLOC_PURGE_DELAY": "-1"}
_SYSTEM = ("system", "off", "none", "glibc", "libc")


def _bundled_mimalloc() -> str | None:
    from importlib import metadata

    try:
        files = metadata.distribution(_MIMALLOC_DIST).files or []
    except metadata.PackageNotFoundError:
        return None
    libs = sorted((f for f in files if f.name.startswith("libmimalloc.so")), key=lambda f: len(f.name))
    for f in libs:
        path = Path(str(f.locate()))
        if path.is_file():
            return str(path)
    return None


def allocator_library(environ: dict | None = None) -> str | None:
    """The malloc library ``lorakit train`` runs under: None for the C library's own."""
    env = os.environ if environ is None else environ
    choice = env.get(ALLOCATOR_ENV, "auto").strip()
    if choice.lower() in _SYSTEM:
        return None
    if choice.lower() not in ("auto", ""):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise LorakitError(f"{ALLOCATOR_ENV}={choice}: no such file; give the path of a malloc library "
                               "(libmimalloc.so, libjemalloc.so.2, libtcmalloc_minimal.so.4), 'auto' or 'system'")
        return str(path.resolve())
    if not sys.platform.startswith("linux"):
        return None
    return _bundled_mimalloc()


def restart_with_allocator(argv: Sequence[str], program: Sequence[str] = ("-m", "lorakit")) -> None:
    """Replace this process by ``python <program> <argv>`` (``python -m lorakit`` unless told, e.g.
    a benchmark script's path) under the chosen allocator; returns (doing nothing) when none
    applies or this already is the restarted process."""
    if os.environ.get(_ACTIVE) is not None or _STATE["restarted"]:
        return
    lib = allocator_library()
    if lib is None:
        return
    env = dict(os.environ)
    previous = env.get("LD_PRELOAD", "")
    added = [k for k in _MIMALLOC_DEFAULTS if k not in env] if "mimalloc" in Path(lib).name else []
    env.update({k: _MIMALLOC_DEFAULTS[k] for k in added})
    env.update({_ACTIVE: lib, _PREVIOUS: previous, _ADDED: ",".join(added),
                "LD_PRELOAD": f"{lib}:{previous}" if previous else lib})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *program, *argv], env)


# in the restarted process: restarted (even where the loader refused the library: no second
# restart), and the library's file name when it is loaded
_STATE: dict = {"restarted": False, "in_use": None}


def settle_restarted_process() -> None:
    """In the restarted process, put the environment back as the user had it (for the programs
    this one starts) and remember which allocator is in use; nothing elsewhere."""
    lib = os.environ.pop(_ACTIVE, None)
    if lib is None:
        return
    previous = os.environ.pop(_PREVIOUS, "")
    for key in filter(None, os.environ.pop(_ADDED, "").split(",")):
        os.environ.pop(key, None)
    if previous:
        os.environ["LD_PRELOAD"] = previous
    else:
        os.environ.pop("LD_PRELOAD", None)
    _STATE["restarted"] = True
    if _loaded(lib):
        _STATE["in_use"] = Path(lib).name
    else:
        print(f"warning: {ALLOCATOR_ENV}: {lib} could not be preloaded; running with the C library's malloc",
              file=sys.stderr)


def allocator_in_use() -> str | None:
    """The malloc library this process runs under (its file name), None for the C library's."""
    return _STATE["in_use"]


def _loaded(lib: str) -> bool:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return True  # cannot tell: trust the loader
    return str(Path(lib).resolve()) in maps

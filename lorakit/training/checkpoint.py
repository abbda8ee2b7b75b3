"""Training checkpoints: written to a temporary folder and renamed into place, so a crash or a
kill during the write never damages the previous checkpoint.

``<out>/checkpoints/step-00000060/`` holds
- ``adapter/``: the adapter in PEFT's format (loadable on its own); a full or freeze run has
  ``model/trained.safetensors`` instead: the trained tensors, in fp32;
- ``trainer_state.pt``: optimizer and scheduler state, RNG states (read back with
  ``torch.load(weights_only=True)``: tensors and plain Python values only, never arbitrary objects);
- ``progress.json``: step, data position, tokens seen;
- ``config.yaml``: the resolved run config.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir, remove_stale
from ..errors import LorakitError

__all__ = ["Progress", "checkpoint_dir", "save_checkpoint", "find_checkpoint", "load_trainer_state", "rng_state",
           "set_rng_state", "list_checkpoints"]

_PREFIX = "step-"


@dataclass
class Progress:
    """Where training stands: optimizer steps done and micro-batches consumed."""

    step: int
    micro_batches: int
    tokens: int
    elapsed: float


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"{_PREFIX}{step:08d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "progress.json").is_file()]
    return sorted(done, key=lambda p: p.name)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(out_dir: Path, progress: Progress, write_adapter, trainer_state: dict[str, Any],
                    config_yaml: str, keep_last: int, need_bytes: int | None = None, part: str = "adapter") -> Path:
    """Write a checkpoint atomically and prune old ones; ``write_adapter(folder)`` saves the adapter
    (or, ``part`` "model", a full/freeze run's trained tensors) into the checkpoint's ``part`` folder.
    A full disk raises ``DiskFull`` and leaves the earlier checkpoints as they were."""
    final = checkpoint_dir(out_dir, progress.step)
    remove_stale(final.parent, "step-*")  # left by a run killed mid-write
    with atomic_dir(final, need_bytes=need_bytes) as tmp:
        write_adapter(tmp / part)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        # progress.json last: a folder without it is never taken for a checkpoint.
        (tmp / "progress.json").write_text(json.dumps(progress.__dict__, indent=2))
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: Path, resume: str) -> Path:
    """'latest' -> the newest complete checkpoint in out_dir; else the given folder."""
    if resume == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise LorakitError(f"nothing to resume: no checkpoint in {out_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / "progress.json").is_file():
        raise LorakitError(f"{path} is not a lorakit checkpoint (no progress.json); use 'latest' or a checkpoints/step-N folder")
    return path


def load_trainer_state(folder: Path) -> tuple[Progress, dict[str, Any]]:
    progress = Progress(**json.loads((folder / "progress.json").read_text()))
    state = torch.load(folder / "trainer_state.pt", weights_only=True, map_location="cpu")
    return progress, state

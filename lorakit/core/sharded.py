"""Tensors a data-parallel run may have sharded (FSDP2 DTensors): the core reads adapters through
these two helpers, so saving and merging work the same on one process or many."""

from __future__ import annotations

import torch

__all__ = ["is_sharded", "full_tensor"]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a shard of a tensor spread over processes)."""
    return hasattr(t, "full_tensor")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded DTensor (a collective: every rank must call it), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t

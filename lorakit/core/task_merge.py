"""Merging same-shaped "task tensors" (the factors or updates of several adapters) into one.

The rules of the model-merging papers, as PEFT's ``add_weighted_adapter`` applies them:

- ``linear``: Σ wᵢ·Tᵢ (task arithmetic).
- ``magnitude_prune``: keep each Tᵢ's ``density`` fraction of largest-magnitude entries, then Σ wᵢ·Tᵢ.
- ``ties`` (TIES-merging): prune as above; per entry, elect the sign of Σ Tᵢ (``total``) or of
  Σ sign(Tᵢ) (``frequency``); average the weighted entries that agree with it (disjoint mean).
- ``dare_linear`` (DARE): drop each entry with probability 1 − density, rescale the kept ones
  by 1/density, then Σ wᵢ·Tᵢ. ``dare_ties``: that pruning, then TIES's sign election and mean.

Random masks come from the ``generator`` passed in, drawn tensor by tensor in the order given:
the same seed gives the same merge whatever else used torch's global generator before.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..config import TASK_MERGES

__all__ = ["merge_tensors"]


def _keep_largest(t: Tensor, density: float) -> Tensor:
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.view(t.shape)


def _keep_random(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _prune(t: Tensor, density: float, random: bool, generator: torch.Generator | None) -> Tensor:
    if density >= 1:
        return t
    return _keep_random(t, density, generator) if random else _keep_largest(t, density)


def _disjoint_mean(stacked: Tensor, weighted: Tensor, sign_method: str) -> Tensor:
    signs = stacked.sign()
    votes = stacked.sum(0) if sign_method == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def merge_tensors(method: str, tensors: Sequence[Tensor], weights: Sequence[float], density: float = 1.0,
                  sign_method: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """One tensor from ``tensors`` (equal shapes) and their ``weights`` by ``method`` (TASK_MERGES)."""
    if method not in TASK_MERGES:
        raise ValueError(f"unknown task merge {method!r}; choose one of {', '.join(TASK_MERGES)}")
    if method != "linear":
        tensors = [_prune(t, density, method.startswith("dare"), generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare_ties"):
        return _disjoint_mean(stacked, weighted, sign_method)
    return weighted.sum(0)

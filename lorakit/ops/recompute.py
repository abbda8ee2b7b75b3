"""Saved-for-backward tensors replaced by recipes that recompute them (shared by the lean RMSNorm
and gated MLP): a recipe keeps the inputs the tensor is made from, which autograd keeps anyway,
and rebuilds the saved view (size, stride, offset) of the recomputed result in backward."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

__all__ = ["Recipe", "activation_checkpointing", "unpack"]


class Recipe:
    """Stands in for a saved ``like`` (the tensor ``make`` returns, or a view of it)."""

    __slots__ = ("make", "size", "stride", "offset")

    def __init__(self, make: Callable[[], Tensor], like: Tensor) -> None:
        self.make = make
        self.size, self.stride, self.offset = like.size(), like.stride(), like.storage_offset()

    def __call__(self) -> Tensor:
        return self.make().as_strided(self.size, self.stride, self.offset)


def unpack(packed):
    """The saved-tensor hooks' unpack: a recipe is recomputed, anything else returned as saved."""
    return packed() if isinstance(packed, Recipe) else packed


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on: recipes are then left out (they would
    keep their inputs alive past the checkpoint)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())

"""Turning the registered quantized layers of a model (``lorakit.core.float_view``) into float ones."""

from __future__ import annotations

from torch import nn

from .float_view import float_view, register_float_view
from .inject import replace_module

__all__ = ["register_float_view", "float_view", "to_float_layers"]


def to_float_layers(model: nn.Module) -> int:
    """Replace every registered (quantized) layer of ``model``, adapter bases included, by its float
    view; returns how many."""
    found = [(name, f) for name, m in model.named_modules() if (f := float_view(m)) is not None]
    for name, to_float in found:
        replace_module(model, name, to_float(model.get_submodule(name)))
    return len(found)

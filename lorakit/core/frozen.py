"""Base layers whose weight the adapter math cannot write into — quantized layers. Whoever makes
such layers (``lorakit.quant.bnb``, when it is imported) registers how to tell one and how to turn
it into a float ``nn.Linear``; merging uses that, so the core never imports quantization code."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .inject import replace_module

__all__ = ["register_float_view", "float_view", "to_float_layers"]

_VIEWS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = []


def register_float_view(is_such: Callable[[nn.Module], bool], to_float: Callable[[nn.Module], nn.Module]) -> None:
    """Layers for which ``is_such`` holds are merged into ``to_float(layer)`` (a float layer computing
    the same function) instead of in place."""
    if (is_such, to_float) not in _VIEWS:
        _VIEWS.append((is_such, to_float))


def float_view(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    """The registered conversion for ``module``, or None for an ordinary float layer."""
    return next((to_float for is_such, to_float in _VIEWS if is_such(module)), None)


def to_float_layers(model: nn.Module) -> int:
    """Replace every registered (quantized) layer of ``model``, adapter bases included, by its float
    view; returns how many."""
    found = [(name, f) for name, m in model.named_modules() if (f := float_view(m)) is not None]
    for name, to_float in found:
        replace_module(model, name, to_float(model.get_submodule(name)))
    return len(found)

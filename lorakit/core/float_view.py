"""Base layers whose weight the adapter math cannot read or write directly — quantized layers.
Whoever makes such layers (``lorakit.quant.bnb``, when it is imported) registers how to tell one
and how to turn it into a float ``nn.Linear``; merging and DoRA's weight norm use that, so the core
never imports quantization code."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

__all__ = ["register_float_view", "float_view", "float_weight"]

_VIEWS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = []


def register_float_view(is_such: Callable[[nn.Module], bool], to_float: Callable[[nn.Module], nn.Module]) -> None:
    """Layers for which ``is_such`` holds are merged into ``to_float(layer)`` (a float layer computing
    the same function) instead of in place."""
    if (is_such, to_float) not in _VIEWS:
        _VIEWS.append((is_such, to_float))


def float_view(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    """The registered conversion for ``module``, or None for an ordinary float layer."""
    return next((to_float for is_such, to_float in _VIEWS if is_such(module)), None)


def float_weight(module: nn.Module) -> Tensor:
    """``module``'s weight as a float tensor in its own layout (dequantized when it is a quantized layer)."""
    to_float = float_view(module)
    return module.weight if to_float is None else to_float(module).weight

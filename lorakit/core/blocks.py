"""Where a transformers model keeps its decoder blocks."""

from __future__ import annotations

from torch import nn

__all__ = ["decoder_blocks"]


def decoder_blocks(model: nn.Module, conv1d: bool = True) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of decoder blocks: the ModuleList holding the most linear layers (and GPT-2
    Conv1D layers, unless ``conv1d`` is False), with its path."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(1 for m in module.modules() if type(m) is nn.Linear or conv1d and type(m).__name__ == "Conv1D")
            if count and (best is None or count > best[2]):
                best = (name, module, count)
    return (best[0], best[1]) if best else None

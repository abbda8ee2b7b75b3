"""lorakit: LoRA fine-tuning — inject adapters, train them, save them in PEFT's format, merge,
combine and switch them over one base model.

The public names are imported on first use (PEP 562), so ``import lorakit`` and the command
line's ``--help``/``--version`` and usage errors do not pay for importing torch and transformers."""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import LorakitError

_LAZY = {
    "LoraConfig": "config",
    "LoraModel": "model",
    "get_lora_model": "model",
    "read_adapter": "adapters",
    "DEFAULT_TARGETS": "inject",
    "LoraLayer": "lora",
    "LoraLinear": "lora",
    "LoraEmbedding": "lora",
    "LoraConv2d": "lora",
}

__all__ = ["__version__", "LorakitError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

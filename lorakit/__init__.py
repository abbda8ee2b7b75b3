"""lorakit: LoRA fine-tuning — inject adapters, train them, save them in PEFT's format, merge,
combine and switch them over one base model.

The package is a few rooms, one per concept (see docs/architecture.md): ``core`` (the LoRA layers,
injection, ``LoraModel``, PEFT's format, merge, combine), ``ops`` (the pieces plugged into a
transformers model: packed attention, the label-only loss), ``quant`` (4-bit/8-bit bases, GPTQ,
EoRA), ``data``, ``base`` (loading base models), ``inference``, ``training``, ``planning`` and
``cli``; ``config``, ``errors`` and ``atomic`` are below them all.

The public names are imported on first use (PEP 562), so ``import lorakit`` and the command
line's ``--help``/``--version`` and usage errors do not pay for importing torch and transformers."""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import LorakitError

_LAZY = {
    "LoraConfig": "config",
    "LoraModel": "core.lora_model",
    "get_lora_model": "core.lora_model",
    "read_adapter": "core.peft_format",
    "DEFAULT_TARGETS": "core.inject",
    "LoraLayer": "core.layers",
    "LoraLinear": "core.layers",
    "LoraEmbedding": "core.embedding_conv",
    "LoraConv2d": "core.embedding_conv",
}

__all__ = ["__version__", "LorakitError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if _LAZY[name].startswith("core."):
        # The core merges into quantized base layers through a registry (lorakit.core.frozen) that
        # lorakit.quant.bnb fills when imported (it imports bitsandbytes only when used): a model
        # quantized elsewhere, e.g. by transformers' BitsAndBytesConfig, merges too.
        importlib.import_module(".quant.bnb", __name__)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

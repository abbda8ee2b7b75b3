"""lorakit: LoRA fine-tuning — inject adapters, train them, save them in PEFT's format, merge,
combine and switch them over one base model."""

from ._version import __version__
from .adapters import read_adapter
from .config import LoraConfig
from .errors import LorakitError
from .inject import DEFAULT_TARGETS
from .lora import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from .model import LoraModel, get_lora_model

__all__ = [
    "__version__",
    "LoraConfig",
    "LoraModel",
    "get_lora_model",
    "read_adapter",
    "LorakitError",
    "DEFAULT_TARGETS",
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv2d",
]

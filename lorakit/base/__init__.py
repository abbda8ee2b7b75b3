"""Base models: where one comes from (``source``: a folder, a .gguf file, a hub id, the embedded
default), on which device and in which dtype it runs (``device``), and loading it with its
tokenizer (``load``) — optionally with its linear layers quantized (``lorakit.quant``).

May import: ``lorakit.quant``, ``lorakit.config``, ``lorakit.errors``, ``lorakit.atomic``,
transformers, huggingface_hub. Never training, inference, planning or the CLI."""

from .device import DTYPES, native_bf16, physical_cores, resolve_device, resolve_dtype, resolve_precision
from .load import load_model, load_tokenizer, quant_spec
from .source import (DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel, ModelSource, base_license, cache_root,
                     hub_id_of, load_model_config, resolve_source)

__all__ = ["DTYPES", "native_bf16", "physical_cores", "resolve_device", "resolve_dtype", "resolve_precision",
           "load_model", "load_tokenizer", "quant_spec", "DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel",
           "ModelSource", "base_license", "cache_root", "hub_id_of", "load_model_config", "resolve_source"]

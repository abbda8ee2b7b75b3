"""Load a base model (and its tokenizer) from any source ``lorakit.base.source`` resolves, on a
device, in a dtype, optionally with its linear layers quantized (QLoRA) or restored from a saved
4-bit base."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import LorakitError
from .device import resolve_device, resolve_dtype
from .source import DEFAULT_MODEL, EMBEDDED_MODELS, is_embedded_hub_id, hub_id_of, local_folder, quiet_loading, resolve_source

__all__ = ["load_model", "load_tokenizer", "quant_spec"]


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of model ``name``, with a pad token (eos when it has none)."""
    return _tokenizer_from(local_folder(resolve_source(name)), trust_remote_code)


def _tokenizer_from(folder: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LorakitError(f"{folder}: no tokenizer could be loaded ({first}); a model folder needs its tokenizer "
                           "files (tokenizer.json, or tokenizer.model with tokenizer_config.json)") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quant_spec(quantize: str = "none", double_quant: bool = True, compute_dtype: str = "auto",
               device: torch.device | None = None):
    """The ``QuantSpec`` for these settings (None for 'none'); compute dtype auto is bf16 on a CUDA
    GPU that supports it and float32 elsewhere (bf16 matmuls are slow on CPUs without native bf16)."""
    from ..quant.bnb import QuantSpec, require_bnb

    if quantize in (None, "none"):
        return None
    require_bnb()  # a missing extra is said before the model is loaded
    return QuantSpec(quantize, double_quant, resolve_dtype(compute_dtype, device or torch.device("cpu")))


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str | torch.dtype = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = "sdpa", quantize: str = "none", double_quant: bool = True,
               compute_dtype: str = "auto", quantized_base: str | os.PathLike | None = None):
    """(model, tokenizer) for ``name``: a folder, a .gguf file, a hub id, or an embedded name.

    ``quantize`` nf4 | fp4 | int8 stores the linear layers (not the output head) quantized on the
    target device; see ``lorakit.quant.bnb``. ``quantized_base``, a file a GPTQ-rounded run saved
    (``lorakit.quant.saved_base``), supplies those 4-bit layers instead of rounding them afresh."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    spec = quant_spec(quantize, double_quant, compute_dtype, dev)
    if quantized_base is not None and (spec is None or spec.method == "int8"):
        raise LorakitError(f"the saved 4-bit base {quantized_base} needs quantize nf4 or fp4, not {quantize!r}")
    source = resolve_source(name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    folder = local_folder(source)  # resolved once: a hub id is looked up in the cache a single time
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise LorakitError(f"could not load a causal LM from {name!r}: {str(err).splitlines()[0]}") from None
    tokenizer = _tokenizer_from(folder, trust_remote_code)
    if spec is not None and quantized_base is not None:
        from ..quant.saved_base import restore_quantized_base

        restore_quantized_base(model, quantized_base, spec, dev)
    elif spec is not None:
        from ..quant.bnb import quantize_model

        quantize_model(model, spec, dev)  # layer by layer, on the target device: the float copies go as it goes
    model.to(dev)
    if source.kind == "hub" or name in EMBEDDED_MODELS or is_embedded_hub_id(name):
        model.config._name_or_path = hub_id_of(name)  # what adapter_config.json records as the base model
    return model, tokenizer

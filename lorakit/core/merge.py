"""Merge adapters into the base weights (zero-latency inference), unmerge them, or unload the
wrappers to get a plain transformers model back. Merging is always an explicit call."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..atomic import atomic_dir
from ..errors import LorakitError
from .inject import ModulesToSave, replace_module, adapter_modules, lora_layers
from .layers import LoraLayer
from .frozen import float_view, to_float_layers

__all__ = ["merge_adapters", "unmerge_adapters", "unload", "merge_and_unload", "save_merged", "check_new_folder"]


def _shared_weight(model: nn.Module, layer: LoraLayer) -> bool:
    target = layer.base_layer.weight
    owners = {id(m) for m in model.modules() if getattr(m, "weight", None) is target and not isinstance(m, (LoraLayer, ModulesToSave))}
    return len(owners) > 1


def _untie(model: nn.Module, path: str, layer: LoraLayer) -> None:
    # Tied input/output embeddings share one tensor: merging into it would change both sides.
    warnings.warn(f"{path} shares its weight with another module (tied embeddings); untying it so the merge "
                  "changes only this side. The merged model is saved with tie_word_embeddings=False.", stacklevel=3)
    layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach().clone(), requires_grad=False)
    _mark_untied(model)


def _mark_untied(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", lambda: None)()
        if text is not None and text is not config:
            text.tie_word_embeddings = False


def merge_adapters(model: nn.Module, names: Sequence[str] | None = None, safe: bool = False) -> None:
    """Add the deltas of ``names`` (default: each layer's active adapters) into the base weights.

    With ``safe=True`` every merged weight is computed and checked for inf/NaN first; if any is
    non-finite nothing is changed.
    """
    layers = list(lora_layers(model))
    for _, layer in layers:
        wanted = [n for n in (names if names is not None else layer.active_adapters) if n in layer.lora_A]
        to_float = float_view(layer.base_layer) if wanted else None
        if to_float is not None:
            # A quantized run merges into the dequantized weights it was trained against; writing the
            # sum back in 4 bits would round most of the update away (see docs/qlora.md).
            layer.base_layer = to_float(layer.base_layer)
    if safe:
        for path, layer in layers:
            for name in names if names is not None else layer.active_adapters:
                if name in layer.lora_A and name not in layer.merged_adapters:
                    merged = layer.base_layer.weight.float() + layer.delta_weight(name).to(layer.base_layer.weight.device)
                    if not torch.isfinite(merged).all():
                        raise LorakitError(f"merging adapter {name!r} into {path} gives inf/NaN weights; nothing was merged")
    for path, layer in layers:
        wanted = [n for n in (names if names is not None else layer.active_adapters)
                  if n in layer.lora_A and n not in layer.merged_adapters]
        if wanted and _shared_weight(model, layer):
            _untie(model, path, layer)
        layer.merge(wanted)


def unmerge_adapters(model: nn.Module) -> None:
    """Subtract every merged adapter again (exact in fp32; half precision rounds)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, keep_full_copies: bool = True) -> nn.Module:
    """Replace each wrapper by its base layer (merged deltas stay in the weights), and each
    modules_to_save wrapper by its active copy (or its original with ``keep_full_copies=False``).
    Returns the now plain model."""
    for path, module in list(adapter_modules(model)):
        if isinstance(module, LoraLayer):
            replace_module(model, path, module.base_layer)
        else:
            current = module.current() if keep_full_copies else module.original_module
            if current is not module.original_module and _is_output_head_of_tied(model, module):
                warnings.warn(f"{path} was trained in full while tied to the input embeddings; the result is saved "
                              "with tie_word_embeddings=False.", stacklevel=2)
                _mark_untied(model)
            replace_module(model, path, current)
    return model


def _is_output_head_of_tied(model: nn.Module, module: ModulesToSave) -> bool:
    ids = {id(p) for p in module.original_module.parameters()}
    others = [p for n, p in model.named_parameters() if ".original_module." not in n and ".modules_to_save." not in n]
    return any(id(p) in ids for p in others)


def merge_and_unload(model: nn.Module, names: Sequence[str] | None = None, safe: bool = False) -> nn.Module:
    """Merge ``names`` (default: active) and return the plain transformers model. A quantized base
    is dequantized first (every quantized layer, adapted or not), so the result is a float model."""
    merge_adapters(model, names, safe=safe)
    to_float_layers(model)
    return unload(model)


def check_new_folder(path: str | os.PathLike) -> Path:
    """A folder to create: refuse one that exists with files in it (before any work is done)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LorakitError(f"{out} exists and is not empty; choose a new folder or remove it")
    return out


def save_merged(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, max_shard_size: str = "2GB") -> Path:
    """``save_pretrained`` a plain (already unloaded) model into ``out_dir`` via a temp folder + rename."""
    if any(True for _ in adapter_modules(model)):
        raise LorakitError("the model still holds adapter wrappers; call merge_and_unload() first")
    out = check_new_folder(out_dir)
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with atomic_dir(out, need_bytes=need) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out

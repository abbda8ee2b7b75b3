"""Adapters on disk, in exactly PEFT's format.

A folder holds ``adapter_config.json`` (``"peft_type": "LORA"``) and ``adapter_model.safetensors``
whose keys are ``base_model.model.<module path>.lora_A.weight`` (``lora_embedding_A`` for
embeddings), modules_to_save as ``base_model.model.<module path>.<param>`` and trained biases under
their own names. Non-default adapters go to ``<folder>/<name>/`` as PEFT does. safetensors only.

Loading validates the files, the config and every key and shape against the model before the
model is touched.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_file
from ..config import LoraConfig
from ..errors import LorakitError
from .inject import ModulesToSave, Target, adapter_modules, inject_adapter, plan_targets
from .embedding_conv import LoraEmbedding
from .layers import LoraLayer
from .sharded import full_tensor

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "save_adapter", "read_adapter", "load_adapter",
           "adapter_state_dict", "config_to_peft", "config_from_peft", "adapter_dir"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Our field -> PEFT's key, where they differ.
_TO_PEFT = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}
# PEFT options that change the math; an adapter using one cannot be loaded faithfully.
_UNSUPPORTED = {"lora_bias": "lora_bias (a bias on lora_B)", "use_qalora": "QALoRA",
                "layer_replication": "layer replication", "target_parameters": "target_parameters",
                "trainable_token_indices": "trainable tokens", "alora_invocation_tokens": "aLoRA",
                "use_bdlora": "BD-LoRA"}


def adapter_dir(path: str | os.PathLike, name: str) -> Path:
    """PEFT's layout: the adapter named 'default' at the top, any other in a sub-folder."""
    return Path(path) if name == "default" else Path(path) / name


def find_adapter_folder(path: str | os.PathLike) -> Path:
    """The adapter folder ``path`` names: itself (adapter_config.json inside), or a run folder's
    ``adapter/``; anything else is refused with what was found there."""
    folder = Path(path)
    if (folder / "adapter" / CONFIG_NAME).is_file():
        return folder / "adapter"
    if not (folder / CONFIG_NAME).is_file():
        hint = ("; a full/freeze run saves a model: use it with --model " + str(folder / "model")
                if (folder / "model" / "config.json").is_file() else "")
        raise LorakitError(f"{path}: not an adapter folder (no {CONFIG_NAME}) nor a run folder with adapter/{hint}")
    return folder


# ---- config ------------------------------------------------------------------------------

def config_to_peft(config: LoraConfig, targets: list[str] | str) -> dict[str, Any]:
    """adapter_config.json contents; ``targets`` is what was resolved (all-linear expanded to leaf names)."""
    out: dict[str, Any] = {}
    for f in fields(LoraConfig):
        out[_TO_PEFT.get(f.name, f.name)] = getattr(config, f.name)
    init = config.init
    # An EoRA init is plain LoRA weights once trained (PEFT has no such init to run at load time).
    out["init_lora_weights"] = True if init in ("default", "eora") else init
    out["target_modules"] = targets
    out.update(peft_type="LORA", inference_mode=True, lora_bias=False, revision=None)
    return dict(sorted(out.items()))


def config_from_peft(data: dict[str, Any], where: str) -> LoraConfig:
    """LoraConfig from adapter_config.json contents; PEFT-only options are checked, not ignored."""
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise LorakitError(f"{where}: peft_type is {peft_type!r}; lorakit loads LoRA adapters (peft_type 'LORA') only")
    for key, label in _UNSUPPORTED.items():
        value = data.get(key)
        if value not in (None, False, [], {}, 0):
            raise LorakitError(f"{where}: this adapter uses {label} ({key}={value!r}), which lorakit does not support")
    init = data.get("init_lora_weights", True)
    if init is True or init is False or init in ("loftq", "olora", "eva", "corda"):
        init = "default"  # the weights on disk are what counts; the init only mattered when training began
    from_peft = {v: k for k, v in _TO_PEFT.items()}
    kwargs: dict[str, Any] = {}
    names = {f.name for f in fields(LoraConfig)}
    for key, value in data.items():
        ours = from_peft.get(key, key)
        if ours in names:
            kwargs[ours] = value
    kwargs["init"] = init if isinstance(init, str) and init in ("default", "gaussian") else "default"
    kwargs["rank_pattern"] = kwargs.get("rank_pattern") or {}
    kwargs["alpha_pattern"] = kwargs.get("alpha_pattern") or {}
    for key in ("exclude_modules", "layers_pattern"):
        if kwargs.get(key) == []:
            kwargs[key] = None
    try:
        return LoraConfig(**kwargs)
    except (LorakitError, TypeError) as err:
        raise LorakitError(f"{where}: {err}") from None


# ---- weights -----------------------------------------------------------------------------

def _lora_keys(path: str, layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, LoraEmbedding):
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def _is_pissa(layer: LoraLayer, name: str) -> bool:
    return f"pissa_A0_{name}" in layer._buffers


def adapter_state_dict(model: nn.Module, name: str, config: LoraConfig) -> dict[str, Tensor]:
    """The tensors PEFT stores for adapter ``name``, under PEFT's keys."""
    out: dict[str, Tensor] = {}
    for path, module in adapter_modules(model):
        if isinstance(module, LoraLayer) and name in module.lora_A:
            key_a, key_b = _lora_keys(path, module)
            A, B = full_tensor(module.lora_A[name].detach()), full_tensor(module.lora_B[name].detach())
            if _is_pissa(module, name):
                # Save PiSSA as a plain LoRA on the *original* W: s·(B·A − B0·A0) at rank 2r.
                A = torch.cat([A, module.get_buffer(f"pissa_A0_{name}")], 0)
                B = torch.cat([B, -module.get_buffer(f"pissa_B0_{name}")], 1)
            out[key_a], out[key_b] = A, B
            if name in module.lora_magnitude:
                out[f"{PREFIX}{path}.lora_magnitude_vector"] = full_tensor(module.lora_magnitude[name].detach())
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for pname, p in module.modules_to_save[name].named_parameters():
                out[f"{PREFIX}{path}.{pname}"] = full_tensor(p.detach())
    if config.bias != "none":
        for pname, p in _trained_biases(model, config.bias).items():
            out[PREFIX + pname] = full_tensor(p.detach())
    return {k: v.contiguous() for k, v in out.items()}


def _trained_biases(model: nn.Module, bias: str) -> dict[str, Tensor]:
    owners = {path for path, m in adapter_modules(model) if isinstance(m, LoraLayer)}
    out = {}
    for pname, p in model.named_parameters():
        if not pname.endswith(".bias") or ".modules_to_save." in pname or ".original_module." in pname:
            continue
        if bias == "all" or pname.removesuffix(".base_layer.bias") in owners:
            out[pname] = p
    return out


def _saved_config(config: LoraConfig, plan_targets_: list[str] | str, pissa: bool) -> dict[str, Any]:
    if not pissa:
        return config_to_peft(config, plan_targets_)
    # Rank doubles; alpha grows so the scaling s stays the same under LoRA (α/r) or rsLoRA (α/√r).
    grow = math.sqrt(2) if config.use_rslora else 2.0
    converted = LoraConfig(**{**config.to_dict(), "r": 2 * config.r, "alpha": grow * config.alpha, "init": "default",
                              "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
                              "alpha_pattern": {k: grow * v for k, v in config.alpha_pattern.items()}})
    return config_to_peft(converted, plan_targets_)


def saved_targets(model: nn.Module, name: str, config: LoraConfig) -> list[str] | str:
    """target_modules as written to disk: the config's, or the leaf names it resolved to (all-linear)."""
    if isinstance(config.target_modules, (list, str)) and config.target_modules != "all-linear":
        return config.target_modules
    return sorted({p.rsplit(".", 1)[-1] for p, m in adapter_modules(model)
                   if isinstance(m, LoraLayer) and name in m.lora_A})


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str, config: LoraConfig, flat: bool = False,
                 state: dict[str, Tensor] | None = None) -> Path:
    """Write adapter ``name`` to ``path`` (or ``path/name`` as PEFT does for names other than
    'default', unless ``flat``) atomically; returns the folder. ``state``: the tensors, when already
    gathered (``adapter_state_dict``; a sharded model gathers on every rank, one rank writes)."""
    folder = Path(path) if flat else adapter_dir(path, name)
    state = state if state is not None else adapter_state_dict(model, name, config)
    if not state:
        raise LorakitError(f"adapter {name!r} has no weights in this model; nothing to save")
    pissa = any(isinstance(m, LoraLayer) and name in m.lora_A and _is_pissa(m, name) for _, m in adapter_modules(model))
    cfg = _saved_config(config, saved_targets(model, name, config), pissa)
    cfg["fan_in_fan_out"] = any(getattr(m, "fan_in_fan_out", False) for _, m in adapter_modules(model)
                                if isinstance(m, LoraLayer) and name in m.lora_A)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    with atomic_file(folder / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def read_adapter_config(folder: Path) -> LoraConfig:
    """An adapter folder's adapter_config.json as a LoraConfig (checked; the weights are not read)."""
    cfg_path = folder / CONFIG_NAME
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise LorakitError(f"{cfg_path}:{err.lineno}: not valid JSON ({err.msg})") from None
    return config_from_peft(data, str(cfg_path))


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read and check an adapter folder (config + safetensors); nothing is applied."""
    folder = Path(path)
    if not folder.is_dir():
        raise LorakitError(f"adapter folder {folder} does not exist")
    cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        hint = " (found adapter_model.bin: convert it to safetensors; lorakit never unpickles files)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise LorakitError(f"{cfg_path} is missing: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    if not weights_path.is_file():
        hint = " (found adapter_model.bin: lorakit reads safetensors only, it never unpickles files)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise LorakitError(f"{weights_path} is missing{hint}")
    config = read_adapter_config(folder)
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise LorakitError(f"{weights_path}: not a readable safetensors file ({err})") from None
    return config, state


def _expected_shapes(target: Target) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    from .inject import layer_factory

    module = target.module
    layer = module if isinstance(module, LoraLayer) else layer_factory(module)(module)  # a throwaway view
    a, b = layer._factor_shapes(target.r)
    return a, b, isinstance(layer, LoraEmbedding)


def _lora_tensors(folder: Path, plan: list[Target], config: LoraConfig,
                  remaining: dict[str, Tensor]) -> dict[str, tuple[Tensor, ...]]:
    """Each target's A, B (and DoRA's magnitude), popped from ``remaining`` after checking keys and shapes."""
    lora_tensors: dict[str, tuple[Tensor, ...]] = {}
    for t in plan:
        a_shape, b_shape, is_emb = _expected_shapes(t)
        suffixes = ("lora_embedding_A", "lora_embedding_B") if is_emb else ("lora_A.weight", "lora_B.weight")
        pair = []
        for suffix, shape in zip(suffixes, (a_shape, b_shape)):
            key = f"{PREFIX}{t.name}.{suffix}"
            if key not in remaining:
                raise LorakitError(f"{folder / WEIGHTS_NAME}: no weights for target module {t.name!r} (expected key {key!r}); "
                                   "the adapter was saved for a different model or config")
            tensor = remaining.pop(key)
            if tuple(tensor.shape) != tuple(shape):
                raise LorakitError(f"{folder / WEIGHTS_NAME}: {key} has shape {tuple(tensor.shape)}, this model needs "
                                   f"{tuple(shape)} (r={t.r}); the adapter was trained on a different model")
            pair.append(tensor)
        if config.use_dora:
            key = f"{PREFIX}{t.name}.lora_magnitude_vector"
            if key not in remaining or tuple(remaining[key].shape) != (b_shape[0],):
                raise LorakitError(f"{folder / WEIGHTS_NAME}: a DoRA adapter (use_dora) needs {key} of shape "
                                   f"({b_shape[0]},); " + ("it is missing" if key not in remaining else
                                                           f"it has shape {tuple(remaining[key].shape)}"))
            pair.append(remaining.pop(key))
        lora_tensors[t.name] = tuple(pair)
    return lora_tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str) -> LoraConfig:
    """Add adapter ``name`` from a PEFT folder to ``model``. Every key and shape is checked first."""
    folder = Path(path)
    config, state = read_adapter(folder)
    plan = plan_targets(model, config, name)
    remaining = dict(state)
    wrapper = "base_model.model."
    for key in list(remaining):
        if not key.startswith(wrapper):
            raise LorakitError(f"{folder / WEIGHTS_NAME}: key {key!r} does not start with {wrapper!r}; not a PEFT LoRA file")
    lora_tensors = _lora_tensors(folder, plan, config, remaining)
    params = dict(model.named_parameters())
    saved_full: dict[str, dict[str, Tensor]] = {}
    for want in config.modules_to_save or []:
        for mpath, module in model.named_modules():
            if not (mpath == want or mpath.endswith("." + want)):
                continue
            source = module.original_module if isinstance(module, ModulesToSave) else module
            found = {}
            for pname, p in source.named_parameters():
                for key in (f"{PREFIX}{mpath}.{pname}", f"{PREFIX}{mpath}.modules_to_save.{pname}"):
                    if key in remaining:
                        tensor = remaining.pop(key)
                        _check_shape(folder, key, tensor, p)
                        found[pname] = tensor
            if not found:
                raise LorakitError(f"{folder / WEIGHTS_NAME}: no weights for modules_to_save module {mpath!r} "
                                   f"(expected keys like {PREFIX}{mpath}.weight)")
            saved_full[mpath] = found
    plain: list[tuple[Tensor, Tensor]] = []  # (model parameter, saved value)
    for key in list(remaining):
        # Trained biases, or a base weight PEFT saved alongside (save_embedding_layers). A
        # '.base_layer.' key names a parameter of a module that is wrapped only after injection.
        pname = key[len(PREFIX):]
        param = params.get(pname, params.get(pname.replace(".base_layer.", ".", 1)))
        if param is not None:
            _check_shape(folder, key, remaining[key], param)
            plain.append((param, remaining.pop(key)))
    if remaining:
        sample = ", ".join(sorted(remaining)[:3])
        raise LorakitError(f"{folder / WEIGHTS_NAME}: {len(remaining)} key(s) match no module of this model "
                           f"(e.g. {sample}); the adapter was saved for a different model")
    # Everything checked: now change the model.
    inject_adapter(model, config, name)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for mpath, (A, B, *magnitude) in lora_tensors.items():
            layer = modules[mpath]
            layer.lora_A[name].copy_(A)
            layer.lora_B[name].copy_(B)
            if magnitude:
                layer.lora_magnitude[name].copy_(magnitude[0])
        for mpath, tensors in saved_full.items():
            copy_params = dict(modules[mpath].modules_to_save[name].named_parameters())
            for pname, tensor in tensors.items():
                copy_params[pname].copy_(tensor)
        for param, tensor in plain:
            param.copy_(tensor)
    return config


def _check_shape(folder: Path, key: str, tensor: Tensor, param: Tensor) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise LorakitError(f"{folder / WEIGHTS_NAME}: {key} has shape {tuple(tensor.shape)}, this model has "
                           f"{tuple(param.shape)}; the adapter was trained on a different model")


def pattern_config(base: LoraConfig, ranks: dict[str, int], alphas: dict[str, float], targets: list[str]) -> LoraConfig:
    """A config describing per-module ranks/alphas exactly: the most common value as default,
    the others as escaped full-path rank_pattern/alpha_pattern entries (PEFT reads them too)."""
    from collections import Counter

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(**{**base.to_dict(), "r": r, "alpha": alpha, "use_rslora": False, "init": "default",
                         "target_modules": targets, "layers_to_transform": None, "layers_pattern": None,
                         "exclude_modules": None,
                         "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
                         "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha}})

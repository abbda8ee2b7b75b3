"""``LoraModel``: a transformers (or any torch) model with named LoRA adapters — the object a PEFT
user knows as ``PeftModel``. It forwards attribute access to the wrapped model, so ``generate``,
``config`` and friends work as before."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import nn

from .peft_format import load_adapter as _load_adapter
from .peft_format import adapter_state_dict, save_adapter
from .combine import combine_adapters
from ..config import LoraConfig
from ..errors import LorakitError
from .inject import (
    delete_adapter, disable_adapters, expand_pattern_aliases, inject_adapter, mixed_batch, set_active_adapters,
    using_adapters,
)
from .report import format_report, trainable_report
from .merge import merge_adapters, merge_and_unload, unload, unmerge_adapters

__all__ = ["LoraModel", "get_lora_model"]


class LoraModel(nn.Module):
    """A base model plus named adapters. Build with :func:`get_lora_model` or :meth:`from_pretrained`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.configs: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []

    # ---- building ------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, activate: bool = True) -> None:
        """Inject a new adapter (validated first: a bad config changes nothing)."""
        if name in self.configs:
            raise LorakitError(f"adapter {name!r} already exists; pick another name or delete_adapter({name!r})")
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        if config.task_type is None and callable(getattr(self.model, "prepare_inputs_for_generation", None)):
            config.task_type = "CAUSAL_LM"
        # '@last:4', '@mlp'... become the regexes they stand for: the saved config is plain PEFT.
        config.rank_pattern = expand_pattern_aliases(self.model, config.rank_pattern)
        config.alpha_pattern = expand_pattern_aliases(self.model, config.alpha_pattern)
        inject_adapter(self.model, config, name)
        self.configs[name] = config
        if activate:
            self.set_adapter(name)
        else:
            self._refresh()

    def load_adapter(self, path: str | os.PathLike, name: str = "default", activate: bool = True,
                     is_trainable: bool = False) -> LoraConfig:
        """Load a PEFT-format adapter folder as ``name``; every key and shape is checked first."""
        if name in self.configs:
            raise LorakitError(f"adapter {name!r} already exists; load it under another name")
        config = _load_adapter(self.model, path, name)
        self.configs[name] = config
        if activate:
            self.set_adapter(name)
        else:
            self._refresh()
        if not is_trainable:
            for p in self.parameters():
                p.requires_grad_(False)
        return config

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False) -> "LoraModel":
        """Wrap ``model`` and load the adapter saved at ``path`` (PEFT's ``PeftModel.from_pretrained``)."""
        wrapped = cls(model)
        wrapped.load_adapter(path, adapter_name, is_trainable=is_trainable)
        return wrapped

    # ---- switching -----------------------------------------------------------------------
    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make one adapter (or several, summed) active; only active adapters train."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise LorakitError(f"unknown adapter(s) {unknown}; loaded: {list(self.configs)}")
        self.active_adapters = names
        self._refresh()

    def _refresh(self) -> None:
        bias = next((self.configs[n].bias for n in self.active_adapters if self.configs[n].bias != "none"), "none")
        set_active_adapters(self.model, self.active_adapters, bias=bias)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` runs the bare base model."""
        with disable_adapters(self.model):
            yield

    @contextmanager
    def using_adapter(self, names: str | Sequence[str]) -> Iterator[None]:
        """``with model.using_adapter("init"):`` runs that adapter (trainable flags unchanged)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise LorakitError(f"unknown adapter(s) {unknown}; loaded: {list(self.configs)}")
        with using_adapters(self.model, names):
            yield

    @contextmanager
    def mixed_batch(self, adapter_names: Sequence[str | None]) -> Iterator[None]:
        """Row i of each batch inside the block uses ``adapter_names[i]`` (None: the base)."""
        with mixed_batch(self.model, adapter_names, list(self.configs)):
            yield

    def delete_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise LorakitError(f"unknown adapter {name!r}; loaded: {list(self.configs)}")
        delete_adapter(self.model, name)
        del self.configs[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._refresh()

    # ---- running -------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its adapter layers in place)."""
        return self.model

    # ---- reporting -----------------------------------------------------------------------
    def trainable_report(self):
        return trainable_report(self.model)

    def print_trainable_parameters(self) -> None:
        print(format_report(self.model))

    # ---- saving --------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, adapters: Sequence[str] | None = None,
                        states: dict[str, dict] | None = None) -> Path:
        """Write adapters in PEFT's format: 'default' in ``path``, others in ``path/<name>``.
        ``states``: {name: tensors} already gathered with :meth:`adapter_states` (sharded models)."""
        for name in adapters if adapters is not None else list(self.configs):
            if name not in self.configs:
                raise LorakitError(f"unknown adapter {name!r}; loaded: {list(self.configs)}")
            save_adapter(self.model, path, name, self.configs[name], state=(states or {}).get(name))
        return Path(path)

    def adapter_states(self) -> dict[str, dict]:
        """{name: PEFT tensors} for every adapter; on a sharded (FSDP) model every rank must call it."""
        return {name: adapter_state_dict(self.model, name, config) for name, config in self.configs.items()}

    # ---- combining and merging -----------------------------------------------------------
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "cat", rank: int | None = None, density: float | None = None,
                             majority_sign_method: str = "total", seed: int = 0) -> LoraConfig:
        """New adapter = weighted combination (cat: exact Σwᵢ·ΔWᵢ; svd: exact then truncated; linear: approx;
        ties/dare_linear/dare_ties/magnitude_prune with ``density``, and their _svd forms: PEFT's rules)."""
        config = combine_adapters(self.model, self.configs, adapters, weights, adapter_name, combination_type, rank,
                                  density, majority_sign_method, seed)
        self.configs[adapter_name] = config
        self._refresh()
        return config

    def merge_adapter(self, adapters: Sequence[str] | None = None, safe: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; forward output is unchanged."""
        merge_adapters(self.model, adapters, safe=safe)

    def unmerge_adapter(self) -> None:
        unmerge_adapters(self.model)

    def merge_and_unload(self, adapters: Sequence[str] | None = None, safe: bool = False) -> nn.Module:
        """Merge, drop every wrapper, and return the plain model (this LoraModel is spent)."""
        model = merge_and_unload(self.model, adapters, safe=safe)
        self.configs.clear()
        return model

    def unload(self) -> nn.Module:
        """Drop every wrapper without merging and return the plain base model."""
        unmerge_adapters(self.model)
        model = unload(self.model, keep_full_copies=False)
        self.configs.clear()
        return model


def get_lora_model(model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> LoraModel:
    """Wrap ``model`` with a fresh adapter (PEFT's ``get_peft_model``); only the adapter trains."""
    wrapped = LoraModel(model)
    wrapped.add_adapter(adapter_name, config if config is not None else LoraConfig())
    return wrapped

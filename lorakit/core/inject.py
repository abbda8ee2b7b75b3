"""Putting adapters into a model: target matching, per-architecture defaults, wrapping, freezing,
the trainable-parameter report, and the switches (active adapters, disable, delete, mixed batches).

Every check runs in :func:`plan_targets` before anything is wrapped, so a bad config leaves the
model exactly as it was.
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import LorakitError
from .embedding_conv import LoraConv2d, LoraEmbedding
from .layers import LoraLayer, LoraLinear
from .shared_input import link_shared_inputs

try:  # GPT-2 style layers; transformers is a dependency, but keep lora usable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = [
    "DEFAULT_TARGETS", "ModulesToSave", "Target", "plan_targets", "inject_adapter", "lora_layers",
    "set_active_adapters", "disable_adapters", "delete_adapter", "mixed_batch",
    "adapter_modules", "validate_adapter_name", "expand_pattern_aliases", "last_modules", "pattern_value",
    "register_layer_type", "conv1d_types", "linear_types",
]

# Default target modules by `config.model_type`, when the user names none (attention + MLP).
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_FUSED_QKV = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "smollm3")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bloom": _FUSED_QKV,
    "gpt_neox": _FUSED_QKV,
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def conv1d_types() -> tuple[type, ...]:  # GPT-2's Conv1D: a linear layer storing its weight (in, out)
    return (Conv1D,) if Conv1D is not None else ()


def linear_types() -> tuple[type, ...]:
    """The layer types that compute x·Wᵀ + b: nn.Linear and GPT-2's Conv1D."""
    return (nn.Linear, *conv1d_types())


# Module type -> LoRA wrapper; first match wins (order matters for subclasses).
_FACTORIES: list[tuple[tuple[type, ...], Callable[[nn.Module], LoraLayer]]] = [
    ((nn.Linear,), LoraLinear),
    (conv1d_types(), lambda m: LoraLinear(m, fan_in_fan_out=True)),
    ((nn.Embedding,), LoraEmbedding),
    ((nn.Conv2d,), LoraConv2d),
]


def register_layer_type(types: tuple[type, ...], factory: Callable[[nn.Module], LoraLayer]) -> None:
    """Let LoRA wrap layers of ``types`` (another room's frozen layer, e.g. an int8 linear) with
    ``factory``; checked before the built-in types."""
    if not any(t == types for t, _ in _FACTORIES):
        _FACTORIES.insert(0, (types, factory))


def layer_factory(module: nn.Module) -> Callable[[nn.Module], LoraLayer] | None:
    for types, factory in _FACTORIES:
        if types and isinstance(module, types):
            return factory
    return None


class ModulesToSave(nn.Module):
    """A module trained in full: the frozen original plus one trainable copy per adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_adapters: Sequence[str | None] | None = None

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.active_adapter = name

    def forward(self, x, *args, **kwargs):
        if self.row_adapters is not None and not self.disabled:
            return self._mixed_forward(x, *args, **kwargs)
        module = self.current()
        return module(x, *args, **kwargs)

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def _mixed_forward(self, x, *args, **kwargs):
        rows = self.row_adapters
        result = self.original_module(x, *args, **kwargs)
        for name in dict.fromkeys(r for r in rows if r is not None and r in self.modules_to_save):
            idx = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
            result = result.index_copy(0, idx, self.modules_to_save[name](x.index_select(0, idx), *args, **kwargs))
        return result

    @property
    def weight(self):
        return self.current().weight


@dataclass
class Target:
    """One module to wrap for one adapter."""

    name: str  # module path inside the model, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Module  # the module there now (a plain layer, or a LoraLayer holding other adapters)
    r: int
    alpha: float


def validate_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise LorakitError(f"adapter name {name!r} must be letters, digits, '_' or '-' (it becomes a key and a folder)")


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module, seeing a LoraLayer or ModulesToSave as one leaf."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def matches_any(patterns: list[str] | str, name: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    # The first number in the path (PEFT's rule), or the number after one of layers_pattern.
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = next((mm for p in pats if (mm := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    return int(m.group(1)) if m else None


PATTERN_ALIASES = ("@attention", "@mlp", "@first:<k>", "@last:<k>")
_ATTENTION_RE = r".*(attn|attention)\.[^.]+"  # a projection inside an attention block
_MLP_RE = r".*(mlp|feed_forward|ffn)\.[^.]+"


def expand_pattern_aliases(model: nn.Module, table: dict) -> dict:
    """rank_pattern/alpha_pattern with the conveniences written as PEFT regexes: '@attention' and
    '@mlp' (projections inside attention / MLP blocks), '@first:k' and '@last:k' (modules of the
    first / last k numbered layers). Other keys pass through; the order (first match wins) is kept."""
    if not any(str(k).startswith("@") for k in table):
        return table
    layers = sorted({i for n, _ in model.named_modules() if (i := _layer_index(n, None)) is not None})
    out = {}
    for key, value in table.items():
        key = str(key)
        if key == "@attention":
            out[_ATTENTION_RE] = value
        elif key == "@mlp":
            out[_MLP_RE] = value
        elif m := re.fullmatch(r"@(first|last):(\d+)", key):
            if not layers:
                raise LorakitError(f"pattern {key!r}: this {type(model).__name__} has no numbered layers")
            k = int(m.group(2))
            chosen = layers[:k] if m.group(1) == "first" else layers[-k:]
            out[rf".*\.({'|'.join(map(str, chosen))})\..*"] = value
        elif key.startswith("@"):
            raise LorakitError(f"unknown pattern alias {key!r}; use {', '.join(PATTERN_ALIASES)} or a regex")
        else:
            out[key] = value
    return out


def pattern_value(table: dict, name: str, default):
    # PEFT semantics: the first key that matches the end of the module path wins.
    for key, value in table.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """The config's target_modules, or this architecture's default (all-linear when unknown)."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return DEFAULT_TARGETS.get(model_type, "all-linear")


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def plan_targets(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[Target]:
    """Resolve which modules ``adapter_name`` wraps, with their rank and alpha. Changes nothing."""
    validate_adapter_name(adapter_name)
    targets = resolve_target_modules(model, config)
    head = _output_head(model)
    keep = config.modules_to_save or []
    plan: list[Target] = []
    for name, module in candidate_modules(model):
        if not name:
            continue
        if config.exclude_modules is not None and matches_any(config.exclude_modules, name):
            continue
        if keep and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in keep):
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if targets == "all-linear":
            hit = base is not head and isinstance(base, linear_types())
        else:
            hit = matches_any(targets, name)
        if not hit:
            continue
        if config.layers_to_transform is not None:
            idx = _layer_index(name, config.layers_pattern)
            if idx is None or idx not in config.layers_to_transform:
                continue
        if isinstance(module, ModulesToSave):
            raise LorakitError(f"module {name!r} is trained in full by another adapter (modules_to_save); it cannot get LoRA too")
        if layer_factory(base) is None:
            raise LorakitError(
                f"target module {name!r} is a {type(base).__name__}; LoRA wraps Linear, Conv1D, Embedding and Conv2d. "
                "Name the projections inside it instead (see the model's named_modules()).")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise LorakitError(f"target module {name!r} is a grouped convolution (groups={base.groups}); "
                               "LoRA supports groups=1 only. Exclude it with exclude_modules.")
        if config.use_dora and not isinstance(base, linear_types()):
            raise LorakitError(f"DoRA (use_dora) adapts Linear and Conv1D layers; {name!r} is a {type(base).__name__}. "
                               "Leave it out of target_modules (or put it in exclude_modules), or train plain LoRA")
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            raise LorakitError(f"adapter {adapter_name!r} already exists on {name!r}; delete it first or pick another name")
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.alpha)
        plan.append(Target(name, module, r, alpha))
    if not plan:
        raise LorakitError(
            f"target_modules={targets!r} matched no module of this {type(model).__name__}. "
            f"Adaptable modules here include: {', '.join(_adaptable_leaf_names(model)[:12])}")
    for want in keep:
        if not any(n == want or n.endswith("." + want) for n, _ in candidate_modules(model)):
            raise LorakitError(f"modules_to_save names {want!r}, which is not a module of this {type(model).__name__}")
    return plan


def last_modules(model: nn.Module, kind: type = nn.Conv2d, k: int = 3) -> list[str]:
    """Paths of the last ``k`` modules of type ``kind`` in definition order — e.g. the last three
    convolutions of a CNN, where adapting the high-level features pays most."""
    found = [n for n, m in model.named_modules() if type(m) is kind]
    if len(found) < k:
        raise LorakitError(f"asked for the last {k} {kind.__name__} modules; this model has {len(found)}")
    return found[-k:]


def _adaptable_leaf_names(model: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in candidate_modules(model)
             if n and layer_factory(m.base_layer if isinstance(m, LoraLayer) else m)}
    return sorted(names)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is; the old one is no longer referenced from ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_eora(plan: list[Target]) -> None:
    from .start import start_of

    if not any(start_of(t.module.base_layer if isinstance(t.module, LoraLayer) else t.module) is not None
               for t in plan):
        raise LorakitError("lora.init eora starts each adapter from its layer's 4-bit rounding error, which only "
                           "calibrated quantization records, and none of the targeted layers has it: train with "
                           "--quantize nf4 --lora.init eora, or quantize with lorakit.quant.gptq.calibrated_quantize(model, "
                           "spec, rows, residual_rank=r) before adding the adapter")


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[Target]:
    """Wrap the planned modules and add ``adapter_name`` to them; returns the plan. Validates first."""
    plan = plan_targets(model, config, adapter_name)
    if config.init == "eora":
        _check_eora(plan)
    for t in plan:
        layer = t.module
        if not isinstance(layer, LoraLayer):
            layer = layer_factory(layer)(layer)
            replace_module(model, t.name, layer)
        layer.add_adapter(adapter_name, t.r, t.alpha, dropout=config.dropout,
                          use_rslora=config.use_rslora, init=config.init, dora=config.use_dora)
    for want in config.modules_to_save or []:
        for name, module in list(candidate_modules(model)):
            if name == want or name.endswith("." + want):
                if not isinstance(module, ModulesToSave):
                    module = ModulesToSave(module)
                    replace_module(model, name, module)
                module.add_adapter(adapter_name)
    link_shared_inputs(model)
    return plan


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module


def set_active_adapters(model: nn.Module, names: Sequence[str], bias: str = "none") -> None:
    """Make ``names`` the active adapters; only their parameters (and the configured biases) train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in adapter_modules(model):
        if isinstance(module, LoraLayer):
            module.active_adapters = [n for n in names if n in module.lora_A]
            for n in module.active_adapters:
                for p in module.adapter_params(n):
                    p.requires_grad_(True)
            if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        else:
            module.active_adapter = next((n for n in names if n in module.modules_to_save), None)
            if module.active_adapter is not None:
                module.modules_to_save[module.active_adapter].requires_grad_(True)
    if bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith(".bias") and ".modules_to_save." not in pname and ".original_module." not in pname:
                p.requires_grad_(True)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the bare base model inside the block (modules_to_save fall back to their originals)."""
    modules = [m for _, m in adapter_modules(model)]
    merged = sorted({n for m in modules if isinstance(m, LoraLayer) for n in m.merged_adapters})
    if merged:
        raise LorakitError(f"adapters {merged} are merged into the base weights; unmerge() before disabling adapters")
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(modules, previous):
            m.disabled = was


@contextmanager
def using_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Inside the block the forward runs ``names`` instead of the active adapters; which tensors
    train is unchanged (a frozen adapter can score beside the one that trains)."""
    modules = [m for _, m in adapter_modules(model)]
    lora = [m for m in modules if isinstance(m, LoraLayer)]
    others = [m for m in modules if not isinstance(m, LoraLayer)]
    previous = [m.active_adapters for m in lora], [m.active_adapter for m in others]
    for m in lora:
        m.active_adapters = [n for n in names if n in m.lora_A]
    for m in others:
        m.active_adapter = next((n for n in names if n in m.modules_to_save), None)
    try:
        yield
    finally:
        for m, was in zip(lora, previous[0]):
            m.active_adapters = was
        for m, was in zip(others, previous[1]):
            m.active_adapter = was


@contextmanager
def mixed_batch(model: nn.Module, row_adapters: Sequence[str | None], known: Sequence[str]) -> Iterator[None]:
    """Inside the block, row i of every batch uses adapter ``row_adapters[i]`` (None: the base)."""
    unknown = sorted({r for r in row_adapters if r is not None and r not in known})
    if unknown:
        raise LorakitError(f"mixed batch names unknown adapters {unknown}; loaded adapters: {list(known)}")
    modules = [m for _, m in adapter_modules(model)]
    merged = sorted({n for m in modules if isinstance(m, LoraLayer) for n in m.merged_adapters})
    if merged:
        raise LorakitError(f"adapters {merged} are merged into the base; unmerge() before a mixed batch")
    rows = list(row_adapters)
    for m in modules:
        m.row_adapters = rows
    try:
        yield
    finally:
        for m in modules:
            m.row_adapters = None
            m.__dict__.pop("_routing_cache", None)  # stacked adapters of this batch (inference path)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; a layer left with no adapter is unwrapped back to its base."""
    for path, module in list(adapter_modules(model)):
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.delete_adapter(name)
            if not module.lora_A:
                replace_module(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
            del module.modules_to_save[name]
            if module.active_adapter == name:
                module.active_adapter = None
            if not len(module.modules_to_save):
                replace_module(model, path, module.original_module)

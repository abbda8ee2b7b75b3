"""Weighted combination of adapters into a new one (the seeds' ``weights=[0.7, 0.3]``).

- ``cat``: exactly Σ wᵢ·ΔWᵢ; the new rank is Σ rᵢ (A's stacked, weights and scalings on A).
- ``svd``: Σ wᵢ·ΔWᵢ computed exactly, then truncated to ``rank`` by SVD (exact at full rank).
  The scaling is applied once: the new adapter has s = 1.
- ``linear``: PEFT's factor averaging, A = Σ sign(wᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ; needs equal
  ranks and is only an approximation (the cross terms Bᵢ·Aⱼ do not cancel).
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the same factor weighting, with the
  A's and the B's each merged by that rule of ``lorakit.core.task_merge`` (PEFT's semantics).
- ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the rule applied to
  the full updates wᵢ·ΔWᵢ, then truncated to ``rank`` by SVD like ``svd``.

Every new adapter has s = 1 (alpha = r): the weights and scalings are inside its factors. DARE's
random masks come from a generator seeded with ``seed``: layer by layer in model order, the A's
then the B's (or the updates), adapter by adapter — the order in which PEFT draws them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .peft_format import pattern_config
from ..config import COMBINE_METHODS, SIGN_METHODS, TASK_MERGES, LoraConfig
from ..errors import LorakitError
from .inject import ModulesToSave, adapter_modules, validate_adapter_name
from .embedding_conv import LoraEmbedding
from .layers import LoraLayer, LoraLinear
from .task_merge import merge_tensors

__all__ = ["combine_adapters", "check_combine_options", "COMBINE_METHODS"]

_PRUNING = TASK_MERGES[1:]  # ties, dare_linear, dare_ties, magnitude_prune


def _as_out_in(layer: LoraLayer, delta: Tensor) -> Tensor:
    """A layer-layout update as an (out, in)-like matrix in B·A's orientation (undoing layout transposes)."""
    if isinstance(layer, LoraEmbedding) or (isinstance(layer, LoraLinear) and layer.fan_in_fan_out):
        return delta.t()
    return delta.flatten(1)  # Conv2d: (out, in·kh·kw); Linear: unchanged


def _factors_for_new(layer: LoraLayer, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Reshape 2-D factors (r, in·…), (out, r) to this layer's storage shapes."""
    a_shape, b_shape = layer._factor_shapes(A.shape[0])
    return A.reshape(a_shape), B.reshape(b_shape)


def _covering_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names (e.g. q_proj) when they select exactly ``paths``; else the full paths."""
    from .inject import candidate_modules, matches_any

    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {n for n, _ in candidate_modules(model) if n and matches_any(leaves, n)}
    return leaves if selected == set(paths) else paths


def check_combine_options(method: str, rank: int | None = None, density: float | None = None,
                          sign_method: str = "total") -> None:
    """Refuse a method/rank/density/sign combination that cannot work (before any model is loaded)."""
    if method not in COMBINE_METHODS:
        raise LorakitError(f"combine method must be one of {', '.join(COMBINE_METHODS)}, got {method!r}")
    if rank is not None and rank <= 0:
        raise LorakitError(f"rank must be a positive integer, got {rank}")
    if method.endswith("svd") and rank is None:
        raise LorakitError(f"method {method!r} needs a target rank (rank=...)")
    pruning = method.removesuffix("_svd") in _PRUNING
    if pruning and density is None:
        raise LorakitError(f"method {method!r} needs a density: the fraction of entries kept, in (0, 1], e.g. 0.5")
    if density is not None and not pruning:
        raise LorakitError(f"density applies to {', '.join(_PRUNING)} (and their _svd forms), not to {method!r}")
    if density is not None and not 0 < density <= 1:
        raise LorakitError(f"density must be in (0, 1] (the fraction of entries kept), got {density}")
    if sign_method not in SIGN_METHODS:
        raise LorakitError(f"majority sign method must be one of {', '.join(SIGN_METHODS)}, got {sign_method!r}")


def _check(configs: dict[str, LoraConfig], adapters: Sequence[str], weights: Sequence[float], new_name: str,
           method: str, rank: int | None, density: float | None, sign_method: str) -> None:
    validate_adapter_name(new_name)
    check_combine_options(method, rank, density, sign_method)
    if new_name in configs:
        raise LorakitError(f"adapter {new_name!r} already exists; pick another name or delete it first")
    if len(adapters) != len(weights) or not adapters:
        raise LorakitError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    missing = [a for a in adapters if a not in configs]
    if missing:
        raise LorakitError(f"unknown adapters {missing}; loaded: {list(configs)}")


def _check_layers(model: nn.Module, layers: list[tuple[str, LoraLayer]], adapters: Sequence[str], method: str) -> None:
    if method in TASK_MERGES:  # factor merges stack the A's (and B's): one rank per layer
        for path, layer in layers:
            ranks = {layer.r[a] for a in adapters if a in layer.lora_A}
            if len(ranks) > 1:
                other = "'svd'" if method == "linear" else f"'svd' or '{method}_svd'"
                raise LorakitError(f"method {method!r} needs the adapters to have one rank on each layer; {path} has "
                                   f"ranks {sorted(ranks)}. Use 'cat' (exact) or {other} instead.")
    dora = sorted({a for _, layer in layers for a in adapters if a in layer.lora_magnitude})
    if dora:
        raise LorakitError(f"DoRA adapters {dora} cannot be combined: their magnitude vectors do not add up like "
                           "low-rank updates. Merge one into the base (lorakit merge) or combine plain LoRA adapters")
    if any(isinstance(m, ModulesToSave) and any(a in m.modules_to_save for a in adapters) for _, m in adapter_modules(model)):
        raise LorakitError("adapters with modules_to_save cannot be combined (full weights have no low-rank form)")


def _new_factors(layer: LoraLayer, parts: list[tuple[str, float]], method: str, rank: int | None, density: float,
                 sign_method: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The combined adapter's 2-D factors (r, in·…), (out, r) on one layer."""
    if method == "cat":
        A = torch.cat([w * layer.scaling[a] * layer.lora_A[a].float().flatten(1) for a, w in parts], 0)
        B = torch.cat([layer.lora_B[a].float().flatten(1) for a, _ in parts], 1)
        return A, B
    if method.endswith("svd"):
        rule = "linear" if method == "svd" else method.removesuffix("_svd")
        # in the layer's own layout (the one PEFT draws DARE masks in), then as an (out, in) matrix
        delta = merge_tensors(rule, [layer.delta_weight(a) for a, _ in parts], [w for _, w in parts],
                              density, sign_method, generator)
        U, S, Vh = torch.linalg.svd(_as_out_in(layer, delta), full_matrices=False)
        k = min(rank, S.shape[0])
        root = S[:k].sqrt()
        return root[:, None] * Vh[:k], U[:, :k] * root[None, :]
    ws = [w * layer.scaling[a] for a, w in parts]
    A = merge_tensors(method, [layer.lora_A[a].float() for a, _ in parts],
                      [math.copysign(math.sqrt(abs(w)), w) for w in ws], density, sign_method, generator)
    B = merge_tensors(method, [layer.lora_B[a].float() for a, _ in parts], [math.sqrt(abs(w)) for w in ws],
                      density, sign_method, generator)
    return A.flatten(1), B.flatten(1)


def combine_adapters(model: nn.Module, configs: dict[str, LoraConfig], adapters: Sequence[str],
                     weights: Sequence[float], new_name: str, method: str = "cat", rank: int | None = None,
                     density: float | None = None, sign_method: str = "total", seed: int = 0) -> LoraConfig:
    """Add adapter ``new_name`` = weighted combination of ``adapters``; returns its config."""
    _check(configs, adapters, weights, new_name, method, rank, density, sign_method)
    layers = [(p, m) for p, m in adapter_modules(model) if isinstance(m, LoraLayer) and any(a in m.lora_A for a in adapters)]
    _check_layers(model, layers, adapters, method)
    generator = torch.Generator().manual_seed(seed)
    new: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for path, layer in layers:
            parts = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
            A, B = _new_factors(layer, parts, method, rank, density if density is not None else 1.0, sign_method, generator)
            new[path] = _factors_for_new(layer, A, B)

    ranks = {p: a.shape[0] for p, (a, _) in new.items()}
    first = configs[adapters[0]]
    targets = _covering_targets(model, sorted(ranks))
    config = pattern_config(first, ranks, {p: float(r) for p, r in ranks.items()}, targets)
    config = LoraConfig(**{**config.to_dict(), "dropout": 0.0, "modules_to_save": None, "bias": "none"})
    modules = dict(model.named_modules())
    for path, (A, B) in new.items():
        layer = modules[path]
        layer.add_adapter(new_name, A.shape[0], float(A.shape[0]))
        with torch.no_grad():
            layer.lora_A[new_name].copy_(A)
            layer.lora_B[new_name].copy_(B)
        layer.active_adapters.remove(new_name)  # a new adapter is not switched on implicitly
    return config

"""Weighted combination of adapters into a new one (the seeds' ``weights=[0.7, 0.3]``).

- ``cat``: exactly Σ wᵢ·ΔWᵢ; the new rank is Σ rᵢ (A's stacked, weights and scalings on A).
- ``svd``: Σ wᵢ·ΔWᵢ computed exactly, then truncated to ``rank`` by SVD (exact at full rank).
  The scaling is applied once: the new adapter has s = 1.
- ``linear``: PEFT-compatible factor averaging, A = Σ √|wᵢ|·sign(wᵢ)·sᵢ·Aᵢ, B = Σ √|wᵢ|·Bᵢ; needs
  equal ranks and is only an approximation (the cross terms Bᵢ·Aⱼ do not cancel).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .peft_format import pattern_config
from ..config import LoraConfig
from ..errors import LorakitError
from .inject import ModulesToSave, adapter_modules, validate_adapter_name
from .layers import LoraEmbedding, LoraLayer, LoraLinear

__all__ = ["combine_adapters", "COMBINE_METHODS"]

COMBINE_METHODS = ("cat", "svd", "linear")


def _delta_as_out_in(layer: LoraLayer, name: str) -> Tensor:
    """ΔW as an (out, in)-like matrix matching B·A's orientation (undoing layout transposes)."""
    delta = layer.delta_weight(name)
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


def combine_adapters(model: nn.Module, configs: dict[str, LoraConfig], adapters: Sequence[str],
                     weights: Sequence[float], new_name: str, method: str = "cat",
                     rank: int | None = None) -> LoraConfig:
    """Add adapter ``new_name`` = weighted combination of ``adapters``; returns its config."""
    validate_adapter_name(new_name)
    if method not in COMBINE_METHODS:
        raise LorakitError(f"combine method must be one of {', '.join(COMBINE_METHODS)}, got {method!r}")
    if new_name in configs:
        raise LorakitError(f"adapter {new_name!r} already exists; pick another name or delete it first")
    if len(adapters) != len(weights) or not adapters:
        raise LorakitError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    missing = [a for a in adapters if a not in configs]
    if missing:
        raise LorakitError(f"unknown adapters {missing}; loaded: {list(configs)}")
    if rank is not None and rank <= 0:
        raise LorakitError(f"rank must be a positive integer, got {rank}")
    if method == "svd" and rank is None:
        raise LorakitError("method 'svd' needs a target rank (rank=...)")
    layers = [(p, m) for p, m in adapter_modules(model) if isinstance(m, LoraLayer) and any(a in m.lora_A for a in adapters)]
    if method == "linear":
        for path, layer in layers:
            ranks = {layer.r[a] for a in adapters if a in layer.lora_A}
            if len(ranks) > 1 or any(a not in layer.lora_A for a in adapters):
                raise LorakitError(f"method 'linear' needs every adapter on every layer with one rank; {path} has "
                                   f"ranks {sorted(ranks)}. Use 'cat' (exact) or 'svd' instead.")
    if any(isinstance(m, ModulesToSave) and any(a in m.modules_to_save for a in adapters) for _, m in adapter_modules(model)):
        raise LorakitError("adapters with modules_to_save cannot be combined (full weights have no low-rank form)")

    new: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for path, layer in layers:
            parts = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
            if method == "cat":
                A = torch.cat([w * layer.scaling[a] * layer.lora_A[a].float().flatten(1) for a, w in parts], 0)
                B = torch.cat([layer.lora_B[a].float().flatten(1) for a, _ in parts], 1)
            elif method == "svd":
                delta = sum(w * _delta_as_out_in(layer, a) for a, w in parts)  # exact Σ wᵢ·ΔWᵢ
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                k = min(rank, S.shape[0])
                root = S[:k].sqrt()
                A, B = root[:, None] * Vh[:k], U[:, :k] * root[None, :]
            else:
                A = sum(math.copysign(math.sqrt(abs(w)), w) * layer.scaling[a] * layer.lora_A[a].float().flatten(1)
                        for a, w in parts)
                B = sum(math.sqrt(abs(w)) * layer.lora_B[a].float().flatten(1) for a, w in parts)
            new[path] = _factors_for_new(layer, A, B)

    # Every new layer has s = 1 (alpha = r): the weights and scalings are inside the factors.
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


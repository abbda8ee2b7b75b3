"""The trainable-parameter report: PEFT's one-line summary and a per-module-type breakdown."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .inject import adapter_modules
from .layers import LoraLayer

__all__ = ["trainable_report", "format_report"]


def _param_count(p: torch.Tensor) -> int:
    # A 4-bit weight is stored packed (two values per byte); its quant state knows the real shape.
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return shape.numel() if shape is not None else p.numel()


def trainable_report(model: nn.Module) -> tuple[str, "OrderedDict[str, dict]"]:
    """PEFT's one-line summary and a per-module-type breakdown of the trainable parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_param_count(p) for p in model.parameters())
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"
    groups: OrderedDict[str, dict] = OrderedDict()
    for path, module in adapter_modules(model):
        kind = path.rsplit(".", 1)[-1]
        if isinstance(module, LoraLayer):
            params = [p for n in module.active_adapters for p in module.adapter_params(n)]
            ranks = {module.r[n] for n in module.active_adapters}
            kind_label = f"{kind} ({type(module.base_layer).__name__})"
        else:
            m = module.modules_to_save[module.active_adapter] if module.active_adapter else None
            params = list(m.parameters()) if m is not None else []
            ranks = set()
            kind_label = f"{kind} (full copy)"
        g = groups.setdefault(kind_label, {"modules": 0, "params": 0, "ranks": set()})
        g["modules"] += 1
        g["params"] += sum(p.numel() for p in params if p.requires_grad)
        g["ranks"] |= ranks
    return line, groups


def format_report(model: nn.Module) -> str:
    line, groups = trainable_report(model)
    rows = [line]
    if groups:
        rows.append(f"  {'module type':<32} {'count':>6} {'rank':>8} {'trainable':>12}")
        for kind, g in groups.items():
            ranks = ",".join(str(r) for r in sorted(g["ranks"])) or "-"
            rows.append(f"  {kind:<32} {g['modules']:>6} {ranks:>8} {g['params']:>12,d}")
    return "\n".join(rows)

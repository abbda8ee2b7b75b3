"""One matmul for the A factors of sibling projections that read the same input.

q/k/v of an attention block (gate/up of a gated MLP) are three (two) Linears applied to one
hidden-state tensor. Separately, their adapters read that tensor three times forward and run
three dA and three dX matmuls backward; stacked into one (Σr × in) matrix they read it once
and run one of each (autograd splits the gradient back onto each A through the ``cat``).
The math is unchanged: every row of the stacked product is exactly one adapter's X·Aᵀ.

Shared only where every sibling has the adapter, active, unmerged, not DoRA, and with the same
dropout probability: in training the group draws one dropout mask for the input they share
(``lorakit.core.dropout``; PEFT draws one per layer). Grouping is by name inside one parent
module; if the siblings turn out to receive different tensors (cross-attention), the group
switches itself off and each layer runs alone.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SHARED_INPUT_NAMES
from .dropout import dropped_linear
from .layers import LoraLinear, dropout_probability, to_adapter_dtype

__all__ = ["SHARED_INPUT_NAMES", "SharedInputGroup", "link_shared_inputs"]



class SharedInputGroup:
    """Sibling LoRA layers whose adapters' X·Aᵀ run as one matmul while they see the same X."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.enabled = True
        # adapter name -> (weak ref to X, X's version, stacked X·Aᵀ, indices of layers still to read it)
        self._cache: dict[str, tuple[weakref.ref, int, Tensor, set[int]]] = {}

    def __getstate__(self) -> dict:
        # a copy must not inherit the original's pending input (and weak references do not pickle)
        return {**self.__dict__, "_cache": {}}

    def _shareable(self, name: str) -> bool:
        if not all(name in layer.lora_A and name not in layer.lora_magnitude
                   and name not in layer.merged_adapters and name in layer.active_adapters
                   for layer in self.layers):
            return False
        return len({dropout_probability(layer, name) for layer in self.layers}) == 1

    def hidden(self, x: Tensor, name: str, layer: nn.Module) -> Tensor | None:
        """``layer``'s X·Aᵀ for adapter ``name`` (its rows of the stacked product), or None when
        this call cannot share (the layer then computes its own)."""
        if not self.enabled or not self._shareable(name):
            return None
        idx = next(i for i, member in enumerate(self.layers) if member is layer)
        entry = self._cache.get(name)
        if entry is not None and entry[0]() is x and entry[1] == x._version and idx in entry[3]:
            _, _, h, pending = entry
        else:
            if entry is not None and entry[3]:
                # a sibling has not read the previous input yet: these layers do not share one
                self.enabled = False
                self._cache.clear()
                return None
            A = torch.cat([member.lora_A[name] for member in self.layers])  # (Σr, in)
            p = dropout_probability(layer, name)
            h = dropped_linear(x, A, p) if p else F.linear(to_adapter_dtype(x, A), A)  # (..., Σr)
            pending = set(range(len(self.layers)))
            self._cache[name] = (weakref.ref(x), x._version, h, pending)
        pending.discard(idx)
        if not pending:
            del self._cache[name]  # every sibling has its rows: hold nothing between forwards
        start = sum(member.r[name] for member in self.layers[:idx])
        return h[..., start:start + layer.r[name]]


def link_shared_inputs(model: nn.Module) -> int:
    """Give sibling LoraLinear layers that share their input a common ``SharedInputGroup``;
    returns the number of groups."""
    groups = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUT_NAMES:
            members = [children[n] for n in sorted(names) if isinstance(children.get(n), LoraLinear)]
            for member in members:
                member.shared_input = None
            if len(members) < 2 or len({m.in_features for m in members}) != 1:
                continue
            group = SharedInputGroup(members)
            for member in members:
                member.shared_input = group
            groups += 1
    return groups

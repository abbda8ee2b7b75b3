"""DoRA (weight-decomposed LoRA): W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm taken per output row.

The direction W + s·B·A is trained through A and B as in LoRA, the per-output magnitude m (a
vector of ``out`` entries, PEFT's ``lora_magnitude_vector``) directly; m starts at ‖W‖ so a fresh
adapter changes nothing. As in the paper (section 4.3) and PEFT, the norm is treated as a constant
in backward. With ``x`` the layer input and ``Wx`` the base output without bias, the adapter adds

    (m/‖W + s·BA‖ − 1)·Wx + m/‖W + s·BA‖·s·BAx

to the base output. With dropout in training, PEFT's rule: both terms read the dropped-out input
(Wx is recomputed on it). These functions take plain tensors in (out, in) orientation; the layer
(``lorakit.core.layers.LoraLinear``) supplies them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["weight_norm", "dora_scale", "dora_output", "dora_merge", "dora_unmerge"]


def weight_norm(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """‖W + s·B·A‖ per output row, in fp32 (``weight`` is (out, in))."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.float() + scaling * (B.float() @ A.float()), dim=1)


def dora_scale(magnitude: Tensor, weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """m / ‖W + s·B·A‖ (out,): differentiable in m, the norm a constant."""
    return magnitude / weight_norm(weight, A, B, scaling).to(magnitude.dtype)


def dora_output(x: Tensor, base_out: Tensor | None, weight: Tensor, A: Tensor, B: Tensor, scaling: float,
                magnitude: Tensor) -> Tensor:
    """What the adapter adds to the base output. ``base_out`` is W·x without bias, or None to compute
    it from ``x`` (the dropped-out input in training)."""
    scale = dora_scale(magnitude, weight, A, B, scaling)  # (out,)
    if base_out is None:
        base_out = F.linear(x.to(weight.dtype), weight)
    lora = F.linear(F.linear(x.to(A.dtype), A), B)
    return (scale - 1) * base_out.to(scale.dtype) + scale * lora * scaling


def dora_merge(weight: Tensor, plain: Tensor, delta: Tensor, magnitude: Tensor, fan_in_fan_out: bool) -> tuple[Tensor, Tensor]:
    """Merge one DoRA adapter into ``weight`` (fp32, the layer's layout). ``plain``: the sum of the plain
    LoRA updates merged before it (they stay additive on top of the decomposed base W0 = weight − plain),
    ``delta``: its s·B·A. Returns the new weight and the scale to keep for ``dora_unmerge``."""
    w0 = weight - plain
    direction = w0 + delta
    norm = torch.linalg.vector_norm(direction.t() if fan_in_fan_out else direction, dim=1)
    scale = (magnitude / norm).view((1, -1) if fan_in_fan_out else (-1, 1))
    return plain + scale * direction, scale


def dora_unmerge(weight: Tensor, plain: Tensor, delta: Tensor, scale: Tensor) -> Tensor:
    """The inverse of ``dora_merge`` (the same ``plain`` merges still in the weight)."""
    return plain + (weight - plain) / scale - delta

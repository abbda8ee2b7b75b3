"""DoRA (weight-decomposed LoRA): W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm taken per output row.

The direction W + s·B·A is trained through A and B as in LoRA, the per-output magnitude m (a
vector of ``out`` entries, PEFT's ``lora_magnitude_vector``) directly; m starts at ‖W‖ so a fresh
adapter changes nothing. As in the paper (section 4.3) and PEFT, the norm is treated as a constant
in backward. With ``x`` the layer input and ``Wx`` the base output without bias, the adapter adds

    (m/‖W + s·BA‖ − 1)·Wx + m/‖W + s·BA‖·s·BAx

to the base output, i.e. the layer computes m/‖W + s·BA‖ ⊙ (Wx + s·BAx) + bias: the LoRA output
rescaled, so backward keeps one (tokens × out) tensor per layer beyond LoRA's. With dropout in
training, PEFT's rule: both terms read the dropped-out input (Wx is recomputed on it). These
functions take plain tensors in (out, in) orientation; the layer (``lorakit.core.layers.LoraLinear``)
supplies them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .float_view import float_weight

__all__ = ["DoraLinear", "weight_norm", "row_norm", "dora_merge", "dora_unmerge"]


def weight_norm(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """‖W + s·B·A‖ per output row, in fp32, from the whole matrix (``weight`` is (out, in))."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.float() + scaling * (B.float() @ A.float()), dim=1)


def row_norm(w_sq: Tensor, wa: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """The same norm without forming W + s·B·A: with ``w_sq`` = ‖W‖² per row and ``wa`` = W·Aᵀ (out, r),
    ‖W + s·BA‖² = ‖W‖² + 2s·Σ(B ⊙ W·Aᵀ) + s²·Σ(B·(A·Aᵀ) ⊙ B), each sum over a row. It costs one
    pass of the frozen weight over r inputs instead of several over an (out × in) fp32 matrix."""
    with torch.no_grad():
        A, B, wa = A.float(), B.float(), wa.float()
        sq = w_sq + 2 * scaling * (B * wa).sum(1) + scaling * scaling * ((B @ (A @ A.t())) * B).sum(1)
        return sq.clamp_min(0).sqrt()


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


class DoraLinear:
    """DoRA for ``lorakit.core.layers.LoraLinear`` (mixed in before ``LoraLayer``): the adapters that have
    a magnitude in ``lora_magnitude`` run, merge and unmerge by the formulas above."""

    def dense_weight(self) -> Tensor:
        """The base weight as a float (out, in) matrix (dequantized for a quantized base)."""
        w = float_weight(self.base_layer)
        return w.t() if self.fan_in_fan_out else w

    def _init_dora(self, name: str) -> None:
        # m = ‖W + s·BA‖: the adapter starts as the identity whatever its init
        A, B = self.lora_A[name], self.lora_B[name]
        norm = weight_norm(self.dense_weight(), A, B, self.scaling[name])
        self.lora_magnitude[name] = nn.Parameter(norm.to(A.dtype), requires_grad=A.requires_grad)

    def add_dora_output(self, result: Tensor, x: Tensor, name: str, base_out: Tensor) -> Tensor:
        """``result`` with DoRA adapter ``name`` applied; ``base_out`` is the base layer's output."""
        A, B, s, base = self.lora_A[name], self.lora_B[name], self.scaling[name], self.base_layer
        bias, dropout = getattr(base, "bias", None), self.lora_dropout[name]
        alone = result is base_out  # no other adapter added anything yet
        if self.training and not isinstance(dropout, nn.Identity):
            x = dropout(x)  # PEFT's rule: both terms read the dropped-out input
            base_out, alone = base(x), False
        plain = base_out if bias is None else base_out - bias  # W·x
        scale = self.lora_magnitude[name] / self._dora_norm(name, x.dtype)  # differentiable in m only
        autocast = torch.is_autocast_enabled(x.device.type)
        h = F.linear(x if autocast else x.to(A.dtype), A)  # (under autocast the matmul casts by itself)
        if plain.dtype == B.dtype or autocast:  # W·x + s·BA·x in one addmm
            y = torch.addmm(plain.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), B.t(), alpha=s).view(plain.shape)
        else:
            y = plain + (F.linear(h, B) * s).to(plain.dtype)
        if alone:  # m/‖W + s·BA‖ ⊙ (W·x + s·BA·x) + bias
            out = y * scale if bias is None else torch.addcmul(bias, y, scale)
        else:
            out = result + (scale * y - plain)
        return out.to(result.dtype)

    def _dora_norm(self, name: str, dtype: torch.dtype) -> Tensor:
        """‖W + s·BA‖ per output row; recomputed only when A, B or the base weight changed (an optimizer
        step, a merge), so accumulation steps and every decoding step reuse it."""
        A, B, base, w = self.lora_A[name], self.lora_B[name], self.base_layer, self.base_layer.weight
        key = (A.data_ptr(), A._version, B.data_ptr(), B._version, w.data_ptr(), w._version, dtype, self.scaling[name])
        if name in self._dora_norms and self._dora_norms[name][0] == key:
            return self._dora_norms[name][1]
        with torch.no_grad():  # the norm is a constant in backward; the frozen layer itself gives W·Aᵀ
            bias = getattr(base, "bias", None)
            wa = base(A.detach().to(dtype))
            wa = (wa if bias is None else wa - bias).t()
            if self._sq_norms is None or self._sq_norms[0] != key[4:6]:
                self._sq_norms = (key[4:6], self.dense_weight().float().pow(2).sum(1))  # ‖W‖²
            norm = row_norm(self._sq_norms[1], wa, A, B, self.scaling[name])
        self._dora_norms[name] = (key, norm)
        return norm

    def _merged_weight(self, weight: Tensor, name: str) -> Tensor:
        if name not in self.lora_magnitude:
            return super()._merged_weight(weight, name)
        new, self._dora_scales[name] = dora_merge(weight, *self._dora_parts(weight, name), self.fan_in_fan_out)
        return new

    def _unmerged_weight(self, weight: Tensor, name: str) -> Tensor:
        if name not in self.lora_magnitude:
            return super()._unmerged_weight(weight, name)
        plain, delta, _ = self._dora_parts(weight, name)
        return dora_unmerge(weight, plain, delta, self._dora_scales.pop(name))

    def _dora_parts(self, weight: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
        # merged_adapters holds exactly the merges below this one (it is not in the list while it merges or unmerges)
        if any(n in self.lora_magnitude for n in self.merged_adapters):
            raise ValueError(f"adapter {name!r} is DoRA and a DoRA adapter is merged on this layer already; "
                             "merge DoRA adapters one at a time (unmerge first)")
        plain = sum((self.delta_weight(n).to(weight.device) for n in self.merged_adapters), torch.zeros_like(weight))
        return plain, self.delta_weight(name).to(weight.device), self.lora_magnitude[name].detach().float()


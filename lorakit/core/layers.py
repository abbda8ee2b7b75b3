"""LoRA layers: W' = W + s·B·A around a frozen Linear or GPT-2 Conv1D (Embedding and Conv2d:
``lorakit.core.embedding_conv``), and DoRA on the linear ones (``lorakit.core.dora``).

A is (r, in) and B is (out, r) — PEFT's storage layout — whatever the base's own layout.
s = alpha / r, or alpha / sqrt(r) with rsLoRA. ``delta_weight()`` is the one place the update
formula is written; merge, unmerge, combine and export all call it.

This module imports torch only; a builder (``lorakit.core.inject``) translates configs into the
flat constructor and ``add_adapter`` arguments used here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import INIT_CHOICES
from .dora import DoraLinear
from .dropout import dropped_linear
from .start import balanced_factors, pissa_factors, start_of

__all__ = ["LoraLayer", "LoraLinear", "lora_scaling", "to_adapter_dtype", "dropout_probability", "INIT_CHOICES"]


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """s = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA, stable at large r)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _adapter_dtype(weight: Tensor) -> torch.dtype:
    # fp32 adapters on a half-precision or quantized base: small tensors, stable optimizer steps.
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def to_adapter_dtype(x: Tensor, A: Tensor) -> Tensor:
    # Under autocast the matmuls cast their inputs themselves: converting a bf16 activation to the
    # fp32 adapter dtype first would only make a copy that autocast converts straight back.
    return x if torch.is_autocast_enabled(x.device.type) else x.to(A.dtype)


def dropout_probability(layer: nn.Module, name: str) -> float:
    """The dropout probability adapter ``name`` applies to its input now: 0 in eval mode."""
    dropout = layer.lora_dropout[name]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _require_float_base(weight: Tensor, what: str) -> None:
    if not weight.dtype.is_floating_point:
        # Writing into a quantized weight would re-quantize it and round most of the update away.
        raise ValueError(f"cannot {what} a quantized base weight ({weight.dtype}); dequantize the model first "
                         "(lorakit.quant.bnb.dequantize_model, which merge_and_unload does for you)")


class LoraLayer(nn.Module, ABC):
    """Named adapters around one frozen ``base_layer``: which exist, which are active, which are merged.

    Subclasses define the factor shapes (``_factor_shapes``), their init, the adapter's output
    (``lora_output``) and the update in the base weight's layout (``delta_weight``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only (lorakit.core.dora)
        # DoRA's state besides its parameters (lorakit.core.dora): m/‖W + s·BA‖ of each merged adapter,
        # each adapter's norm with the versions it was computed at, and ‖W‖² per row with the weight's
        self._dora_scales: dict[str, Tensor] = {}
        self._dora_norms: dict[str, tuple[tuple, Tensor]] = {}
        self._sq_norms: tuple[tuple, Tensor] | None = None
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Mixed batch: the adapter name (or None for the base) of each row of the next forwards.
        self.row_adapters: Sequence[str | None] | None = None

    # ---- adapter bookkeeping -------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base weight (some model code reads ``module.weight`` directly)."""
        return self.base_layer.weight

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        dora: bool = False,
    ) -> None:
        """Create adapter ``name`` with rank ``r`` (DoRA with ``dora``); a default init leaves the output unchanged."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if r <= 0:
            raise ValueError(f"rank must be a positive integer, got r={r}")
        weight = self.base_layer.weight
        a_shape, b_shape = self._factor_shapes(r)
        dtype = _adapter_dtype(weight)
        self.lora_A[name] = nn.Parameter(torch.empty(a_shape, device=weight.device, dtype=dtype))
        self.lora_B[name] = nn.Parameter(torch.empty(b_shape, device=weight.device, dtype=dtype))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.alpha[name] = r, alpha
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)
        if init.startswith("pissa"):
            self._init_pissa(name, init)
        elif init in ("default", "gaussian"):
            self._init_factors(name, init)
        elif init == "eora":
            self._init_eora(name)
        else:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INIT_CHOICES)}")
        if dora:
            self._init_dora(name)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base; unmerge it before deleting")
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        self._dora_norms.pop(name, None)
        for table in (self.r, self.alpha, self.scaling):
            del table[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        for buf in (f"pissa_A0_{name}", f"pissa_B0_{name}"):
            if buf in self._buffers:
                del self._buffers[buf]

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        """The trained tensors of adapter ``name``: A, B and (DoRA) the magnitude."""
        return [self.lora_A[name], self.lora_B[name]] + ([self.lora_magnitude[name]] if name in self.lora_magnitude else [])

    def _init_dora(self, name: str) -> None:
        raise ValueError(f"DoRA is for Linear/Conv1D layers, not {type(self.base_layer).__name__}")

    def set_scale(self, name: str, scaling: float) -> None:
        self.scaling[name] = scaling

    def grow_adapter(self, name: str, r: int, alpha: float) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Raise adapter ``name`` to rank ``r`` without changing its output.

        The old factors become the first slices of new ones; the new rows of A are initialised
        like a fresh A and the new columns of B like a fresh B (zero), so B·A is unchanged (for
        Embedding, whose A starts at zero, the other way round). ``alpha`` must keep the scaling
        s unchanged. Returns ((old A, new A), (old B, new B)) so an optimizer can follow.
        """
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before changing its rank")
        if f"pissa_A0_{name}" in self._buffers:
            raise ValueError("a PiSSA adapter cannot grow: its factors are tied to the base's singular vectors")
        r0 = self.r[name]
        if r <= r0:
            raise ValueError(f"adapter {name!r} has rank {r0}; a new rank must be larger, got {r}")
        old_A, old_B = self.lora_A[name], self.lora_B[name]
        a_shape, b_shape = self._factor_shapes(r)
        self.lora_A[name] = nn.Parameter(old_A.new_empty(a_shape), requires_grad=old_A.requires_grad)
        self.lora_B[name] = nn.Parameter(old_B.new_empty(b_shape), requires_grad=old_B.requires_grad)
        self.r[name], self.alpha[name] = r, alpha
        self._init_factors(name, "default")
        with torch.no_grad():
            self.lora_A[name][:r0].copy_(old_A)  # the rank is A's first and B's second dimension
            self.lora_B[name][:, :r0].copy_(old_B)
        self._routing_cache = None
        return (old_A, self.lora_A[name]), (old_B, self.lora_B[name])

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.row_adapters is not None:
            return self._mixed_forward(x, result)
        base_out = result
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                if name in self.lora_magnitude:  # DoRA reads the base output itself (not the other adapters')
                    result = self.add_dora_output(result, x, name, base_out)
                else:
                    result = self.add_lora_output(result, x, name)
        return result

    def add_lora_output(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        """result + s·B·A·dropout(x), in result's dtype."""
        return result + self.lora_output(x, name).to(result.dtype)

    def _mixed_forward(self, x: Tensor, result: Tensor) -> Tensor:
        # One base pass for the whole batch (above); each adapter then runs on its own rows only.
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"mixed batch names {len(rows)} adapters but the batch has {x.shape[0]} rows")
        for name in dict.fromkeys(r for r in rows if r is not None):
            if name not in self.lora_A:
                continue  # this adapter does not target this layer
            idx = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
            if name in self.lora_magnitude:  # these rows of result still hold the base output
                rows_out = result.index_select(0, idx)
                delta = self.add_dora_output(rows_out, x.index_select(0, idx), name, rows_out) - rows_out
            else:
                delta = self.lora_output(x.index_select(0, idx), name)
            delta = delta.to(result.dtype)
            result = result.index_add(0, idx, delta)
        return result

    def add_dora_output(self, result: Tensor, x: Tensor, name: str, base_out: Tensor) -> Tensor:
        raise ValueError(f"DoRA is for Linear/Conv1D layers, not {type(self.base_layer).__name__}")

    @abstractmethod
    def lora_output(self, x: Tensor, name: str) -> Tensor:
        """s·B·A·dropout(x): the adapter's contribution to the output, in the adapter's dtype."""

    # ---- weights ---------------------------------------------------------------------------
    @abstractmethod
    def delta_weight(self, name: str) -> Tensor:
        """s·B·A in the base weight's layout, computed in fp32 (half-precision factors upcast)."""

    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> list[str]:
        """Add the deltas of ``names`` (default: the active adapters) into the base weight."""
        weight = self.base_layer.weight
        _require_float_base(weight, "merge into")
        done = []
        for name in names if names is not None else self.active_adapters:
            if name not in self.lora_A or name in self.merged_adapters:
                continue
            # fp32 here because a half-precision add would round away most of a small update.
            merged = self._merged_weight(weight.data.float(), name)
            if safe and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the base was left unchanged")
            weight.data.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)
            done.append(name)
        return done

    def unmerge(self) -> None:
        """Subtract every merged delta again, newest first."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data.copy_(self._unmerged_weight(weight.data.float(), name).to(weight.dtype))

    def _merged_weight(self, weight: Tensor, name: str) -> Tensor:
        """The fp32 base weight with adapter ``name`` merged in (DoRA: see LoraLinear)."""
        return weight + self.delta_weight(name).to(weight.device)

    def _unmerged_weight(self, weight: Tensor, name: str) -> Tensor:
        return weight - self.delta_weight(name).to(weight.device)

    def _factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].float(), self.lora_B[name].float()

    # ---- init ------------------------------------------------------------------------------
    @abstractmethod
    def _factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for rank r."""

    def _init_factors(self, name: str, init: str) -> None:
        # Kaiming-uniform A (nn.Linear's own init) and zero B: a fresh adapter is an exact no-op.
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A[name], std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name])

    def _init_pissa(self, name: str, init: str) -> None:
        raise ValueError(f"{init} init is for Linear/Conv1D layers; use 'default' or 'gaussian' for {type(self.base_layer).__name__}")

    def _init_eora(self, name: str) -> None:
        # A low-rank start kept on the base layer (lorakit.core.start; EoRA leaves the first rank-r
        # directions of the quantized base's output error there); without one, a plain LoRA start.
        self._init_factors(name, "default")
        factors = start_of(self.base_layer)
        if factors is None:
            return
        r = min(self.r[name], factors[0].shape[1])
        B, A = balanced_factors(factors[0][:, :r], factors[1][:r], self.scaling[name])
        with torch.no_grad():
            self.lora_A[name][:r].copy_(A)
            self.lora_B[name][:, :r].copy_(B)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]} s={self.scaling[n]:g}" for n in self.lora_A)
        return f"adapters=[{ranks}], active={self.active_adapters}, merged={self.merged_adapters}"


class LoraLinear(DoraLinear, LoraLayer):
    """LoRA around ``nn.Linear`` (weight (out, in)) or GPT-2 ``Conv1D`` (weight (in, out), fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        if getattr(base_layer, "support_avx512bf16_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for a bf16 CPU kernel (on CPUs with AVX512-BF16) the
            # first time it runs in eval mode, for good and lossily; that kernel has no backward and
            # the repacked weight no longer dequantizes exactly. A wrapped base keeps its layout.
            base_layer.support_avx512bf16_for_cpu = False
        w = base_layer.weight
        if fan_in_fan_out:
            self.out_features, self.in_features = w.shape[1], w.shape[0]
        elif hasattr(base_layer, "in_features"):  # a quantized base stores its weight packed
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        else:
            self.out_features, self.in_features = tuple(w.shape)
        # Set by lorakit.core.shared_input.link_shared_inputs when siblings read the same input (q/k/v).
        self.shared_input = None

    def _factor_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def lora_output(self, x: Tensor, name: str) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]  # (r, in), (out, r)
        x = to_adapter_dtype(self.lora_dropout[name](x), A)
        return F.linear(F.linear(x, A), B) * self.scaling[name]  # (..., r) -> (..., out)

    def add_lora_output(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        if result.dtype != B.dtype and not torch.is_autocast_enabled(result.device.type):
            return super().add_lora_output(result, x, name)
        h = self.shared_input.hidden(x, name, self) if self.shared_input is not None else None
        if h is None:
            p = dropout_probability(self, name)  # fused: backward keeps a 1-byte mask, not a dropped copy
            h = dropped_linear(x, A, p) if p else F.linear(to_adapter_dtype(x, A), A)  # (..., r)
        # addmm folds the scaling and the residual add into the B matmul: no extra (N, out) pass; and
        # into result itself where it is a plain Linear's fresh output, which no backward keeps.
        if self._owns_output(result) and result.dim() in (2, 3):
            # in-place ops are not autocast ops: the factors are cast here, as autocast would; and on
            # result itself, not a 2-D view of it (autograd would copy the whole output back in backward)
            Bt = B.t().to(result.dtype)
            h = h.to(result.dtype)
            if result.dim() == 2:
                return result.addmm_(h, Bt, alpha=self.scaling[name])
            return result.baddbmm_(h, Bt.expand(result.shape[0], -1, -1), alpha=self.scaling[name])
        flat = result.reshape(-1, self.out_features)
        return torch.addmm(flat, h.reshape(-1, h.shape[-1]), B.t(), alpha=self.scaling[name]).view(result.shape)

    def _owns_output(self, result: Tensor) -> bool:
        """Whether ``result`` may be written in place: an ``nn.Linear``'s own output (its backward keeps
        the input and the weight, not the output), with no forward hook that could hold it and no DoRA
        adapter that reads the base output after the LoRA ones are added."""
        base = self.base_layer
        return (type(base) is nn.Linear and not base._forward_hooks and not self.lora_magnitude
                and result._base is None and result.is_contiguous())

    def _mixed_forward(self, x: Tensor, result: Tensor) -> Tensor:
        if torch.is_grad_enabled() or self.training or any(n in self.lora_magnitude for n in self.row_adapters):
            return super()._mixed_forward(x, result)
        # Inference: every adapter's A stacked into one matrix, each row masked to its own slice —
        # two matmuls per layer instead of a gather/matmul/scatter per adapter.
        routing = self._routing()
        if routing is None:
            return result  # no row uses an adapter that targets this layer
        A_cat, B_cat, mask = routing  # (S·r, in), (out, S·r), (B, S·r)
        h = F.linear(x.to(A_cat.dtype), A_cat)  # (B, ..., S·r)
        h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        return result.add_(F.linear(h, B_cat).to(result.dtype))

    def _routing(self) -> tuple[Tensor, Tensor, Tensor] | None:
        rows = self.row_adapters
        cached = getattr(self, "_routing_cache", None)
        if cached is not None and cached[0] is rows:
            return cached[1]
        names = [n for n in dict.fromkeys(rows) if n is not None and n in self.lora_A]
        routing = None
        if names:
            r = max(self.r[n] for n in names)
            ref = self.lora_A[names[0]]
            A_cat = ref.new_zeros(len(names) * r, self.in_features)
            B_cat = ref.new_zeros(self.out_features, len(names) * r)
            mask = ref.new_zeros(len(rows), len(names) * r)
            for k, n in enumerate(names):
                A_cat[k * r:k * r + self.r[n]] = self.lora_A[n]
                B_cat[:, k * r:k * r + self.r[n]] = self.lora_B[n] * self.scaling[n]  # scaling folded in
            for i, n in enumerate(rows):
                if n in names:
                    k = names.index(n)
                    mask[i, k * r:(k + 1) * r] = 1.0
            routing = (A_cat, B_cat, mask)
        self._routing_cache = (rows, routing)
        return routing

    def delta_weight(self, name: str) -> Tensor:
        A, B = self._factors(name)
        delta = (B @ A) * self.scaling[name]  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def _init_pissa(self, name: str, init: str) -> None:
        # PiSSA: the adapter starts as the top-r singular triplets of W; the base keeps the rest.
        r, s = self.r[name], self.scaling[name]
        weight = self.base_layer.weight
        _require_float_base(weight, "initialise PiSSA from")
        W = weight.data.float()
        W = W.t() if self.fan_in_fan_out else W  # (out, in)
        A, B = pissa_factors(W, r, s, init)
        with torch.no_grad():
            self.lora_A[name].copy_(A)
            self.lora_B[name].copy_(B)
            residual = W - s * (B @ A)
            weight.data.copy_((residual.t() if self.fan_in_fan_out else residual).to(weight.dtype))
        # Kept so the adapter can be saved as a plain LoRA against the original weights.
        self.register_buffer(f"pissa_A0_{name}", self.lora_A[name].detach().clone(), persistent=False)
        self.register_buffer(f"pissa_B0_{name}", self.lora_B[name].detach().clone(), persistent=False)

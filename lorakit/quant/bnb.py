"""Quantized frozen bases for QLoRA: NF4/FP4 (4-bit, blocks of 64, absmax scales, optional double
quantization of the scales) and int8, stored and computed by bitsandbytes on CPU and CUDA.

``quantize_model`` swaps a loaded model's ``nn.Linear`` layers (not the output head) for
bitsandbytes' quantized layers; LoRA then wraps them like any Linear. ``dequantize_model`` turns
them back into float ``nn.Linear`` layers holding the dequantized weights — the exact base the
adapter was trained against — which is how a quantized run is merged (re-quantizing after a merge
would round most of the update away; ``requantize_error`` measures how much).

bitsandbytes is the optional extra ``lorakit[qlora]``; everything here imports it lazily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..config import QUANT_CHOICES
from ..errors import LorakitError
from ..core.frozen import register_float_view
from ..core.inject import replace_module
from ..core.layers import LoraLayer

__all__ = ["QUANT_CHOICES", "QuantSpec", "require_bnb", "nf4_code", "is_quantized", "quantized_layers",
           "quantize_model", "quantize_linear", "spec_of", "dequantize_weight", "dequantize_layer", "dequantize_model", "prepare_for_kbit_training",
           "storage_bytes", "requantize_error", "has_quantized_layers", "quant_summary", "hf_quantization_config"]


@dataclass(frozen=True)
class QuantSpec:
    """How the frozen linear weights are stored: method nf4 | fp4 | int8, double quantization of the
    4-bit block scales, and the dtype the 4-bit layers compute in."""

    method: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        if self.method == "int8":
            return "int8 (row-wise absmax)"
        dq = ", double-quantized scales" if self.double_quant else ""
        return f"{self.method.upper()} 4-bit (blocks of 64{dq}), compute in {str(self.compute_dtype).removeprefix('torch.')}"


def require_bnb():
    """Import bitsandbytes, or say how to install it."""
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)  # its CPU backend warns about an optional hub kernel on import
    try:
        import bitsandbytes
    except ImportError as err:
        raise LorakitError(f"quantized bases need bitsandbytes ({err}); install it with: pip install 'lorakit[qlora]'") from None
    finally:
        log.setLevel(level)
    return bitsandbytes


def nf4_code() -> Tensor:
    """The 16 NF4 values from their definition (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1)
    that split [δ, 1/2] evenly, 8 on the positive side and 7 on the negative, plus an exact zero,
    scaled to [-1, 1]; δ = 1 − (1/32 + 1/30)/2."""
    delta = 1 - (1 / 32 + 1 / 30) / 2
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    code = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (code / code.max()).float()


def _quantized_types() -> tuple[type, ...]:
    import sys

    bnb = sys.modules.get("bitsandbytes")  # no quantized layer can exist before bitsandbytes is imported
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()


def is_quantized(module: nn.Module) -> bool:
    types = _quantized_types()
    return bool(types) and isinstance(module, types)


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if is_quantized(module):
            yield name, module


def has_quantized_layers(model: nn.Module) -> bool:
    return next(quantized_layers(model), None) is not None


def quantize_linear(linear: nn.Linear, spec: QuantSpec, device: torch.device | str | None = None) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized (on ``device``, default the weight's)."""
    bnb = require_bnb()
    device = torch.device(device) if device is not None else linear.weight.device
    weight = linear.weight.data
    has_bias = linear.bias is not None
    if spec.method == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=spec.compute_dtype, compress_statistics=spec.double_quant,
                                  quant_type=spec.method, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=spec.double_quant,
                                         quant_type=spec.method, module=layer)
        # On CPUs with AVX512-BF16, bitsandbytes repacks a weight for a bf16 inference kernel the first
        # time the layer runs in eval mode, in place and for good; that kernel has no backward, so
        # training after an evaluation would lose the input gradients. Keep the standard layout.
        layer.support_avx512bf16_for_cpu = False
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device)  # moving a not-yet-quantized bitsandbytes weight quantizes it


def _skip_paths(model: nn.Module) -> set[str]:
    # The output head stays in full precision (it is small next to its error's effect on every token).
    heads = {id(m) for m in (getattr(model, "get_output_embeddings", lambda: None)(),) if m is not None}
    return {name for name, m in model.named_modules() if id(m) in heads}


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and RSS never drops).
    Other C libraries have no malloc_trim and return large blocks on their own."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def take_linears(model: nn.Module) -> list[str]:
    """The names of the ``nn.Linear`` layers a quantized base stores in low precision (all but the
    output head), in model order. The float tensors that stay are made the model's own first: a
    model loaded from safetensors holds views of the memory-mapped file, and the mapping (the
    float32 size of every weight, once read) is only released when no view of it is left."""
    skipped = _skip_paths(model)
    targets = [name for name, m in model.named_modules() if type(m) is nn.Linear and name not in skipped]
    linears = [model.get_submodule(name) for name in targets]
    quantized = {id(t) for m in linears for t in (m.weight, m.bias) if t is not None}
    del linears
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in quantized and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
    return targets


def _groups(model: nn.Module, names: list[str], budget_bytes: int) -> list[list[str]]:
    """``names`` in order, cut into groups whose fp32 (in × in) input matrices fit ``budget_bytes``."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = 4 * model.get_submodule(name).in_features ** 2
        if groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def quantize_model(model: nn.Module, spec: QuantSpec, device: torch.device | str | None = None,
                   quantize_group: Callable[[list[str]], None] | None = None, group_bytes: int = 1 << 30) -> int:
    """Quantize every ``nn.Linear`` of ``model`` in place except the output head, onto ``device``
    (default: where each weight is); returns how many. Layers are replaced one at a time, so the
    float copies are freed as they go. GPT-2's Conv1D and other non-Linear layers stay as they are.

    ``quantize_group(names)``, when given, quantizes the named layers itself (calibrated rounding,
    ``lorakit.quant.gptq``); it is called on groups of layers in model order whose fp32 (in × in) input
    matrices fit ``group_bytes``, each group after the previous one is quantized."""
    if spec.method not in QUANT_CHOICES or spec.method == "none":
        raise LorakitError(f"quantize must be one of {', '.join(QUANT_CHOICES[1:])}, got {spec.method!r}")
    require_bnb()
    targets = take_linears(model)
    if quantize_group is not None:
        for group in _groups(model, targets, group_bytes):
            quantize_group(group)
    else:
        for name in targets:
            replace_module(model, name, quantize_linear(model.get_submodule(name), spec, device))
    release_freed_memory()
    return len(targets)


def spec_of(layer: nn.Module) -> QuantSpec:
    """The QuantSpec a quantized layer was built with (read back from the layer itself)."""
    bnb = require_bnb()
    if not isinstance(layer, bnb.nn.Linear4bit):
        return QuantSpec("int8", False)
    return QuantSpec(layer.weight.quant_type, bool(layer.weight.compress_statistics), layer.compute_dtype)


def dequantize_weight(module: nn.Module) -> Tensor:
    """The float32 (out, in) weight a quantized layer computes with."""
    bnb = require_bnb()
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # A layer built outside lorakit that ran in eval mode on a CPU with AVX512-BF16 has its
            # weight repacked for bitsandbytes' bf16 kernel; back to the standard layout first (as
            # bitsandbytes' own state_dict does), or the values read here would be scrambled.
            unpack = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse")
            weight.data, weight.quant_state = unpack(weight.data, weight.quant_state)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return weight.data.float() * (scb.float()[:, None] / 127.0)


def dequantize_layer(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A float ``nn.Linear`` holding a quantized layer's dequantized weight (and its bias)."""
    weight = dequantize_weight(module)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every quantized layer (LoRA bases included) by a float ``nn.Linear`` of its
    dequantized weight; returns how many. The model computes the same function afterwards (up to
    the compute dtype's rounding), and can be merged and saved like any float model."""
    done = 0
    for name, module in list(quantized_layers(model)):
        replace_module(model, name, dequantize_layer(module, dtype))
        done += 1
    return done


register_float_view(is_quantized, dequantize_layer)  # how the core merges into these layers


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> None:
    """What a quantized base needs before LoRA training: every base parameter frozen, the float
    parameters left outside the quantized layers (norms, embeddings, head) in float32 for stable
    statistics, and input gradients on when checkpointed blocks need an input that requires grad."""
    for _, param in model.named_parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def storage_bytes(module: nn.Module) -> int:
    """Bytes a quantized layer's weight really occupies: packed codes plus every quantization
    statistic (block scales, the double-quantized scales' own scales and code books)."""
    bnb = require_bnb()
    weight = module.weight
    total = weight.data.numel() * weight.data.element_size()
    if isinstance(module, bnb.nn.Linear4bit):
        state = weight.quant_state
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))
    else:
        scb = getattr(weight, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def requantize_error(model: nn.Module, spec: QuantSpec) -> dict[str, float]:
    """How much of each merged update a re-quantization keeps. For every adapted layer of a merged
    model this quantizes W + ΔW again and compares: ``update_error`` is ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖
    summed over layers (1.0 means an error as large as the whole update), ``weight_error`` is
    ‖Q(W+ΔW) − (W+ΔW)‖ / ‖W+ΔW‖. ``model`` must hold LoRA layers over float bases."""
    err2 = delta2 = total2 = 0.0
    for _, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or not isinstance(layer.base_layer, nn.Linear) or is_quantized(layer.base_layer):
            continue
        names = [n for n in layer.active_adapters if n in layer.lora_A]
        if not names:
            continue
        delta = sum(layer.delta_weight(n) for n in names)
        merged = layer.base_layer.weight.data.float() + delta
        probe = nn.Linear(merged.shape[1], merged.shape[0], bias=False, device="meta")
        probe.weight = nn.Parameter(merged.clone(), requires_grad=False)
        back = dequantize_weight(quantize_linear(probe, spec, merged.device))
        err2 += (back - merged).pow(2).sum().item()
        delta2 += delta.pow(2).sum().item()
        total2 += merged.pow(2).sum().item()
    if delta2 == 0.0:
        raise LorakitError("no adapter update to measure: the model has no active LoRA layer with a non-zero update")
    return {"update_error": (err2 / delta2) ** 0.5, "weight_error": (err2 / total2) ** 0.5}


def quant_summary(model: nn.Module) -> str:
    """One line: how many layers are quantized how, and their measured size against float32."""
    layers = [m for _, m in quantized_layers(model)]
    if not layers:
        return "no quantized layers"
    stored = sum(storage_bytes(m) for m in layers)
    fp32 = sum(4 * m.in_features * m.out_features for m in layers)
    how = spec_of(layers[0]).describe()
    return (f"{len(layers)} linear layers {how}: {stored / 2**20:.1f} MiB "
            f"({fp32 / 2**20:.1f} MiB in float32, {stored / fp32:.3f}×)")


def hf_quantization_config(spec: QuantSpec):
    """transformers' ``BitsAndBytesConfig`` for ``spec``: written into config.json so that
    ``from_pretrained`` reads a saved quantized model back as bitsandbytes layers."""
    from transformers import BitsAndBytesConfig

    if spec.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.method,
                              bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=spec.compute_dtype)

"""A 4-bit base saved with its run, for bases that cannot be rebuilt from the float weights alone.

Nearest rounding (``--quantize nf4``) gives the same 4-bit base from the same float weights every
time, so a run needs to store nothing. GPTQ rounding (``lorakit.quant.gptq``) depends on the run's
calibration data; its adapter is only right over that exact base. ``save_quantized_base`` writes
the packed 4-bit weights and bitsandbytes' quantization statistics of every quantized layer (no
float tensor: embeddings, norms, head and biases come from the float model) into one safetensors
file, ``QUANTIZED_BASE`` in the run folder; ``restore_quantized_base`` puts those layers back into
a freshly loaded float model, bit for bit — which is how ``--resume`` and the inference commands
get the base the adapter was trained on.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..atomic import atomic_file
from ..errors import LorakitError
from ..core.inject import replace_module
from .bnb import QuantSpec, quantized_layers, require_bnb, take_linears

__all__ = ["QUANTIZED_BASE", "save_quantized_base", "restore_quantized_base", "stored_spec"]

QUANTIZED_BASE = "quantized_base.safetensors"
_FORMAT = "lorakit.quant.saved_base/1"


def save_quantized_base(model: nn.Module, path: str | os.PathLike) -> int:
    """Write every 4-bit layer of ``model`` (packed weights + statistics) to ``path`` atomically;
    returns how many layers. Layers LoRA wraps are saved under their unwrapped names."""
    from safetensors.torch import save_file

    bnb = require_bnb()
    tensors: dict[str, torch.Tensor] = {}
    spec = None
    for name, layer in quantized_layers(model):
        if not isinstance(layer, bnb.nn.Linear4bit):
            raise LorakitError(f"only 4-bit bases are saved with a run; {name} is {type(layer).__name__}")
        spec = spec or QuantSpec(layer.weight.quant_type, bool(layer.weight.compress_statistics))
        name = name.removesuffix(".base_layer")
        for key, value in layer.state_dict().items():
            if key != "bias":  # the float model has it
                tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    if spec is None:
        raise LorakitError("the model has no 4-bit layer to save")
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"format": _FORMAT, "method": spec.method,
                                          "double_quant": str(spec.double_quant).lower()})
    return sum(1 for k in tensors if k.endswith(".weight"))


def stored_spec(path: str | os.PathLike) -> QuantSpec:
    """The method and double quantization a saved base was made with (compute dtype not stored)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, ValueError, SafetensorError) as err:
        raise LorakitError(f"cannot read the saved 4-bit base {path}: {err}") from None
    if meta.get("format") != _FORMAT:
        raise LorakitError(f"{path} is not a 4-bit base saved by lorakit (format {meta.get('format')!r})")
    return QuantSpec(meta["method"], meta.get("double_quant") == "true")


def restore_quantized_base(model: nn.Module, path: str | os.PathLike, spec: QuantSpec,
                           device: torch.device | str | None = None) -> int:
    """Replace the ``nn.Linear`` layers of a float ``model`` (all but the output head) with the 4-bit
    layers saved in ``path``, on ``device``; returns how many. ``spec`` gives the compute dtype and
    must name the saved method and double quantization."""
    from safetensors.torch import load_file

    bnb = require_bnb()
    saved = stored_spec(path)
    if (saved.method, saved.double_quant) != (spec.method, spec.double_quant):
        dq = lambda s: "with" if s.double_quant else "without"  # noqa: E731
        raise LorakitError(f"{path} holds a {saved.method} base {dq(saved)} double quantization, not the "
                           f"{spec.method} {dq(spec)} double quantization asked for; ask for {saved.method}"
                           + (" with double quantization (the default: leave out --no-double-quant)"
                              if saved.double_quant else " with --no-double-quant"))
    tensors = load_file(str(path))
    targets = take_linears(model)
    stored = {k.rsplit(".weight", 1)[0] for k in tensors if k.endswith(".weight")}
    if stored != set(targets):
        odd = sorted(stored ^ set(targets))
        raise LorakitError(f"{path} was saved from another model: its layers and this model's differ "
                           f"({len(odd)} names, e.g. {odd[0]}); load it over the base the run used")
    stats: dict[str, dict[str, torch.Tensor]] = {name: {} for name in targets}  # layer -> its weight.* statistics
    for key, value in tensors.items():
        layer, sep, rest = key.partition(".weight.")
        if sep:
            stats[layer][f"weight.{rest}"] = value
    device = torch.device(device) if device is not None else None
    built = []  # every layer is built and checked before the model changes
    for name in targets:
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=spec.compute_dtype, compress_statistics=spec.double_quant,
                                  quant_type=spec.method, device="meta")
        where = device or linear.weight.device
        layer.weight = bnb.nn.Params4bit.from_prequantized(tensors[f"{name}.weight"], stats[name], device=where,
                                                           module=layer)
        if tuple(layer.weight.quant_state.shape) != tuple(linear.weight.shape):
            raise LorakitError(f"{path}: layer {name} was saved with shape {tuple(layer.weight.quant_state.shape)}, "
                               f"the model's is {tuple(linear.weight.shape)}; load it over the base the run used")
        layer.support_avx512bf16_for_cpu = False  # as quant.quantize_linear: keep the layout that has a backward
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.to(where), requires_grad=False)
        built.append((name, layer))
    for name, layer in built:
        replace_module(model, name, layer)
    return len(built)

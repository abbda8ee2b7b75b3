"""Int8 inference on CPU: linear layers with int8 weights (one absmax scale per output row) whose
inputs are quantized per token as they arrive (dynamic activations), multiplied int8 × int8 → int32
by ``torch._int_mm`` and rescaled to float.

This is what the seeds did with ``torch.ao.quantization.quantize_dynamic`` (deprecated since
torch 2.10). torchao's replacement (``Int8DynamicActivationInt8WeightConfig``) computes the same
thing but, measured on a 2-core EPYC, runs slower than the float layers at batch 1; this
module calls the int8 matmul directly. See docs/export.md ("int8") for speed and accuracy.

For inference only: nothing here has a backward, and the layers are frozen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.inject import conv1d_types, linear_types, register_layer_type, replace_module
from ..core.layers import LoraLayer, LoraLinear

__all__ = ["Int8Linear", "quantize_int8", "int8_layers", "int8_bytes"]


def _absmax_scale(t: Tensor) -> Tensor:
    """Per-row scale mapping the row's largest magnitude to 127 (rows of zeros get scale 1)."""
    amax = t.abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


class Int8Linear(nn.Module):
    """y = (q(x) · W_q^T) · s_x · s_w + b, with W_q int8 (out, in), s_w (out,), q(x) int8 per token."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()  # (out, in)
        self.out_features, self.in_features = w.shape
        scale = _absmax_scale(w)  # (out, 1)
        self.register_buffer("weight", torch.round(w / scale).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale.view(1, -1))  # (1, out), float32
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, layer: nn.Module) -> "Int8Linear":
        """From ``nn.Linear`` (weight (out, in)) or GPT-2's ``Conv1D`` (weight (in, out))."""
        weight = layer.weight.t() if isinstance(layer, conv1d_types()) else layer.weight
        return cls(weight, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).float()  # (N, in)
        # per-token scale; a row of zeros gets a tiny one and stays zero (fewer ops than _absmax_scale)
        x_scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30).div_(127.0)  # (N, 1)
        xq = torch.div(x, x_scale).round_().to(torch.int8)
        y = torch._int_mm(xq, self.weight.t()).float()  # (N, out); the (out, in) layout is fastest at N = 1
        y.mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


register_layer_type((Int8Linear,), LoraLinear)  # an adapter loaded later wraps an int8 base like a Linear


def quantize_int8(model: nn.Module, head: bool = True) -> int:
    """Swap every float linear layer of ``model`` (inside LoRA layers too: the base goes int8, the
    adapter stays float) for an ``Int8Linear``; ``head=False`` keeps the output head in float.
    Returns how many layers were swapped. The model must be on the CPU."""
    skip = set()
    if not head:
        out = getattr(model, "get_output_embeddings", lambda: None)()
        skip = {id(out), id(getattr(out, "base_layer", None))}
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            continue  # its base_layer is visited on its own
        if isinstance(module, linear_types()) and id(module) not in skip:
            if module.weight.device.type != "cpu":
                raise ValueError(f"int8 layers run on the CPU; {name} is on {module.weight.device}")
            names.append(name)
    for name in names:
        replace_module(model, name, Int8Linear.from_linear(model.get_submodule(name)))
    return len(names)


def int8_layers(model: nn.Module) -> list[Int8Linear]:
    return [m for m in model.modules() if isinstance(m, Int8Linear)]


def int8_bytes(model: nn.Module) -> int:
    """Bytes held by the int8 layers (weights, scales, biases)."""
    return sum(b.numel() * b.element_size() for m in int8_layers(model) for b in m.buffers())

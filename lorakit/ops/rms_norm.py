"""An RMSNorm (Llama's weight · x / rms(x)) that keeps its input, not its normalised output, for
backward — and, in training, has its output recomputed for the layers that read it.

Run op by op, autograd keeps x and rstd, and more where it has to: in half precision the fp32
upcast of x (transformers computes the norm in fp32), and when the norm's weight trains, the
normalised x·rstd for the weight's gradient. ``rms_norm`` keeps x (in its own dtype) and the
per-row rstd in every case and recomputes x·rstd in backward (one elementwise pass); in fp32 with
a frozen weight that is what autograd kept anyway. The forward runs the same operations in the
same order as transformers' LlamaRMSNorm, so its output is identical; gradients agree to rounding.

The normalised output is what the adapters of the projections after it (q/k/v, gate/up) keep for
their A gradients: one (tokens × hidden) tensor per norm, 2 of the ~14 a decoder layer keeps. Inside
``lean_rms_norms`` a saved-tensor hook keeps a recipe over x, weight and rstd instead (kept anyway
by the norm's backward) and recomputes the output, bit for bit, when backward reaches it.
"""

from __future__ import annotations

import types
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import Tensor, nn

from .recompute import Recipe, activation_checkpointing, unpack

__all__ = ["rms_norm", "llama_norms", "lean_rms_norms"]


def _scaled(x: Tensor, weight: Tensor, rstd: Tensor, x32: Tensor | None = None) -> Tensor:
    """weight · (x·rstd), in transformers' order and dtypes: the forward's output, and its recipe's
    (``x32``: x in fp32 when the caller has it)."""
    return weight * ((x.to(torch.float32) if x32 is None else x32) * rstd).to(x.dtype)


def _forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    x32 = x.to(torch.float32)  # once, as transformers does (a half-precision x: a copy)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return _scaled(x, weight, rstd, x32), rstd


def _needs_graph(x: Tensor, weight: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        out, rstd = _forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return out, rstd

    @staticmethod
    def backward(ctx, grad: Tensor, _rstd_grad: Tensor | None):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd  # recomputed instead of kept
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            flat = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1])
            grad_w = flat.sum(0, dtype=torch.float32).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(torch.float32)
            dot = (g * normed).mean(-1, keepdim=True)
            grad_x = g.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight · x·rsqrt(mean(x²) + eps), computed in fp32 and cast back as transformers does,
    keeping x and rstd (not the normalised x) for backward."""
    return (_RMSNorm.apply if _needs_graph(x, weight) else _forward)(x, weight, eps)[0]


def _lean_forward(self, hidden_states: Tensor) -> Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


_MADE_FROM = "_lorakit_rms_norm_of"  # on a normalised output: (x, weight, rstd, dtype) it is recomputed from


def _recomputed_forward(self, hidden_states: Tensor) -> Tensor:
    """As ``_lean_forward``, and the output remembers what it is made of, for ``_pack``."""
    x, weight = hidden_states, self.weight
    if not _needs_graph(x, weight):
        return _forward(x, weight, self.variance_epsilon)[0]
    out, rstd = _RMSNorm.apply(x, weight, self.variance_epsilon)
    setattr(out, _MADE_FROM, (x, weight, rstd, out.dtype))
    return out


def _pack(t: Tensor):
    """Whatever autograd saves of a normalised output (it, or a view of it: an adapter's input) is
    kept as a recipe over x, weight and rstd, which the norm's own backward keeps anyway."""
    made_from = getattr(t, _MADE_FROM, None)
    if made_from is None and t._base is not None:
        made_from = getattr(t._base, _MADE_FROM, None)
    if made_from is None or made_from[3] != t.dtype:
        return t
    x, weight, rstd, _ = made_from
    return Recipe(lambda: _scaled(x, weight, rstd), t)


def _reference_code() -> types.CodeType:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    return (a.co_code, a.co_consts, a.co_names, a.co_varnames) == (b.co_code, b.co_consts, b.co_names, b.co_varnames)


def llama_norms(model: nn.Module) -> list[nn.Module]:
    """transformers' RMSNorms whose forward is exactly LlamaRMSNorm's (Llama, Mistral, Qwen2 and the
    other "copied from Llama" norms; not Gemma's 1 + weight), left as the class defines them."""
    ref = _reference_code()
    found = []
    for m in model.modules():
        fwd = getattr(type(m).forward, "__code__", None)
        if (fwd is not None and "forward" not in vars(m) and isinstance(getattr(m, "weight", None), Tensor)
                and hasattr(m, "variance_epsilon") and _same_code(fwd, ref)):
            found.append(m)
    return found


@contextmanager
def lean_rms_norms(model: nn.Module, norms: list[nn.Module] | None = None,
                   checkpointing: bool | None = None) -> Iterator[int]:
    """Inside the block, the model's Llama-style RMSNorms run through ``rms_norm``, and what their
    consumers save of their outputs is recomputed in backward (not under activation checkpointing);
    yields how many. ``norms`` and ``checkpointing``: ``llama_norms(model)`` and
    ``activation_checkpointing(model)`` when the caller has them already (as ``lean_gated_mlps``)."""
    norms = llama_norms(model) if norms is None else [m for m in norms if "forward" not in vars(m)]
    recompute = bool(norms) and not (activation_checkpointing(model) if checkpointing is None else checkpointing)
    for m in norms:
        m.forward = types.MethodType(_recomputed_forward if recompute else _lean_forward, m)
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, unpack) if recompute else nullcontext()
    try:
        with hooks:
            yield len(norms)
    finally:
        for m in norms:
            vars(m).pop("forward", None)

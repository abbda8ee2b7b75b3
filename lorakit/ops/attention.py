"""Per-document causal attention for packed rows, plugged into transformers through its
``AttentionInterface`` (no model code touched).

A packed row holds several examples; ``position_ids`` restart at 0 at each one. Instead of a
dense T×T block mask (about 4× slower on CPU), each example runs its own causal SDPA call, so
no example attends to another and no work is spent on masked-out blocks.

On CPU, training runs the documents through torch's flash-attention kernels directly
(``_DocumentAttention``): their outputs are written into one (B, T, H, D) tensor, which is both
what o_proj reads and what attention's backward keeps — op by op, the per-document outputs kept
by SDPA and the concatenated copy o_proj's adapter keeps were two (tokens × hidden) tensors a
layer (2.3 KB a token and layer in fp32 on SmolLM2-135M).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PACKED_ATTENTION", "packed_attention", "register", "use_packed_attention", "packed_positions", "document_spans"]

PACKED_ATTENTION = "lorakit_packed"
# position_ids of the batch being run, for architectures that do not pass them to attention.
_POSITIONS: ContextVar[torch.Tensor | None] = ContextVar("lorakit_positions", default=None)


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each document: a document starts where position_ids is 0."""
    spans = []
    T = position_ids.shape[-1]
    for row in position_ids.view(-1, T):
        starts = torch.nonzero(row == 0).flatten().tolist() or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        ends = starts[1:] + [T]
        spans.append(list(zip(starts, ends)))
    return spans


# bf16 flash attention on CPU is slower than fp32 on short sequences (measured with 9 heads of 64:
# 0.5× the time at 64 tokens, 0.6× at 150, 0.9× at 300, 1.1× at 500 once upcast), so short
# documents are attended to in fp32 there.
CPU_BF16_UPCAST_BELOW = 384


def _short_bf16_on_cpu(t: Tensor, length: int) -> bool:
    """Whether a document of ``length`` tokens is attended to in fp32 (see above)."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and length < CPU_BF16_UPCAST_BELOW


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float, scale: float | None,
          gqa: bool) -> torch.Tensor:
    if _short_bf16_on_cpu(query, query.shape[2]):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs straight back to bf16
            out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), dropout_p=dropout_p,
                                                 scale=scale, is_causal=True, enable_gqa=gqa)
        return out.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=scale, is_causal=True,
                                          enable_gqa=gqa)


def _upcast(t: Tensor, length: int) -> Tensor:
    return t.float() if _short_bf16_on_cpu(t, length) else t


class _DocumentAttention(torch.autograd.Function):
    """Causal attention within each (row, start, end) span, through torch's CPU flash kernels; one
    (B, T, Hq, D) output, kept (with q, k, v and the per-span logsumexp) for backward."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, spans: tuple, scale: float | None) -> Tensor:
        B, Hq, T, D = query.shape
        out = query.new_empty(B, T, Hq, D)
        lses = []
        for b, s, e in spans:  # (the flash kernels are not autocast ops: inputs run in their own dtype)
            q, k, v = (_upcast(t[b:b + 1, :, s:e], e - s) for t in (query, key, value))  # as _sdpa
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
            out[b:b + 1, s:e].copy_(o.transpose(1, 2))
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        query, key, value, out, *lses = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in (query, key, value)]
        for (b, s, e), lse in zip(ctx.spans, lses):
            q, k, v = (_upcast(t[b:b + 1, :, s:e], e - s) for t in (query, key, value))
            o, g = (_upcast(t[b:b + 1, s:e].transpose(1, 2), e - s) for t in (out, grad))
            parts = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g, q, k, v, o, lse, 0.0, True, scale=ctx.scale)
            for whole, part in zip(grads, parts):
                whole[b:b + 1, :, s:e].copy_(part)
        return (*grads, None, None)


def _flash_documents(query: Tensor, key: Tensor, value: Tensor, p: float) -> bool:
    """Whether the CPU flash path applies: training on CPU in fp32/bf16 without attention dropout."""
    return (query.device.type == "cpu" and p == 0.0 and query.dtype in (torch.float32, torch.bfloat16)
            and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, Hq, T, D), key/value (B, Hkv, T, D) -> output (B, T, Hq, D), as transformers expects."""
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = _POSITIONS.get()
    B, Hq, T, _ = query.shape
    gqa = key.shape[1] != Hq
    p = dropout if module.training else 0.0
    if positions is None or positions.shape[-1] != T:
        return _sdpa(query, key, value, p, scaling, gqa).transpose(1, 2).contiguous(), None
    if positions.shape[0] != B:
        positions = positions.expand(B, -1)
    if _flash_documents(query, key, value, p):
        spans = tuple((b, s, e) for b, row in enumerate(document_spans(positions)) for s, e in row)
        return _DocumentAttention.apply(query, key, value, spans, scaling), None
    rows = []
    for b, spans in enumerate(document_spans(positions)):
        parts = [_sdpa(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], p, scaling, gqa)
                 for s, e in spans]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0)  # (B, Hq, T, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextmanager
def use_packed_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with per-document attention inside the block (its own attention afterwards)."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def packed_positions(position_ids: torch.Tensor) -> Iterator[None]:
    """Make this batch's position_ids visible to architectures that do not pass them to attention."""
    token = _POSITIONS.set(position_ids)
    try:
        yield
    finally:
        _POSITIONS.reset(token)

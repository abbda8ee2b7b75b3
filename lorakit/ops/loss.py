"""Cross-entropy at label positions only, in chunks: the full tokens × vocab logits never exist.

Only hidden states whose next token is a label go through the output head. For a plain Linear
head the loss and its gradients are computed together chunk by chunk (the gradient w.r.t. the
chunk's logits is softmax − one-hot), so no chunk's logits are kept for the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["linear_cross_entropy_sum", "label_positions", "causal_lm_loss_sum", "token_logprobs", "default_chunk"]

# Label positions per chunk. One chunk's fp32 logits (chunk × vocab) — and, when the head computes in
# 16 bits, that chunk in 16 bits too — are alive at the end of the forward pass, when every
# activation is. Loss + gradient on a 2-core AVX512-BF16 EPYC (SmolLM2's 49,152-token vocabulary,
# 400 / 1,000 positions, median of 6): bf16 512 / 256 / 128 positions 177-177 / 168-175 / 161-162 and
# 396-408 / 395-401 / 392-402 ms — the same — so 16-bit heads take 128 (38 MB a chunk instead of 151);
# fp32 317-327 / 345-347 / 381-418 and 820-822 / 928-952 / 960-978 ms, so fp32 heads keep 512
# (planning.estimate.LOSS_CHUNKS mirrors both).
CHUNK_FP32 = 512
CHUNK_HALF = 128


def default_chunk(hidden: Tensor, weight: Tensor) -> int:
    """Label positions per loss chunk for a head matmul of ``hidden`` by ``weight``: 512 in fp32,
    128 where it computes in 16 bits (autocast, or a 16-bit head)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return CHUNK_FP32 if dtype in (torch.float32, torch.float64) else CHUNK_HALF


def _chunk_ce(h: Tensor, t: Tensor, weight: Tensor, bias: Tensor | None, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """CE of one chunk (n,) in fp32 and, when ``need_grad``, its gradient w.r.t. the logits
    (softmax − one-hot, (n, V), fp32)."""
    # fp32 here because a softmax over tens of thousands of classes loses mass in half precision.
    logits = F.linear(h, weight, bias).float()  # (n, V)
    picked = logits.gather(1, t[:, None]).squeeze(1)
    # log-sum-exp and softmax in place: torch.logsumexp would allocate two more (n, V)
    # temporaries, and the chunk's logits are the largest tensors of the step.
    top = logits.amax(dim=-1, keepdim=True)
    g = logits.sub_(top).exp_()  # exp(x - max)
    norm = g.sum(dim=-1, keepdim=True)
    ce = (top + norm.log()).squeeze(1) - picked
    if not need_grad:
        return ce, None
    g.div_(norm)  # softmax
    g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
    return ce, g


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        # hidden (N, H), weight (V, H), targets (N,) -> summed CE (scalar, fp32)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            ce, g = _chunk_ce(h, t, weight, bias, need_h or need_w or need_b)
            total += ce.sum()
            if g is not None:
                if need_h:
                    grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += g.t() @ h.float()
                if need_b:
                    grad_b += g.sum(0)
            del ce, g  # before the next chunk's logits exist: one chunk alive at a time
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.which = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.which
        gh = next(saved) * grad_out.to(ctx.dtypes[0]) if need_h else None
        gw = (next(saved) * grad_out).to(ctx.dtypes[1]) if need_w else None
        gb = (next(saved) * grad_out).to(ctx.dtypes[2]) if need_b else None
        return gh, gw, gb, None, None


class _LinearTokenCE(torch.autograd.Function):
    """Per-token CE (N,) through a head that does not train: the input's gradient is computed chunk
    by chunk in forward, as above, and scaled per token in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        need_h = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            ce, g = _chunk_ce(hidden[s:s + chunk], targets[s:s + chunk], weight, bias, need_h)
            out[s:s + chunk] = ce
            if g is not None:
                grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            del ce, g
        ctx.save_for_backward(*(() if grad_h is None else (grad_h,)))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gh = None
        if ctx.saved_tensors:
            gh = ctx.saved_tensors[0] * grad_out[:, None].to(ctx.saved_tensors[0].dtype)
        return gh, None, None, None, None


def linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                             chunk: int | None = None) -> Tensor:
    """Σ CE(hidden·Wᵀ + b, targets) without materialising more than ``chunk`` rows of logits
    (None: ``default_chunk``)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk or default_chunk(hidden, weight))


def label_positions(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Hidden states that predict a label (position t predicts labels[t+1]) and those labels."""
    mask = labels[:, 1:] != -100  # (B, T-1)
    return hidden[:, :-1][mask], labels[:, 1:][mask]


def _generic_head_ce(head: nn.Module, hidden: Tensor, targets: Tensor, chunk: int, softcap: float | None,
                     reduction: str) -> Tensor:
    # A LoRA-wrapped or fully trained head: chunked, each chunk's logits recomputed in backward.
    def chunk_loss(h: Tensor, t: Tensor) -> Tensor:
        logits = head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, t, reduction=reduction)

    parts = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        parts.append(checkpoint(chunk_loss, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(h, t))
    if reduction == "sum":
        return sum(parts, hidden.new_zeros((), dtype=torch.float32))
    return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)


def _label_hidden(model: nn.Module, input_ids: Tensor, labels: Tensor, position_ids: Tensor | None,
                  attention_mask: Tensor | None) -> tuple[Tensor, Tensor, nn.Module, float | None]:
    """The decoder's hidden states at label positions, their targets, the head and its softcap."""
    body = model.base_model
    out = body(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    hidden, targets = label_positions(out.last_hidden_state, labels)
    return hidden, targets, model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)


def causal_lm_loss_sum(model: nn.Module, input_ids: Tensor, labels: Tensor, position_ids: Tensor | None = None,
                       attention_mask: Tensor | None = None, chunk: int | None = None) -> tuple[Tensor, int]:
    """(summed next-token CE over label positions, number of label positions) for a transformers causal LM.

    Runs the decoder for hidden states and projects only the label positions through the head.
    """
    hidden, targets, head, softcap = _label_hidden(model, input_ids, labels, position_ids, attention_mask)
    chunk = chunk or default_chunk(hidden, head.weight)
    if type(head) is nn.Linear and not softcap:
        return linear_cross_entropy_sum(hidden, head.weight, head.bias, targets, chunk), int(targets.numel())
    return _generic_head_ce(head, hidden, targets, chunk, softcap, "sum"), int(targets.numel())


def token_logprobs(model: nn.Module, input_ids: Tensor, labels: Tensor, position_ids: Tensor | None = None,
                   attention_mask: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """log p(label) at each label position (N,), fp32, in ``label_positions`` order; differentiable."""
    hidden, targets, head, softcap = _label_hidden(model, input_ids, labels, position_ids, attention_mask)
    chunk = chunk or default_chunk(hidden, head.weight)
    frozen = not (head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)) \
        if type(head) is nn.Linear else False
    if frozen and not softcap and hidden.shape[0]:
        return -_LinearTokenCE.apply(hidden, head.weight, head.bias, targets, chunk)
    return -_generic_head_ce(head, hidden, targets, chunk, softcap, "none")

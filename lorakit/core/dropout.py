"""Dropout on an adapter's input, fused with its A matmul: h = dropout(x)·Aᵀ without keeping the
dropped-out copy of x or its mask for backward.

``nn.Dropout`` before A costs, per adapted layer, a Bernoulli draw over the whole (tokens × in)
input from torch's sequential CPU generator (slower than the frozen matmul of a 576-wide layer on
a 2-core CPU) and keeps the dropped copy (4 bytes an element in fp32) and the mask (1 byte) until
backward: ~750 KB a token on SmolLM2-135M with all seven projections adapted.

Here the mask is a counter-based hash of each element's index and a per-call seed (drawn from
torch's CPU generator, so ``torch.manual_seed``, checkpoint resume and activation checkpointing
reproduce it), computed with a few vectorised integer operations on whichever device x is on —
every core takes part — about ten times faster than the Bernoulli draw. Backward keeps x itself,
which the layer's caller keeps alive anyway, and the seed: it recomputes the mask (one more hash
pass, ~1 ms for a 512 × 1,536 input here) instead of keeping it (1 byte an element, ≈ 98 KB a
token on SmolLM2-135M with nn.Dropout's ~750 KB). One 32-bit hash gives two
elements' 15-bit draws, so the drop probability is rounded to a multiple of 1/32768 (0.05 ->
1638/32768 = 0.049988); kept elements are scaled by 1/(1 - that probability), so the
expectation is exactly x, as with ``nn.Dropout``.

Semantics: dropout on the adapter input, as PEFT's ``lora_dropout``. Siblings that read one input
(q/k/v, gate/up; ``lorakit.core.shared_input``) share one mask, where PEFT draws one per layer.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["keep_mask", "float_keep_mask", "dropped_linear", "quantized_probability", "draw_seed"]

_K_INDEX = 0x9E3779B1 - (1 << 32)  # the golden ratio's 32 bits, as a signed int32
_K_MIX1 = 0x7FEB352D
_K_MIX2 = 0x846CA68B - (1 << 32)  # as a signed int32
_LEVELS = 1 << 15  # each element's draw: 15 bits of a 32-bit hash word (a word serves two elements)
_LOW15 = 0x7FFF7FFF  # the two draws of a word: bits 0-14 and 16-30
_GUARDS = 0x80008000 - (1 << 32)  # bit 15 and 31 (as a signed int32): one guard bit above each draw


def quantized_probability(p: float) -> float:
    """The drop probability ``keep_mask`` realises for ``p``: the nearest multiple of 1/32768."""
    return round(p * _LEVELS) / _LEVELS


def draw_seed() -> int:
    """A 31-bit seed from torch's default CPU generator (seeded, saved and restored with it)."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item())


def _hash_words(count: int, seed: int, device: torch.device) -> Tensor:
    """``count`` pseudo-random int32 words: index·K + seed, then the three xor-shift/multiply rounds
    of a 32-bit integer finaliser (int32 arithmetic wraps; a shift is made logical by masking the
    sign bits it copies). In place after the arange, with one scratch tensor for the shifts."""
    v = torch.arange(count, dtype=torch.int32, device=device)
    v.mul_(_K_INDEX).add_(seed)
    scratch = torch.empty_like(v)
    for shift, low_bits, multiplier in ((16, 0xFFFF, _K_MIX1), (15, 0x1FFFF, _K_MIX2), (16, 0xFFFF, None)):
        v.bitwise_xor_(torch.bitwise_right_shift(v, shift, out=scratch).bitwise_and_(low_bits))
        if multiplier is not None:
            v.mul_(multiplier)
    return v


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """A bool tensor of ``shape``: True (kept) with probability 1 - quantized_probability(p),
    a pure function of (shape, p, seed) on every device: element i draws from the low 15 bits of
    the i-th int16 half of the hash words in memory order (on a little-endian machine, element 2k
    from bits 0-14 of word k, element 2k + 1 from bits 16-30)."""
    n = math.prod(shape)
    halves = _hash_words((n + 1) // 2, seed, torch.device(device)).view(torch.int16)[:n]
    return (halves.bitwise_and(0x7FFF) >= round(p * _LEVELS)).view(shape)


# the bit pattern of 1.0 in each float type whose mask is built from integer operations
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00, torch.float32: 0x3F800000}


def _kept_lanes(words: Tensor, q: int) -> Tensor:
    """In place over hash words: 1 in bit 0 (bit 16) where the word's low (high) 15-bit draw is >= q,
    else 0 — both draws at once: each sits under a set guard bit, so subtracting q from both lanes
    borrows from the guard exactly when the draw is below q, and never across lanes."""
    return (words.bitwise_and_(_LOW15).bitwise_or_(_GUARDS).sub_(q | q << 16)
            .bitwise_right_shift_(15).bitwise_and_(0x10001))


def float_keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> Tensor:
    """``keep_mask(shape, p, seed)`` as 1.0/0.0 in ``dtype``, built with int32 operations only (six
    passes over the words after the hash, both elements of a word at once): the bits of 1.0 where
    an element is kept. On CPU, bool → bf16 conversions and int16 compares are not vectorised."""
    one = _ONE_BITS.get(dtype)
    if one is None or sys.byteorder != "little":  # (two elements a word, the first in its low half)
        return keep_mask(shape, p, seed, device).to(dtype)
    n = math.prod(shape)
    lanes = _kept_lanes(_hash_words((n + 1) // 2, seed, torch.device(device)), round(p * _LEVELS))
    if dtype.itemsize == 2:  # 1 in bits 0/16 times 1.0's 16 bits: 1.0 in each kept half
        return lanes.mul_(one).view(dtype).view(-1)[:n].view(shape)
    lo = torch.bitwise_and(lanes, 1).mul_(one)
    hi = lanes.bitwise_right_shift_(16).mul_(one)
    return torch.stack((lo, hi), dim=-1).view(dtype).view(-1)[:n].view(shape)


class _DroppedLinear(torch.autograd.Function):
    """h = (keep ⊙ x)·Aᵀ·c, keeping x (alive anyway), A and the seed for backward, which
    recomputes the mask: neither the dropped-out copy of x nor the mask is kept."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, p: float, seed: int, scale: float) -> Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else A.dtype
        keep = float_keep_mask(x.shape, p, seed, dtype, x.device)
        with torch.autocast(x.device.type, enabled=False):
            # a float mask and a multiply cost less than torch.where; the scale goes on the thin h
            h = F.linear(x.to(dtype) * keep, A.to(dtype)).mul_(scale)
        ctx.save_for_backward(x, A)
        ctx.scale, ctx.dtype, ctx.p, ctx.seed = scale, dtype, p, seed
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, A = ctx.saved_tensors
        dtype = ctx.dtype
        mask = float_keep_mask(x.shape, ctx.p, ctx.seed, dtype, x.device)
        g = grad.to(dtype) * ctx.scale
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ A.to(dtype)).mul_(mask).to(x.dtype)
        if ctx.needs_input_grad[1]:
            xd = x.to(dtype) * mask
            grad_A = (g.reshape(-1, g.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])).to(A.dtype)
        return grad_x, grad_A, None, None, None


def dropped_linear(x: Tensor, A: Tensor, p: float, seed: int | None = None) -> Tensor:
    """dropout(x, p)·Aᵀ in training (x's last dimension is A's second): the mask from
    ``keep_mask(x.shape, p, seed)``, a fresh seed when none is given. Under autocast the matmul
    runs in the autocast dtype, as F.linear's would."""
    q = quantized_probability(p)
    if q <= 0.0:
        return F.linear(x, A)
    return _DroppedLinear.apply(x, A, q, draw_seed() if seed is None else seed, 1.0 / (1.0 - q))

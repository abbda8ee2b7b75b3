"""Matmuls with a frozen weight in CPU training (a LoRA layer's base Linear, the loss head's input
gradient), each shape run the faster of two equivalent ways.

A BLAS picks its kernel and its split over the threads by shape, and some shapes come out far
below the rest: on a 2-core Xeon with AMX, oneDNN multiplies 837 × 576 by 576 × 1,536 (gate/up)
at 2.0 TFLOP/s in bf16 but 837 × 1,536 by 1,536 × 576 (down, and gate/up's input gradient) at
1.1, while the same product as two 288-column halves runs at 1.7. ``tuned_mm`` times both ways
the first few times it meets a shape and keeps the faster — the halves only where they gave the
very same bits as the single call, so the choice never changes a number the step computes (a
resumed run computes what the uninterrupted one did, whichever way it chose). Elsewhere (CUDA,
small or odd shapes, after ``MAX_SHAPES`` shapes) it is a plain matmul.

``frozen_linear`` is F.linear for a weight that does not train: one autograd node whose backward
computes only the input's gradient (through ``tuned_mm`` as well), in the autocast dtype when
autocast is on, as F.linear would.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

__all__ = ["tuned_mm", "frozen_linear", "decided_shapes", "MAX_SHAPES"]

MAX_SHAPES = 256  # shapes decided per process; later ones run as one matmul
_TRIALS = 3  # timed calls of each way per shape, after one warm-up call of each
_GAIN = 0.9  # the halves must take under 90% of the single call's time
_BUCKET = 128  # rows: a new row count in a timed bucket takes the bucket's verdict, checked for the bits
_decided: dict[tuple, bool] = {}  # shape -> run as two halves
_verdicts: dict[tuple, bool] = {}  # (bucket of rows, the rest of the shape) -> the halves were faster
_trials: dict[tuple, tuple[list[float], list[float], list[bool]]] = {}


def _halves(a: Tensor, b: Tensor) -> Tensor:
    """a @ b as two column halves written into one output."""
    n = b.shape[1]
    h = n // 2
    out = a.new_empty(a.shape[0], n)
    torch.mm(a, b[:, :h], out=out[:, :h])
    torch.mm(a, b[:, h:], out=out[:, h:])
    return out


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def tuned_mm(a: Tensor, b: Tensor) -> Tensor:
    """a (M, K) @ b (K, N), as one matmul or as two column halves, whichever this process measured
    faster for the shape (and bit-identical). Unpadded batches bring a new M every step: a new M
    takes the verdict timed for its bucket of ``_BUCKET`` rows — one call, both ways, to check the
    bits where the verdict is the halves — instead of timing afresh."""
    m, n = a.shape[0], b.shape[1]
    if a.device.type != "cpu" or m < 256 or n < 256 or n % 2 or torch.is_grad_enabled() and \
            (a.requires_grad or b.requires_grad):
        return a @ b
    rest = (a.shape[1], n, a.dtype, b.dtype, a.stride()[1:], b.stride())  # what a bucket shares
    key = (m, *rest, a.stride()[0])
    split = _decided.get(key)
    if split is not None:
        return _halves(a, b) if split else a @ b
    if len(_decided) >= MAX_SHAPES:
        return a @ b
    verdict = _verdicts.get((m // _BUCKET, *rest))
    if verdict is False:
        _decided[key] = False
        return a @ b
    whole_s, halves_s, same = _trials.setdefault(key, ([], [], []))
    t0 = time.perf_counter()
    whole = a @ b
    t1 = time.perf_counter()
    halves = _halves(a, b)
    t2 = time.perf_counter()
    whole_s.append(t1 - t0)
    halves_s.append(t2 - t1)
    same.append(torch.equal(whole, halves))
    if verdict:  # the bucket's rows ran faster as halves: these rows too, if the bits agree
        _decided[key] = same[0]
        del _trials[key]
    elif len(whole_s) > _TRIALS:  # the first call of each way was its warm-up
        faster = _median(halves_s[1:]) < _GAIN * _median(whole_s[1:])
        _verdicts[(m // _BUCKET, *rest)] = faster
        _decided[key] = all(same) and faster
        del _trials[key]
    return whole


def decided_shapes() -> dict[tuple, bool]:
    """What ``tuned_mm`` chose so far: (M, K, N, dtypes, strides) -> runs as two halves."""
    return dict(_decided)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else weight.dtype
        with torch.autocast(x.device.type, enabled=False):
            out = tuned_mm(x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype).t())
            if bias is not None:
                out += bias.to(dtype)
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype, ctx.x_shape = dtype, x.dtype, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        grad_x = tuned_mm(g, weight.to(ctx.dtype)).view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for a weight (and bias) that do not train; x's gradient only."""
    return _FrozenLinear.apply(x, weight, bias)

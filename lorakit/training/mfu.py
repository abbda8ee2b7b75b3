"""Model FLOPs utilisation of a training run: the matmul FLOPs a step must do per token,
times tokens per second, over a large-matmul peak measured in the same process (before and
after the loop, the better of the two), in the precision the run computes in.

Per token, every frozen linear layer of the decoder costs 2·W FLOPs forward and 2·W for the input
gradient backward (no weight gradient): 4·W (2·W when no gradient reaches it: a freeze run's first
blocks); each trainable factor or trained weight costs 6·P (forward, input and weight gradients).
The output head runs only on label positions (the chunked loss): 4·V·d per label position (6·V·d
when it trains), counted per label position, not per token. Attention's T² term is left out, so
this slightly undercounts — the figure is conservative."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..core.inject import linear_types

__all__ = ["matmul_peak_flops", "train_flops_per_token", "head_flops_per_label", "mfu"]


def _shrunk_size(n: int, seconds: float, reps: int, budget_s: float, smallest: int = 128) -> int:
    """The matmul size whose ``reps`` repetitions fit in ``budget_s``, given one of size ``n`` took
    ``seconds`` (time grows as n³); ``n`` itself when it fits, never below ``smallest``."""
    if seconds * reps <= budget_s or n <= smallest:
        return n
    return max(smallest, int(n * (budget_s / (seconds * reps)) ** (1 / 3)))


def matmul_peak_flops(dtype: torch.dtype, device: torch.device | str = "cpu", n: int | tuple[int, ...] = (1024, 2048),
                      reps: int = 6, budget_s: float = 1.0) -> float:
    """FLOP/s of an n×n×n matmul in ``dtype`` on ``device``, best of ``reps`` (after a warm-up); for
    several sizes, the best of them: a BLAS's kernel choice can leave one size far below the
    machine's peak (on a 2-core Xeon with AMX, bf16 runs 1,384 GFLOP/s at 1,024 and 2,197–2,352 at
    1,536–3,072). Where one matmul is slow (bf16 emulated on a CPU without it: ~1 GFLOP/s, 2 s for
    n=1024) the size shrinks so each measurement takes about ``budget_s``."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)  # not torch's global generator: a run's random draws stay as they were
    return max(_matmul_flops(dtype, device, size, reps, budget_s, gen) for size in ((n,) if isinstance(n, int) else n))


def _matmul_flops(dtype: torch.dtype, device: torch.device, size: int, reps: int, budget_s: float,
                  gen: torch.Generator) -> float:
    def operands(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(size, size, generator=gen).to(device, dtype),
                torch.randn(size, size, generator=gen).to(device, dtype))

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    a, b = operands(size)
    first = timed(a, b)  # the warm-up; on CUDA it includes library initialisation, so time another
    if device.type != "cpu":
        first = timed(a, b)
    shrunk = _shrunk_size(size, first, reps, budget_s)
    if shrunk != size:
        size, (a, b) = shrunk, operands(shrunk)
        timed(a, b)  # its warm-up
    best = min(timed(a, b) for _ in range(reps))
    return 2 * size ** 3 / max(best, 1e-12)


def _head_weight(model: nn.Module) -> torch.Tensor | None:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return getattr(getattr(head, "base_layer", head), "weight", None)


def train_flops_per_token(model: nn.Module) -> float:
    """Matmul FLOPs per token of one training step: 6·W for a linear weight that trains, 4·W for a
    frozen one that gradients pass through (anything trainable comes before it), 2·W for a frozen
    one before every trainable parameter (forward only: a freeze run's first blocks). The output
    head (label positions only: ``head_flops_per_label``) and non-matmul parameters (embeddings, norms, biases, DoRA's
    magnitudes) are left out; an adapter's factors (matrices outside a linear layer) cost 6·P.
    Modules are taken in registration order, which is the forward order of transformers' decoders;
    an adapted layer's factors count as coming before its frozen weight."""
    head_weight = _head_weight(model)
    total, upstream = 0.0, False  # upstream: a trainable parameter comes before this module
    for m in model.modules():
        wrapped = getattr(m, "base_layer", None) is not None
        if wrapped and any(p.requires_grad for p in m.parameters()):
            upstream = True
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            upstream = True
        w = getattr(m, "weight", None)
        if isinstance(m, linear_types()) and isinstance(w, torch.Tensor) and w is not head_weight:
            total += (6.0 if w.requires_grad else 4.0 if upstream else 2.0) * w.numel()
        elif not isinstance(m, (nn.Embedding, *linear_types())):  # an adapter's factors (ParameterDicts)
            total += 6.0 * sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad and p.ndim >= 2)
    return total


def head_flops_per_label(model: nn.Module) -> float:
    """Matmul FLOPs of the output head per label position: the logits forward (2·V·d) and the hidden
    state's gradient backward (2·V·d), and the weight's gradient (2·V·d) when the head trains; 0 when
    the model has no head to find. (A LoRA adapter on the head is counted per token with the others.)"""
    w = _head_weight(model)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return 0.0
    return (6.0 if w.requires_grad else 4.0) * w.numel()


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, labels_per_s: float = 0.0,
        flops_per_label: float = 0.0) -> float:
    """Achieved model FLOP/s (per token, and the head per label position) as a fraction of the peak."""
    achieved = tokens_per_s * flops_per_token + labels_per_s * flops_per_label
    return achieved / peak_flops if peak_flops > 0 else 0.0

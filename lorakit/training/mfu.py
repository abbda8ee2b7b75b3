"""Model FLOPs utilisation of a LoRA training run: the matmul FLOPs a step must do per token,
times tokens per second, over a large-matmul peak measured in the same process at start-up, in
the precision the run computes in.

Per token, every frozen linear layer of the decoder costs 2·W FLOPs forward and 2·W for the input
gradient backward (no weight gradient): 4·W; each trainable factor costs 6·P (forward, input and
weight gradients). The output head runs only on label positions (chunked loss) and attention's
T² term is left out, so this slightly undercounts — the figure is conservative."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..core.inject import linear_types

__all__ = ["matmul_peak_flops", "train_flops_per_token", "mfu"]


def matmul_peak_flops(dtype: torch.dtype, device: torch.device | str = "cpu", n: int = 1024, reps: int = 6) -> float:
    """FLOP/s of an n×n×n matmul in ``dtype`` on ``device``, best of ``reps`` (after a warm-up)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first is the warm-up
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / max(best, 1e-12)


def train_flops_per_token(model: nn.Module) -> float:
    """4·(frozen linear weights, the output head excluded) + 6·(trainable parameters)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_weight = getattr(getattr(head, "base_layer", head), "weight", None)
    frozen = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, linear_types()) and w is not None and not w.requires_grad and w is not head_weight:
            frozen += w.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4.0 * frozen + 6.0 * trainable


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Achieved model FLOP/s as a fraction of the peak."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else 0.0

"""Low-rank starting points for adapters, kept on a base layer until an adapter takes them.

Something below the adapter may know a better start than zero for B·A — EoRA (``lorakit.quant.eora``)
computes, while a layer is quantized, the rank-k correction P·R of the layer's rounding error.
It leaves (P, R) on the quantized layer with ``attach``; ``LoraLayer`` initialised with
``init="eora"`` reads them with ``start_of`` and starts from balanced factors of P·R
(``balanced_factors``); ``drop_all`` frees what is left once the adapters exist. The core knows
nothing of how a start was computed."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["attach", "start_of", "drop_all", "balanced_factors", "pissa_factors"]

_B, _A = "eora_B", "eora_A"  # non-persistent buffers on a base layer: (out, k) and (k, in)


def attach(layer: nn.Module, factors: tuple[Tensor, Tensor]) -> None:
    """Keep ``factors`` (P (out, k), R (k, in)) on ``layer`` until an adapter is initialised from them."""
    layer.register_buffer(_B, factors[0], persistent=False)
    layer.register_buffer(_A, factors[1], persistent=False)


def start_of(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    buffers = layer._buffers
    return (buffers[_B], buffers[_A]) if _B in buffers and _A in buffers else None


def drop_all(model: nn.Module) -> int:
    """Free the starting points left on ``model``'s layers (once its adapters exist); returns how many."""
    count = 0
    for module in model.modules():
        if start_of(module) is not None:
            del module._buffers[_B], module._buffers[_A]
            count += 1
    return count


@torch.no_grad()
def balanced_factors(P: Tensor, R: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """B (out, j), A (j, in) with scaling·B·A = P·R and equal singular values in both, so that
    neither factor dwarfs the other when training starts."""
    q1, r1 = torch.linalg.qr(P.double())
    q2, r2 = torch.linalg.qr(R.double().T)
    u, sigma, vh = torch.linalg.svd(r1 @ r2.T)
    root = (sigma / scaling).sqrt()
    return ((q1 @ u) * root).float(), (root[:, None] * (vh @ q2.T)).float()


def pissa_factors(W: Tensor, r: int, s: float, init: str) -> tuple[Tensor, Tensor]:
    """PiSSA's start: A (r, in), B (out, r) with s·B·A the top-r singular part of W (out, in); exact SVD
    for ``pissa``, randomized with N power iterations for ``pissa_niter_<N>``."""
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        niter = init.removeprefix("pissa_niter_")
        if not niter.isdigit():
            raise ValueError(f"unknown init {init!r}; use 'pissa' or 'pissa_niter_<N>' (e.g. pissa_niter_4)")
        U, S, V = torch.svd_lowrank(W, q=r, niter=int(niter))
        Vh = V.t()
    root = (S[:r] / s).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]

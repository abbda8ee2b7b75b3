"""EoRA: the adapter starts as a low-rank correction of the 4-bit base's output error.

Rounding a layer's weight W to 4 bits (Q) moves its outputs by (W − Q)·x. A rank-r adapter B·A
can take back the part of that error that matters most on the inputs the layer really sees:
with H = E[x xᵀ] over calibration tokens, the rank-r matrix C minimising 𝔼‖(W − Q − C)·x‖² is
the best rank-r approximation of (W − Q)·L (H = L·Lᵀ) brought back by L⁻¹ — the eigenspace
projection of EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with
Eigenspace Low-Rank Approximation"). LoRA then trains from A, B with s·B·A = C instead of from
zero, so training starts from a base much closer to the float model's outputs.

Plain SVD of W − Q (LoftQ with one step) ignores the inputs: on the demo task it made a
nearest-rounded base worse (eval loss 1.690 → 1.717), while this weighting took it to 1.532.

``residual_factors`` computes the correction for one layer while its float weight and input
statistics still exist (during calibrated quantization, ``lorakit.quant.gptq``), and ``attach`` keeps
it on the quantized layer until ``LoraLinear`` initialises an adapter from it (``init="eora"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hessian import damped

__all__ = ["residual_factors"]


@torch.no_grad()
def residual_factors(weight: Tensor, quantized: Tensor, hessian: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(P, R) with P (out, k) and R (k, in), k = min(rank, out, in), such that P[:, :j]·R[:j] is the
    rank-j matrix closest to E = W − Q on inputs of second moment ``hessian``, for every j ≤ k.

    With H = L·Lᵀ, that is the best rank-j approximation of E·L, brought back by L⁻¹. It is found
    from the eigenvectors of the smaller Gram matrix of E·L: with more inputs than outputs, the top
    eigenvectors U of E·H·Eᵀ give C = U·Uᵀ·E (no factor of H needed); otherwise those V of
    Lᵀ·Eᵀ·E·L give C = E·L·V·Vᵀ·L⁻¹."""
    E = weight.detach().double() - quantized.detach().double()
    H = damped(hessian).to(E.device)
    k = min(rank, *E.shape)
    if E.shape[0] <= E.shape[1]:
        U = torch.linalg.eigh(E @ H @ E.T).eigenvectors.flip(1)[:, :k]  # eigh sorts ascending
        return U.float(), (U.T @ E).float()
    L = torch.linalg.cholesky(H)
    M = E @ L
    V = torch.linalg.eigh(M.T @ M).eigenvectors.flip(1)[:, :k]
    return (M @ V).float(), torch.linalg.solve_triangular(L.T, V, upper=True).T.float()  # Vᵀ·L⁻¹

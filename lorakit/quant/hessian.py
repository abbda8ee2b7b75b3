"""Input second moments (H = XᵀX over calibration tokens), as GPTQ rounding and EoRA both use them."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["damped"]


def damped(hessian: Tensor, damp: float = 0.01, dtype: torch.dtype = torch.float64) -> Tensor:
    """A copy of ``hessian`` in ``dtype`` made positive definite: inputs never non-zero in
    calibration get unit weight (their weights cannot matter there), and ``damp`` × the mean
    diagonal is added to the diagonal."""
    H = hessian.detach().to(dtype=dtype).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=dtype, device=H.device)
    return H

"""Preference losses over sequence log-probabilities: DPO, ORPO and SimPO, per pair.

Inputs are per pair (P,) fp32 tensors: the policy's summed log-probabilities of the chosen and
the rejected answer, their token counts, and for DPO the reference's sums (the base with the
adapter switched off). Each function returns per-pair losses and the "rewards" that are logged
(detached), with the definitions TRL uses, so the numbers read the same:

- DPO (Rafailov et al. 2023), sigmoid loss: −log σ(β·((π_c − ref_c) − (π_r − ref_r))); rewards β·(π − ref).
- ORPO (Hong et al. 2024): on mean per-token log-probs p̄, −β·log σ(log odds(p̄_c) − log odds(p̄_r)),
  odds(p) = p / (1 − p); added to the chosen answers' NLL by the caller; rewards β·p̄.
- SimPO (Meng et al. 2024): −log σ(β·(p̄_c − p̄_r) − γ); rewards β·p̄.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sequence_sums", "dpo_losses", "orpo_losses", "simpo_losses", "log1mexp"]


def sequence_sums(values: Tensor, seq: Tensor, n_seq: int) -> tuple[Tensor, Tensor]:
    """(Σ values per sequence, count per sequence), both (n_seq,) fp32; ``seq`` (N,) in [0, n_seq)."""
    sums = torch.zeros(n_seq, dtype=torch.float32, device=values.device).index_add(0, seq, values.float())
    counts = torch.zeros(n_seq, dtype=torch.float32, device=values.device).index_add(
        0, seq, torch.ones_like(values, dtype=torch.float32))
    return sums, counts


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -0.6931472, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dpo_losses(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
               beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(losses, chosen rewards, rejected rewards), each (P,), from summed log-probs."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_losses(chosen_mean: Tensor, rejected_mean: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(odds-ratio losses, chosen rewards, rejected rewards), each (P,), from mean per-token log-probs."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -beta * F.logsigmoid(log_odds), beta * chosen_mean.detach(), beta * rejected_mean.detach()


def simpo_losses(chosen_mean: Tensor, rejected_mean: Tensor, beta: float, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """(losses, chosen rewards, rejected rewards), each (P,), from mean per-token log-probs; γ the target margin."""
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()

"""Progressive LoRA rank: start small, grow the adapter's rank during training.

A schedule is either steps — ``"2@0,8@200,16@600"``: rank 2 from step 0, 8 from step 200, 16
from step 600 — or a plateau list — ``"plateau:2,8,16"``: grow to the next rank when the eval
loss has not improved for ``patience`` evaluations.

The scaling is fixed at the *final* rank's: s = α/r_final (α/√r_final with rsLoRA) from the first
step. Each stage's α is set to keep that s (α_k = s·r_k, or s·√r_k), so growing never rescales
anything: the new rows of A start like a fresh A, the new columns of B at zero, s·B·A is
unchanged at the growth step, the optimizer keeps the old slice's state (the new slice starts at
zero), and the adapter saved at the end has exactly the configured r and α. A checkpoint saved
mid-schedule is a valid PEFT adapter of its stage's rank.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..config.rank_schedule import RankSchedule, parse_rank_schedule, stage_alpha
from ..core.layers import LoraLayer
from ..errors import LorakitError

__all__ = ["RankSchedule", "parse_rank_schedule", "stage_alpha", "grow_adapter_rank", "PlateauTracker"]


def _move_state(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor) -> None:
    """Point ``optimizer`` at ``new`` instead of ``old``; per-element state keeps the old slice."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if not state:
        return
    moved = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            grown = torch.zeros_like(new)
            grown[tuple(slice(0, n) for n in old.shape)] = value
            moved[key] = grown
        else:
            moved[key] = value  # e.g. the step count
    optimizer.state[new] = moved


def grow_adapter_rank(lm, name: str, r: int, r_final: int, alpha_final: float,
                      optimizer: torch.optim.Optimizer | None = None) -> int:
    """Grow adapter ``name`` of LoraModel ``lm`` to rank ``r`` everywhere, with the α that keeps the
    scaling of the schedule's final stage (``r_final``, ``alpha_final``); returns how many layers grew."""
    config = lm.configs[name]
    if optimizer is not None and "8bit" in type(optimizer).__name__.lower():
        raise LorakitError("a rank schedule needs train.optimizer adamw (8-bit optimizer states cannot be resized)")
    alpha = stage_alpha(alpha_final, r, r_final, config.use_rslora)
    grown = 0
    for module in lm.model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A and module.r[name] < r:
            (old_a, new_a), (old_b, new_b) = module.grow_adapter(name, r, alpha)  # scaling is left as it is
            if optimizer is not None:
                _move_state(optimizer, old_a, new_a)
                _move_state(optimizer, old_b, new_b)
            grown += 1
    lm.configs[name] = replace(config, r=r, alpha=alpha)
    return grown


class PlateauTracker:
    """Says when the eval loss has stopped improving: ``patience`` evaluations without a drop of
    more than ``min_delta`` (relative) below the best so far. After a growth the count starts
    again from the next evaluation."""

    def __init__(self, patience: int = 2, min_delta: float = 0.01) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.waited = 0

    def update(self, loss: float) -> bool:
        if loss < self.best * (1 - self.min_delta):
            self.best, self.waited = loss, 0
            return False
        self.waited += 1
        if self.waited >= self.patience:
            # The next evaluation, the first at the new rank, becomes the reference to beat.
            self.waited, self.best = 0, math.inf
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "waited": self.waited}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.waited = state["best"], state["waited"]

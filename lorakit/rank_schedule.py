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
import re
from dataclasses import dataclass, replace

import torch

from .errors import LorakitError
from .lora import LoraLayer

__all__ = ["RankSchedule", "parse_rank_schedule", "stage_alpha", "grow_adapter_rank", "PlateauTracker"]


@dataclass(frozen=True)
class RankSchedule:
    ranks: tuple[int, ...]
    steps: tuple[int, ...] | None  # None: plateau mode

    @property
    def first(self) -> int:
        return self.ranks[0]

    @property
    def final(self) -> int:
        return self.ranks[-1]

    def rank_at(self, step: int) -> int:
        """The rank a step-schedule prescribes at optimizer step ``step``."""
        if self.steps is None:
            raise ValueError("a plateau schedule has no fixed rank per step")
        return [r for r, s in zip(self.ranks, self.steps) if s <= step][-1]

    def next_rank(self, r: int) -> int | None:
        later = [x for x in self.ranks if x > r]
        return later[0] if later else None


def parse_rank_schedule(spec: str | list, where: str = "train.rank_schedule") -> RankSchedule:
    """``"2@0,8@200,16@600"``, ``"plateau:2,8,16"``, or a YAML list of ``"r@step"`` / ``[r, step]``."""
    if isinstance(spec, list):
        items = [f"{x[0]}@{x[1]}" if isinstance(x, (list, tuple)) and len(x) == 2 else str(x) for x in spec]
        spec = ",".join(items)
    text = str(spec).replace(" ", "")
    plateau = text.startswith("plateau:")
    body = text.removeprefix("plateau:")
    pattern = r"\d+" if plateau else r"\d+@\d+"
    parts = body.split(",") if body else []
    if not parts or not all(re.fullmatch(pattern, p) for p in parts):
        example = "plateau:2,8,16" if plateau else "2@0,8@200,16@600"
        raise LorakitError(f"{where}: cannot read {spec!r}; write it like {example!r} (rank@step, or plateau:rank,rank,...)")
    if plateau:
        ranks, steps = tuple(int(p) for p in parts), None
    else:
        pairs = [tuple(int(x) for x in p.split("@")) for p in parts]
        ranks, steps = tuple(r for r, _ in pairs), tuple(s for _, s in pairs)
        if steps[0] != 0:
            raise LorakitError(f"{where}: the first stage must start at step 0 (e.g. '2@0,...'), got {parts[0]!r}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise LorakitError(f"{where}: steps must increase, got {', '.join(map(str, steps))}")
    if min(ranks) < 1 or any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise LorakitError(f"{where}: ranks must be positive and increase, got {', '.join(map(str, ranks))}")
    if len(ranks) < 2:
        raise LorakitError(f"{where}: a schedule needs at least two ranks (for one rank, set lora.r)")
    return RankSchedule(ranks, steps)


def stage_alpha(alpha: float, r: int, r_final: int, use_rslora: bool) -> float:
    """α for rank ``r`` that keeps the final stage's scaling (α/r_final, or α/√r_final)."""
    if use_rslora:
        return alpha * math.sqrt(r / r_final)
    return alpha * r / r_final


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

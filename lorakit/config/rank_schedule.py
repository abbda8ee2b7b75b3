"""Rank schedules as a config value: ``"2@0,8@200,16@600"`` (rank@step) or ``"plateau:2,8,16"``,
read and checked without torch (``train.rank_schedule`` is validated when the config is built).
Growing an adapter along a schedule is ``lorakit.training.rank_schedule``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import LorakitError

__all__ = ["RankSchedule", "parse_rank_schedule", "stage_alpha"]


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

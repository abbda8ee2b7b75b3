"""One pass over data that need not fit in memory: how many items there are, and a seeded uniform
sample of them (reservoir sampling) with the first few always kept — what ``data inspect``,
``recommend`` and the UI's data tab measure lengths on."""

from __future__ import annotations

import random
from typing import Iterable, TypeVar

__all__ = ["sample_items"]

T = TypeVar("T")


def sample_items(items: Iterable[T], k: int, seed: int = 0, head: int = 0) -> tuple[int, list[tuple[int, T]]]:
    """(how many ``items`` there were, up to ``k`` of them as (index, item) in their order): the first
    ``head`` always, then a uniform sample of the rest (every later item equally likely, the same
    ones for the same seed). ``k`` 0 keeps them all. Holds at most ``k`` items at any time."""
    head = min(head, k) if k else head
    rng, kept, n = random.Random(seed), [], 0
    room = k - head  # the reservoir's size
    for n, item in enumerate(items, 1):
        i, t = n - 1, n - 1 - head  # t: the item's place among those after the head
        if not k or t < room:
            kept.append((i, item))
        elif t >= 0:
            j = rng.randrange(t + 1)
            if j < room:
                kept[head + j] = (i, item)
    kept[head:] = sorted(kept[head:], key=lambda pair: pair[0])
    return n, kept

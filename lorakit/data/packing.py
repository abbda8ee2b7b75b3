"""Batches from tokenized examples.

- ``pack``: best-fit decreasing of examples into rows of ``max_len`` tokens. position_ids restart
  at 0 for each example, which is how the packed attention (``lorakit.ops.attention``) keeps
  examples from attending to each other, and labels never cross an example boundary.
- ``pad``: length-grouped rows of one example each, right-padded, with an attention mask; or, as
  training runs them (``padding_free``), the same group one example after another in one row, as
  packed rows are: no padding is computed, and per-document attention keeps the examples apart.
- ``stream_plan``: the same, a buffer of a stream at a time (data.streaming).
- ``pairs``: examples 2j and 2j+1 are a preference pair (chosen, rejected); the plan keeps them
  together (one packed row, or consecutive padded rows) so one forward scores both.
- ``padded_length``: packed rows are padded a little further, to one of a few lengths, so that
  steps repeat the same tensor shapes (see there).
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .templates import Encoded

__all__ = ["Batch", "pack_rows", "padded_rows", "rounded_length", "padded_length", "collate_packed", "collate_padded",
           "collate_padding_free", "batch_plan", "stream_plan", "collate", "make_batches"]


@dataclass
class Batch:
    """Tensors for one micro-batch; labels are already aligned with input_ids (shift happens in the loss)."""

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where no loss
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T) for padded batches, None for packed ones
    n_tokens: int  # real (non-padding) tokens
    n_labels: int  # positions the loss sees
    doc_ids: torch.Tensor | None = None  # (B, T) the index of the example each token is from, -1 for padding

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device),
                     None if self.attention_mask is None else self.attention_mask.to(device), self.n_tokens, self.n_labels,
                     None if self.doc_ids is None else self.doc_ids.to(device))


def pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: each example (longest first) goes into the row with the least room
    that still fits it. Returns rows as lists of example indices."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            room -= n
        else:
            rows.append([i])
            r, room = len(rows) - 1, max_len - n
        bisect.insort(free, (room, r))
    return rows


def padded_rows(lengths: list[int], batch_size: int, seed: int, max_tokens: int = 0,
                padding_free: bool = False) -> list[list[int]]:
    """Groups of examples of similar length (less padding): ``batch_size`` each, or with
    ``max_tokens`` as many as keep the padded group (rows × its longest) within that many tokens
    (an example longer than that is a group alone). ``padding_free`` with ``max_tokens``: the groups
    are run as one row each, so they are filled best-fit, as packed rows are, up to the longest row
    whose ``rounded_length`` stays within the budget (varlen's 837-token budget: 689 tokens a group
    grouped by length, 832 best-fit)."""
    if max_tokens > 0 and padding_free:
        room = max_tokens
        while room > 1 and rounded_length(room) > max_tokens:
            room -= 1
        return pack_rows(lengths, room)
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    if max_tokens <= 0:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    groups: list[list[int]] = []
    for i in order:  # ascending length: the new example is the group's longest
        if groups and (len(groups[-1]) + 1) * lengths[i] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def rounded_length(T: int) -> int:
    """``T`` rounded up to a multiple of an eighth of its power of two (8 tokens for 64–127, 64 for
    512–1,023): one of ~8 lengths per octave (see ``padded_length``)."""
    if T <= 0:
        return T
    step = max(8, 1 << max(0, T.bit_length() - 4))
    return -(-T // step) * step


def padded_length(T: int, max_len: int | None) -> int:
    """The length a micro-batch whose longest row holds ``T`` tokens is padded to: ``rounded_length(T)``, never past
    ``max(T, max_len)`` — so a packed row of ``max_len`` tokens is nearly always padded to ``max_len``.
    ``max_len`` None: ``T`` itself.

    Why: every step whose rows have a new length asks for tensors of new sizes, and a CPU process's
    resident memory grows with each (the allocator's free blocks do not fit the next step's sizes;
    SmolLM2-135M, packed rows of 990–1,024 tokens: +250 MiB over 14 steps, none when every step had
    the same length). Padding costs at most 1/8 of a row, on packed rows a few tokens."""
    if not max_len or T <= 0:
        return T
    return min(rounded_length(T), max(T, max_len))


def collate_packed(rows: list[list[int]], examples: list[Encoded], pad_id: int, max_len: int | None = None) -> Batch:
    B = len(rows)
    T = padded_length(max(sum(len(examples[i].input_ids) for i in row) for row in rows), max_len)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    docs = torch.full((B, T), -1, dtype=torch.long)
    n_tokens = 0
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            e = examples[i]
            n = len(e.input_ids)
            ids[b, t:t + n] = torch.tensor(e.input_ids)
            lab = torch.tensor(e.labels)
            lab[0] = -100  # the first token of an example is never predicted from the previous example
            labels[b, t:t + n] = lab
            pos[b, t:t + n] = torch.arange(n)
            docs[b, t:t + n] = i
            t += n
        n_tokens += t
        # Row tail: a separate "document" of padding (positions restart), no labels.
        if t < T:
            pos[b, t:] = torch.arange(T - t)
    n_labels = int((labels[:, 1:] != -100).sum())
    return Batch(ids, labels, pos, None, n_tokens, n_labels, docs)


def collate_padded(group: list[int], examples: list[Encoded], pad_id: int) -> Batch:
    T = max(len(examples[i].input_ids) for i in group)
    B = len(group)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    docs = torch.full((B, T), -1, dtype=torch.long)
    for b, i in enumerate(group):
        e = examples[i]
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
        docs[b, :n] = i
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    n_labels = int((labels[:, 1:] != -100).sum())
    return Batch(ids, labels, pos, mask, int(mask.sum()), n_labels, docs)


def collate_padding_free(group: list[int], examples: list[Encoded], pad_id: int, max_len: int | None = None) -> Batch:
    """A group of examples (an unpacked micro-batch) as one row, one example after another as in a
    packed row, padded to ``rounded_length`` of their sum (never past the group's rows of
    ``max_len``, what a memory estimate counts): the same loss as the padded rows of
    ``collate_padded`` under per-document attention, without computing their padding."""
    T = sum(len(examples[i].input_ids) for i in group)
    return collate_packed([group], examples, pad_id, len(group) * max_len if max_len else rounded_length(T))


def batch_plan(examples: list[Encoded], max_len: int, batch_size: int, packing: bool, seed: int,
               max_tokens: int = 0, pairs: bool = False, padding_free: bool = False) -> list[list]:
    """One epoch of micro-batches as example indices, in a seed-determined order: for packing,
    each item is a list of rows (lists of indices); otherwise a list of indices, one per row
    (``batch_size`` of them, or, with ``max_tokens``, as many as fit that token budget padded, or in one
    row with ``padding_free``).
    ``pairs``: the unit is a pair (2j, 2j+1) of ``max_len`` tokens together (a pair longer than that
    is a row alone); unpacked, ``batch_size`` pairs per micro-batch, each pair as two rows."""
    if pairs:
        units = [Encoded(examples[j].input_ids + examples[j + 1].input_ids, []) for j in range(0, len(examples), 2)]
        plan = batch_plan(units, max_len, batch_size, packing, seed, max_tokens,  # a pair padded: ~ its two lengths
                          padding_free=padding_free)
        expand = lambda row: [i for u in row for i in (2 * u, 2 * u + 1)]  # noqa: E731
        return [[expand(row) for row in item] for item in plan] if packing else [expand(item) for item in plan]
    lengths = [len(e.input_ids) for e in examples]
    rng = random.Random(seed)
    if packing:
        rows = pack_rows(lengths, max_len)
        rng.shuffle(rows)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    groups = padded_rows(lengths, batch_size, seed, max_tokens, padding_free)
    rng.shuffle(groups)
    return groups


def stream_plan(examples: Iterable[Encoded], max_len: int, batch_size: int, packing: bool, seed: int, buffer: int,
                max_tokens: int = 0, pairs: bool = False, padding_free: bool = False) -> Iterator[tuple[list, list[Encoded]]]:
    """A stream's micro-batches: every ``buffer`` examples (pairs kept whole) are planned together
    as one ``batch_plan`` epoch (seed + the buffer's number); yields (item, that buffer). Memory
    holds one buffer."""
    it = iter(examples)
    size = buffer + (buffer % 2 if pairs else 0)
    for n in itertools.count():
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        for item in batch_plan(chunk, max_len, batch_size, packing, seed + n, max_tokens, pairs, padding_free):
            yield item, chunk


def collate(item: list, examples: list[Encoded], packing: bool, pad_id: int, max_len: int | None = None,
            padding_free: bool = False) -> Batch:
    """Tensors for one item of a batch_plan; with ``max_len``, packed rows are padded to ``padded_length``
    (not the rows of single examples: their lengths vary anyway, and there the padding cost ~5% of
    tokens/s for no less memory — 12 varlen steps at 837 tokens, alternated). ``padding_free``: an
    unpacked group as one row (``collate_padding_free``; it needs per-document attention)."""
    if packing:
        return collate_packed(item, examples, pad_id, max_len)
    return collate_padding_free(item, examples, pad_id, max_len) if padding_free else collate_padded(item, examples, pad_id)


def make_batches(examples: list[Encoded], max_len: int, batch_size: int, packing: bool, pad_id: int,
                 seed: int, pairs: bool = False, shape_padding: bool = True) -> list[Batch]:
    """One epoch of collated micro-batches (small data; the training loop collates lazily);
    ``shape_padding`` False: no padding beyond the longest row."""
    return [collate(item, examples, packing, pad_id, max_len if shape_padding else None)
            for item in batch_plan(examples, max_len, batch_size, packing, seed, pairs=pairs)]
